"""SIGHUP: which options a running agent takes from a re-read config file, and which wait for a restart.

Pure: `apply_reload(in_force, read)` returns the config to run with from now on and says what
changed. Options that shape the process itself (its name, broker, ledger directory, libvirt URI,
keys, metrics address, hugepage reservations the ledger counted) keep their running value and are
reported as needing a restart.

    >>> from agent.config import AgentConfig, LibvirtConfig
    >>> old = AgentConfig()
    >>> new = AgentConfig(log_level="DEBUG", libvirt=LibvirtConfig(connection_uri="qemu+tcp://x/system"))
    >>> r = apply_reload(old, new)
    >>> r.changed, r.needs_restart, r.config.libvirt.connection_uri
    (('[DEFAULT] log_level',), ('[libvirt] connection_uri',), 'qemu:///system')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from agent.config import AgentConfig

#: (section, option) a running agent takes at once; "*" = every option of the section but the listed
#: exceptions. Each is read where it is used (a migration, a claim, a timer), never cached at start.
RUNTIME_OPTIONS: dict[str, frozenset[str]] = {
    "DEFAULT": frozenset({"log_level", "max_concurrent_live_migrations", "max_concurrent_incoming_migrations"}),
    # downtime, timeouts, bandwidth, auto-converge/post-copy defaults: read when a migration starts
    "libvirt": frozenset({f.name for f in dataclasses.fields(AgentConfig().libvirt)} - {"connection_uri"}),
    "claims": frozenset({"claim_ttl_s", "reconcile_interval_s"}),
    "bus": frozenset({"progress_interval_s", "capabilities_interval_s", "call_timeout_s"}),
}
# every [section] of the file is a dataclass field of AgentConfig; the other fields are [DEFAULT]'s
_SECTIONS = tuple(
    f.name for f in dataclasses.fields(AgentConfig) if dataclasses.is_dataclass(getattr(AgentConfig(), f.name))
)


@dataclass(frozen=True, slots=True)
class Reload:
    config: AgentConfig  # what runs from now on
    changed: tuple[str, ...]  # "[section] option" taken now
    needs_restart: tuple[str, ...]  # "[section] option" that differ but keep their running value


def _differences(old: Any, new: Any, section: str) -> list[tuple[str, str]]:
    return [
        (section, f.name)
        for f in dataclasses.fields(old)
        if f.name not in _SECTIONS and getattr(old, f.name) != getattr(new, f.name)
    ]


def apply_reload(in_force: AgentConfig, read: AgentConfig) -> Reload:
    """The config to run with after a SIGHUP that read `read` while `in_force` ran."""
    diffs = _differences(in_force, read, "DEFAULT")
    for section in _SECTIONS:
        diffs += _differences(getattr(in_force, section), getattr(read, section), section)
    taken = [(s, o) for s, o in diffs if o in RUNTIME_OPTIONS.get(s, frozenset())]
    config = in_force
    for section, option in taken:
        config = _with(config, read, section, option)
    names = [f"[{s}] {o}" for s, o in diffs]
    changed = tuple(n for n, d in zip(names, diffs, strict=True) if d in taken)
    return Reload(config, changed, tuple(n for n in names if n not in changed))


def _with(config: AgentConfig, read: AgentConfig, section: str, option: str) -> AgentConfig:
    if section == "DEFAULT":
        return dataclasses.replace(config, **{option: getattr(read, option)})
    part = dataclasses.replace(getattr(config, section), **{option: getattr(getattr(read, section), option)})
    return dataclasses.replace(config, **{section: part})
