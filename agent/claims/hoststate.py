"""True host state: topology - operator reservations - domain usage - live claims.

`compute_host_state` is THE one function that turns "what the host has" and "what holds it" into a
`HostState`; the fitter (through the ledger), the capability report and the CLI all call it, so they
never disagree about what is free.

Counting (see agent/numa/state.py for what HostState's fields mean):

* Every holder (a running/defined domain or a live claim) contributes, per host cell, pinned CPUs,
  floating vCPUs, MiB of memory (every page size, into `used_memory_mb`) and pages of its page size
  into `used_pages` (4 KiB pages only when the cell reports a 4 KiB pool).
* Page free counts in the topology are the kernel's: a running domain appears in both `free` and
  `used_pages` and state.py's ``min(free, total - used)`` counts it once; a claim not yet backed by a
  QEMU appears only in `used_pages`.
* Claims: held and migrating claims are always counted. A confirmed claim is counted only while its
  domain is not among `domains` (between confirmation and the next domain listing); released and
  expired claims hold nothing. When a held/migrating claim's instance already has a domain here (the
  paused incoming domain during a migration) the claim is counted and the domain is not, so the
  same instance is never counted twice.
* A CPU pinned by two holders is reported in `overlaps` (human lines), never raised: the host is
  what it is, and the operator must see it.

Usage of a domain (`domain_usage`):

* When the domain carries the agent's placement metadata (`agent_placement`, the Placement JSON the
  agent wrote when it placed the domain), exactly that placement is counted (isolated siblings and
  isolated emulator CPU included).
* Otherwise it is derived from the XML, heuristically:
  - a vCPU whose pin set (vcpupin, else `<vcpu cpuset>`) is a single CPU that lies in
    `cpu_dedicated_set` (or any single CPU when no dedicated set is configured) is *pinned* to it;
  - every other vCPU is *floating* and counts one floating vCPU on EACH host cell its pin set
    touches (vcpupin, else `<vcpu cpuset>`, else every cell with CPUs): an over-count when the set
    spans cells, which is the safe direction for the overcommit check;
  - emulatorpin and each iothreadpin that is a single CPU passing the same test, and not already one
    of this domain's pinned vCPU CPUs, is an isolated (pinned) CPU; a wider set shares CPUs and
    takes nothing exclusively;
  - memory of each guest cell (the whole domain when it has no `<numa>`) goes to the host cell of
    its `<memnode>`, else to the `<numatune><memory nodeset>` when that names one node; memory bound
    to several nodes or to none is *unbound*: counted on no cell, summed in `unbound_memory_mb`;
  - page size from `<memoryBacking><hugepages>` (the `<page>` whose nodeset names the guest cell,
    else one without nodeset; a size of None is the host default, 2048 KiB); no hugepages = 4 KiB.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from agent.claims.ledger import Claim, ClaimState
from agent.config import ComputeConfig, format_cpu_set
from agent.errors import InvalidInput
from agent.libvirt_ops.domain_xml import DomainPlacement
from agent.numa.placement import Placement
from agent.numa.state import CellUsage, HostState
from agent.numa.topology import SMALL_PAGE_KB, HostTopology

log = logging.getLogger("compute_agent.claims")

DEFAULT_HUGEPAGE_KB = 2048


@dataclass(slots=True)
class _CellAcc:
    pinned: set[int] = field(default_factory=set)
    memory_mb: int = 0
    pages: dict[int, int] = field(default_factory=dict)
    floating: int = 0


@dataclass(frozen=True, slots=True)
class DomainUsage:
    """What one holder (domain or claim) takes, per host cell."""

    name: str
    uuid: str
    cells: Mapping[int, CellUsage]  # host cell id -> what this holder takes there
    unbound_memory_mb: int = 0  # memory not bound to one host cell (counted on no cell)
    source: str = "pins"  # "agent_placement" | "pins" | "claim"
    notes: tuple[str, ...] = ()  # CPUs outside the topology, unknown page sizes, ...

    @property
    def pinned_cpus(self) -> frozenset[int]:
        out: set[int] = set()
        for u in self.cells.values():
            out |= u.pinned_cpus
        return frozenset(out)


@dataclass(frozen=True, slots=True)
class HostStateReport:
    state: HostState
    overlaps: tuple[str, ...] = ()  # one line per host CPU pinned by more than one holder
    unbound_memory_mb: int = 0  # domain memory not bound to a single host cell
    holders: tuple[DomainUsage, ...] = ()  # what was counted, for reports and debugging
    notes: tuple[str, ...] = ()


def _pages_for(memory_kib: int, size_kb: int) -> int:
    return -(-memory_kib // size_kb)


def _mib(kib: int) -> int:
    return -(-kib // 1024)


def _freeze(name: str, uuid: str, acc: dict[int, _CellAcc], unbound: int, source: str,
            notes: list[str]) -> DomainUsage:
    cells = {
        cid: CellUsage(
            pinned_cpus=frozenset(a.pinned),
            used_memory_mb=a.memory_mb,
            used_pages=dict(a.pages),
            floating_vcpus=a.floating,
        )
        for cid, a in sorted(acc.items())
    }
    return DomainUsage(name=name, uuid=uuid, cells=cells, unbound_memory_mb=unbound, source=source,
                       notes=tuple(notes))


def _add_memory(acc: _CellAcc, topology: HostTopology, cell_id: int, memory_kib: int, size_kb: int) -> None:
    acc.memory_mb += _mib(memory_kib)
    if size_kb == SMALL_PAGE_KB:
        try:
            has_small_pool = topology.cell(cell_id).page_pool(SMALL_PAGE_KB) is not None
        except KeyError:
            has_small_pool = False
        if not has_small_pool:
            return
    acc.pages[size_kb] = acc.pages.get(size_kb, 0) + _pages_for(memory_kib, size_kb)


def placement_usage(placement: Placement, topology: HostTopology, *, name: str = "", uuid: str = "",
                    source: str = "claim") -> DomainUsage:
    """Usage of a Placement: exactly its pinned CPUs, floating vCPUs, memory and pages."""
    acc: dict[int, _CellAcc] = {}
    notes: list[str] = []
    for c in placement.cells:
        a = acc.setdefault(c.host_cell, _CellAcc())
        a.pinned |= c.pinned_cpus
        a.floating += c.floating_vcpu_count
        _add_memory(a, topology, c.host_cell, c.memory_mb * 1024, c.pagesize_kb)
    if placement.emulator_isolated:
        for cpu in placement.emulator_pins:
            cell = topology.cell_of_cpu(cpu)
            if cell is None:
                notes.append(f"emulator CPU {cpu} is not an online CPU of any cell")
                continue
            acc.setdefault(cell.id, _CellAcc()).pinned.add(cpu)
    # a pinned CPU recorded on a cell it does not belong to is moved to its real cell
    for cid, a in list(acc.items()):
        for cpu in list(a.pinned):
            cell = topology.cell_of_cpu(cpu)
            if cell is None:
                notes.append(f"pinned CPU {cpu} is not an online CPU of any cell")
                a.pinned.discard(cpu)
            elif cell.id != cid:
                a.pinned.discard(cpu)
                acc.setdefault(cell.id, _CellAcc()).pinned.add(cpu)
    return _freeze(name, uuid, acc, 0, source, notes)


def _cells_touched(cpus: Iterable[int], topology: HostTopology) -> set[int]:
    out = set()
    for cpu in cpus:
        cell = topology.cell_of_cpu(cpu)
        if cell is not None:
            out.add(cell.id)
    return out


def _is_dedicated_single(cpus: frozenset[int] | None, compute_cfg: ComputeConfig) -> int | None:
    if cpus is None or len(cpus) != 1:
        return None
    (cpu,) = cpus
    if compute_cfg.cpu_dedicated_set is not None and cpu not in compute_cfg.cpu_dedicated_set:
        return None
    return cpu


def domain_usage(domain: DomainPlacement, topology: HostTopology, compute_cfg: ComputeConfig) -> DomainUsage:
    """What `domain` holds on this host (see the module doc for the heuristic)."""
    if domain.agent_placement is not None:
        try:
            placement = Placement.from_json(dict(domain.agent_placement))
        except InvalidInput as exc:
            log.warning("domain %s (%s): unreadable agent placement metadata (%s); counting its pins",
                        domain.name, domain.uuid, exc)
        else:
            return placement_usage(placement, topology, name=domain.name, uuid=domain.uuid,
                                   source="agent_placement")

    acc: dict[int, _CellAcc] = {}
    notes: list[str] = []
    cells_with_cpus = {c.id for c in topology.cells if c.cpus}

    # --- CPUs
    vcpu_pinned: set[int] = set()
    for v in range(max(0, domain.vcpus)):
        pins = domain.vcpu_pins.get(v, domain.vcpu_cpuset)
        cpu = _is_dedicated_single(pins, compute_cfg)
        if cpu is not None:
            cell = topology.cell_of_cpu(cpu)
            if cell is None:
                notes.append(f"vCPU {v} pinned to CPU {cpu}, which is not an online CPU of any cell")
                continue
            acc.setdefault(cell.id, _CellAcc()).pinned.add(cpu)
            vcpu_pinned.add(cpu)
            continue
        touched = _cells_touched(pins, topology) if pins is not None else set(cells_with_cpus)
        if pins is not None and not touched:
            notes.append(f"vCPU {v} pinned to {format_cpu_set(pins)}, no online CPU of any cell")
        for cid in touched:
            acc.setdefault(cid, _CellAcc()).floating += 1
    extra_threads = [("emulator", domain.emulator_pins)]
    extra_threads += [(f"iothread {i}", p) for i, p in sorted(domain.iothread_pins.items())]
    for what, pins in extra_threads:
        cpu = _is_dedicated_single(pins, compute_cfg)
        if cpu is None or cpu in vcpu_pinned:
            continue
        cell = topology.cell_of_cpu(cpu)
        if cell is None:
            notes.append(f"{what} pinned to CPU {cpu}, which is not an online CPU of any cell")
            continue
        acc.setdefault(cell.id, _CellAcc()).pinned.add(cpu)

    # --- memory
    guest_cells = [(g.id, g.memory_kib) for g in domain.guest_cells] or [(0, domain.memory_kib)]
    unbound_kib = 0
    for gid, kib in guest_cells:
        nodes = domain.memnodes.get(gid)
        if nodes is None and domain.numatune_nodeset is not None:
            nodes = domain.numatune_nodeset
        size_kb = SMALL_PAGE_KB
        if domain.hugepages:
            chosen = next((h for h in domain.hugepages if h.guest_nodeset is not None and gid in h.guest_nodeset),
                          None)
            if chosen is None:
                chosen = next((h for h in domain.hugepages if h.guest_nodeset is None), None)
            if chosen is not None:
                size_kb = chosen.size_kib or DEFAULT_HUGEPAGE_KB
        if nodes is None or len(nodes) != 1:
            unbound_kib += kib
            continue
        (host_cell,) = nodes
        if host_cell not in topology.cell_ids:
            notes.append(f"guest cell {gid} memory bound to host node {host_cell}, which does not exist")
            unbound_kib += kib
            continue
        if size_kb != SMALL_PAGE_KB and topology.cell(host_cell).page_pool(size_kb) is None:
            notes.append(f"guest cell {gid} uses {size_kb} KiB pages, which host cell {host_cell} lacks")
        _add_memory(acc.setdefault(host_cell, _CellAcc()), topology, host_cell, kib, size_kb)
    return _freeze(domain.name, domain.uuid, acc, _mib(unbound_kib) if unbound_kib else 0, "pins", notes)


def _uuid_key(value: str) -> str:
    return value.strip().lower().replace("-", "")


def compute_host_state(
    topology: HostTopology,
    domains: Iterable[DomainPlacement],
    claims: Iterable[Claim],
    compute_cfg: ComputeConfig,
) -> HostStateReport:
    """The host's state: topology minus config reservations, domain usage and live claims."""
    domains = list(domains)
    claims = list(claims)
    domain_uuids = {_uuid_key(d.uuid) for d in domains}
    holders: list[DomainUsage] = []
    live_claim_uuids: set[str] = set()
    for c in claims:
        if c.state in (ClaimState.HELD, ClaimState.MIGRATING):
            live_claim_uuids.add(_uuid_key(c.instance_uuid))
            holders.append(placement_usage(c.placement, topology, name=f"claim {c.migration_id}",
                                           uuid=c.instance_uuid))
        elif c.state is ClaimState.CONFIRMED and _uuid_key(c.instance_uuid) not in domain_uuids:
            holders.append(placement_usage(c.placement, topology, name=f"claim {c.migration_id} (confirmed)",
                                           uuid=c.instance_uuid))
    for d in domains:
        if _uuid_key(d.uuid) in live_claim_uuids:
            continue  # the incoming domain of a live claim: the claim counts it
        holders.append(domain_usage(d, topology, compute_cfg))

    pinned_by: dict[int, list[str]] = {}
    acc: dict[int, _CellAcc] = {c.id: _CellAcc() for c in topology.cells}
    unbound = 0
    notes: list[str] = []
    for h in holders:
        unbound += h.unbound_memory_mb
        notes.extend(f"{h.name}: {n}" for n in h.notes)
        for cid, u in h.cells.items():
            a = acc.get(cid)
            if a is None:
                notes.append(f"{h.name}: uses host cell {cid}, which does not exist")
                continue
            for cpu in u.pinned_cpus:
                pinned_by.setdefault(cpu, []).append(h.name or h.uuid)
            a.pinned |= u.pinned_cpus
            a.memory_mb += u.used_memory_mb
            a.floating += u.floating_vcpus
            for size, n in u.used_pages.items():
                a.pages[size] = a.pages.get(size, 0) + n
    overlaps = tuple(
        f"CPU {cpu} is pinned by {len(names)} holders: {', '.join(sorted(names))}"
        for cpu, names in sorted(pinned_by.items())
        if len(names) > 1
    )
    for line in overlaps:
        log.warning("host state: %s", line)

    usage = {
        cid: CellUsage(pinned_cpus=frozenset(a.pinned), used_memory_mb=a.memory_mb,
                       used_pages=dict(a.pages), floating_vcpus=a.floating)
        for cid, a in acc.items()
    }
    reserved_pages: dict[int, dict[int, int]] = {}
    for node, size, count in compute_cfg.reserved_huge_pages:
        reserved_pages.setdefault(node, {})
        reserved_pages[node][size] = reserved_pages[node].get(size, 0) + count
    state = HostState(
        topology=topology,
        usage=usage,
        cpu_dedicated_set=compute_cfg.cpu_dedicated_set,
        cpu_shared_set=compute_cfg.cpu_shared_set,
        reserved_memory_mb=compute_cfg.reserved_host_memory_mb,
        reserved_pages=reserved_pages,
        cpu_allocation_ratio=compute_cfg.cpu_allocation_ratio,
        ram_allocation_ratio=compute_cfg.ram_allocation_ratio,
    )
    return HostStateReport(state=state, overlaps=overlaps, unbound_memory_mb=unbound,
                           holders=tuple(holders), notes=tuple(notes))


def host_state_fn(
    topology: HostTopology | Callable[[], HostTopology],
    domains: Callable[[], Iterable[DomainPlacement]],
    compute_cfg: ComputeConfig,
) -> Callable[[Iterable[Claim]], HostState]:
    """A `host_state_fn` for `Ledger.claim`: recomputes the state from the ledger's live claims.

    `topology` may be a callable so fresh kernel page counts are read at each claim.
    """

    def fn(claims: Iterable[Claim]) -> HostState:
        topo = topology() if callable(topology) else topology
        return compute_host_state(topo, domains(), claims, compute_cfg).state

    return fn


__all__ = [
    "DomainUsage",
    "HostStateReport",
    "compute_host_state",
    "domain_usage",
    "host_state_fn",
    "placement_usage",
]
