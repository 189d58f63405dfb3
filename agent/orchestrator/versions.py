"""Version caps and the kind of move they allow (pure).

The cap is `[upgrade_levels] agent`: `auto` = the lowest version the live agents advertise, or a
pinned major.minor (never above what this orchestrator speaks). A migration is NUMA-aware (claim on
the destination, placement to the source) only when the cap, the source and the destination are
all at 1.1. Below that a NUMA instance is refused unless `[workarounds] enable_numa_live_migration`
allows the legacy move. DIFFERS FROM NOVA: under an RPC pin Nova silently falls back to the old
behaviour; we never do (docs/orchestrator.md).

    effective = min(cap, source max, destination max)
    >= 1.1                       -> NUMA_AWARE (claim + placement)
    <  1.1, no NUMA topology     -> LEGACY (nothing to pin: the legacy move is the same move)
    <  1.1, NUMA, workaround on  -> LEGACY with the risk warning
    <  1.1, NUMA, workaround off -> NumaMigrationRefused
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable

from agent.bus.schemas import parse_version
from agent.orchestrator.errors import BadMigrationRequest, NumaMigrationRefused
from agent.orchestrator.model import HostInfo, Version

OWN_MAX: Version = (1, 1)  # the highest version this orchestrator speaks
NUMA_AWARE_SINCE: Version = (1, 1)
RISK = (
    "legacy live migration of a NUMA instance: its pinning and memory placement are copied as is; on the "
    "destination those host CPUs and hugepages may belong to another guest (overlapping pins, an "
    "out-of-memory kill), and nothing was claimed for it"
)
DEPRECATED = (
    "[workarounds] enable_numa_live_migration is ignored: every agent and the cap are at 1.1 "
    "(the option is deprecated; remove it)"
)


class MoveKind(enum.Enum):
    NUMA_AWARE = "numa-aware"  # claim on the destination, live_migrate 1.1 with the placement
    LEGACY = "legacy"  # live_migrate 1.0: the XML's pinning copied as is, no claim


@dataclass(frozen=True, slots=True)
class Move:
    kind: MoveKind
    version: Version  # the effective version of this migration
    warning: str | None = None


def fmt(version: Version) -> str:
    return "%d.%d" % version


def resolve_cap(setting: str, live: Iterable[HostInfo]) -> Version:
    """`auto` -> the lowest max among the live agents (OWN_MAX when none); else the pin, at most OWN_MAX."""
    if setting == "auto":
        versions = [h.rpc_max for h in live]
        return min([*versions, OWN_MAX])
    try:
        pinned = parse_version(setting)
    except ValueError:
        raise BadMigrationRequest(f"[upgrade_levels] agent = {setting!r}: want auto or major.minor") from None
    return min(pinned, OWN_MAX)


def decide_move(cap: Version, source: Version, destination: Version, *, numa: bool, workaround: bool) -> Move:
    effective = min(cap, source, destination)
    if effective >= NUMA_AWARE_SINCE:
        return Move(MoveKind.NUMA_AWARE, effective)
    if not numa:
        return Move(MoveKind.LEGACY, effective)
    if workaround:
        return Move(MoveKind.LEGACY, effective, RISK)
    raise NumaMigrationRefused(
        f"the instance has a NUMA topology and the move would run at RPC {fmt(effective)} "
        f"(cap {fmt(cap)}, source {fmt(source)}, destination {fmt(destination)}); NUMA-aware live "
        "migration needs 1.1 on all three. Upgrade the agents (and raise [upgrade_levels] agent), or set "
        "[workarounds] enable_numa_live_migration = true to accept the legacy move and its risk"
    )


def workaround_ignored(cap: Version, live: Iterable[HostInfo], workaround: bool) -> bool:
    """The workaround is set but nothing is below 1.1 any more: log DEPRECATED."""
    return workaround and cap >= NUMA_AWARE_SINCE and all(h.rpc_max >= NUMA_AWARE_SINCE for h in live)
