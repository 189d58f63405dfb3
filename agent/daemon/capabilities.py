"""What this host offers, as the `capabilities.<host>` event and the first part of `describe_host`.

`HostFacts` is what changes only with an upgrade or a config change (traits, versions, URIs), read
once from libvirt at start; the free resources per cell come from the host state at each publish.
Traits are what libvirt and QEMU support (agent.libvirt_ops.host.host_traits), whatever the config
permits: the flavor may ask for a feature the host config does not turn on by default.

`Announcer` numbers the events (`seq` +1 per event since this agent started: a gap tells a
listener it lost one) and publishes them; the process calls it at start, every
`[bus] capabilities_interval_s` and on any change.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from agent import __version__
from agent.bus.schemas import Capabilities, CellFree, LedgerDamageView, RpcVersions, parse_version
from agent.claims.damage import LedgerDamage
from agent.claims.hoststate import HostStateReport, compute_host_state
from agent.claims.model import ClaimState
from agent.config import AgentConfig
from agent.daemon.context import AgentContext, EventSink
from agent.errors import ConfigError
from agent.libvirt_ops.host import host_traits
from agent.libvirt_ops.inventory import DomainInventory, read_domains
from agent.libvirt_ops.policy import version_tuple
from agent.numa.state import HostState
from agent.numa.topology import HostTopology, NumaCell

log = logging.getLogger("compute_agent.daemon.capabilities")

RPC_MIN, RPC_MAX = "1.0", "1.1"  # the versions this agent serves (agent.bus.rpc's version history)
#: claims that hold resources: live ones, and confirmed ones until their domain is listed
COUNTED_CLAIM_STATES = (ClaimState.HELD, ClaimState.MIGRATING, ClaimState.CONFIRMED)


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What this host is, as far as a peer or an orchestrator cares (changes only with an upgrade)."""

    host: str
    traits: frozenset[str]
    libvirt_version: str  # "9.0.0"
    qemu_version: str
    migration_uri: str  # where QEMU streams memory to this host: tcp://<my_ip>
    libvirt_uri: str  # this host's libvirtd as a peer reaches it
    rpc_max: str = RPC_MAX  # the highest version served and advertised ([upgrade_levels] agent)


def served_max(cfg: AgentConfig) -> str:
    """The highest RPC version this agent serves and advertises: RPC_MAX, or lower when
    `[upgrade_levels] agent` pins it (a rolling upgrade: an upgraded agent that must still look like
    the old release to the orchestrators). ConfigError when the pin is below what it can serve."""
    pin = cfg.upgrade_levels.agent
    if pin == "auto":
        return RPC_MAX
    pinned, lowest, highest = parse_version(pin), parse_version(RPC_MIN), parse_version(RPC_MAX)
    if pinned[0] != highest[0] or pinned < lowest:
        raise ConfigError(f"[upgrade_levels] agent = {pin}: this agent serves {RPC_MIN} to {RPC_MAX}")
    return "%d.%d" % min(pinned, highest)


def _version_text(version: int) -> str:
    return "%d.%d.%d" % version_tuple(int(version))


def host_address(cfg: AgentConfig, host: str) -> str:
    """[DEFAULT] my_ip, else what the host name resolves to, else the loopback (a lone test host)."""
    if cfg.my_ip:
        return cfg.my_ip
    try:
        return socket.gethostbyname(host)
    except OSError:
        log.warning("[DEFAULT] my_ip is not set and %s does not resolve: publishing 127.0.0.1", host)
        return "127.0.0.1"


def peer_libvirt_uri(connection_uri: str, address: str) -> str:
    """The URI a peer uses for this host's libvirtd: the configured one when it names a host
    (qemu+tcp://10.0.0.2/system), else the same driver over TCP at `address`."""
    parts = urlsplit(connection_uri)
    if parts.hostname:
        return connection_uri
    driver = parts.scheme.split("+")[0] or "qemu"
    return f"{driver}+tcp://{address}{parts.path or '/system'}"


def read_host_facts(conn: Any, cfg: AgentConfig, host: str) -> HostFacts:
    """Facts of the host behind `conn` (LibvirtConnectionError when libvirtd cannot answer)."""
    address = host_address(cfg, host)
    return HostFacts(
        host=host,
        traits=host_traits(conn),
        libvirt_version=_version_text(conn.getLibVersion()),
        qemu_version=_version_text(conn.getVersion()),
        migration_uri=f"tcp://{address}",
        libvirt_uri=peer_libvirt_uri(cfg.libvirt.connection_uri, address),
        rpc_max=served_max(cfg),
    )


def cells_free(state: HostState) -> list[CellFree]:
    """Per host cell, what may still be promised (agent.numa.state's counting)."""
    return [
        CellFree(
            id=res.cell.id,
            free_pcpus=len(res.dedicated_cpus),
            free_shared_vcpus=res.floating_capacity,
            free_memory_mb=res.small_free_mb,
            free_pages={str(size): n for size, n in sorted(res.free_pages.items())},
        )
        for res in state.all_resources()
    ]


def damage_view(damage: LedgerDamage | None) -> LedgerDamageView | None:
    if damage is None:
        return None
    return LedgerDamageView(
        refusing_new_claims=damage.refusing_new_claims, hold_until=damage.hold_until, summary=damage.summary
    )


def capabilities_body(
    facts: HostFacts, state: HostState, *, seq: int, ts: float, damage: LedgerDamage | None = None
) -> Capabilities:
    return Capabilities(
        host=facts.host,
        seq=seq,
        agent_version=__version__,
        rpc_versions=RpcVersions(min=RPC_MIN, max=facts.rpc_max),
        traits=sorted(facts.traits),
        libvirt_version=facts.libvirt_version,
        qemu_version=facts.qemu_version,
        migration_uri=facts.migration_uri,
        libvirt_uri=facts.libvirt_uri,
        cells=cells_free(state),
        ts=ts,
        ledger_damage=damage_view(damage),
    )


def host_state_now(ctx: AgentContext) -> HostStateReport:
    """The host's state now: the topology read again, every domain, the claims that hold something.
    Runs on the calling thread with that thread's own libvirt connection."""
    return host_state_and_domains(ctx)[0]


def host_state_and_domains(ctx: AgentContext) -> tuple[HostStateReport, DomainInventory]:
    """`host_state_now` and the domains it counted (one reading of libvirt for both)."""
    inventory = read_domains(ctx.libvirt.get())
    claims = ctx.ledger.list_claims(COUNTED_CLAIM_STATES)
    return compute_host_state(ctx.topology.fresh(), inventory, claims, ctx.cfg.compute), inventory


def running_instances(inventory: DomainInventory) -> list[dict[str, Any]]:
    """describe_host's `instances`: every running (or paused) domain here, by name, with whether it
    is pinned or has a guest NUMA topology (what a `drain` moves, and how carefully)."""
    return [
        {
            "uuid": dom.uuid,
            "name": dom.name,
            "vcpus": dom.vcpus,
            "memory_mb": dom.memory_kib // 1024,
            "pinned": bool(dom.vcpu_pins or dom.emulator_pins),
            "numa": bool(dom.guest_cells or dom.memnodes or dom.numatune_nodeset),
        }
        for dom in sorted(inventory.domains, key=lambda d: d.name)
        if dom.uuid.lower() in inventory.active_uuids
    ]


class Announcer:
    """Builds and publishes `capabilities.<host>` events, numbered from 1 (thread-safe)."""

    def __init__(
        self,
        facts: HostFacts,
        sink: EventSink,
        clock: Callable[[], float],
        damage: Callable[[], LedgerDamage | None] = lambda: None,
    ) -> None:
        self.facts = facts
        self._sink, self._clock, self._damage = sink, clock, damage
        self._seq = 0
        self._lock = threading.Lock()

    @property
    def seq(self) -> int:
        """The number of the last event published (0: none yet)."""
        return self._seq

    def current(self, state: HostState) -> Capabilities:
        """The body as of now, numbered like the last event (describe_host's first part)."""
        return capabilities_body(self.facts, state, seq=self._seq, ts=self._clock(), damage=self._damage())

    def publish(self, state: HostState, why: str) -> Capabilities:
        with self._lock:  # one at a time, so the broker sees them in seq order
            self._seq += 1
            body = capabilities_body(self.facts, state, seq=self._seq, ts=self._clock(), damage=self._damage())
            self._sink.publish(f"capabilities.{self.facts.host}", body)
        log.info("capabilities #%d published (%s)", body.seq, why)
        return body


# --- what a hotplug changed -------------------------------------------------------------------------


def _cell_changes(old: NumaCell, new: NumaCell) -> list[str]:
    out = []
    if old.cpus != new.cpus:
        out.append(f"cell {new.id}: CPUs {_ids(old.cpus)} -> {_ids(new.cpus)}")
    if old.memory_kb != new.memory_kb:
        out.append(f"cell {new.id}: memory {old.memory_kb // 1024} -> {new.memory_kb // 1024} MiB")
    old_totals = {p.size_kb: p.total for p in old.pages if p.size_kb != 4}
    new_totals = {p.size_kb: p.total for p in new.pages if p.size_kb != 4}
    if old_totals != new_totals:
        out.append(f"cell {new.id}: hugepage totals {old_totals} -> {new_totals}")
    return out


def _ids(values: frozenset[int]) -> str:
    return ",".join(map(str, sorted(values))) or "none"


def topology_changes(old: HostTopology, new: HostTopology) -> list[str]:
    """What differs between two readings of this host, one line each (free counts move: ignored)."""
    out = []
    added, removed = set(new.cell_ids) - set(old.cell_ids), set(old.cell_ids) - set(new.cell_ids)
    if added:
        out.append(f"cells added: {_ids(frozenset(added))}")
    if removed:
        out.append(f"cells removed: {_ids(frozenset(removed))}")
    if old.online_cpus != new.online_cpus:
        out.append(f"online CPUs {_ids(old.online_cpus)} -> {_ids(new.online_cpus)}")
    for cid in sorted(set(old.cell_ids) & set(new.cell_ids)):
        out.extend(_cell_changes(old.cell(cid), new.cell(cid)))
    return out
