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
  expired claims hold nothing. A domain whose instance has a held/migrating claim is the incoming
  copy of that migration - and then not counted, the claim counts it - only when it is not active
  (not in the inventory's `active_uuids`) or carries the claim's own placement as its agent
  metadata. Any other domain with that UUID really runs here (a claim for an instance that already
  ran here, made before that was refused): both are counted, and a CPU both pin is an overlap.
* A CPU pinned by two holders is reported in `overlaps` (human lines), never raised: the host is
  what it is, and the operator must see it.
* Memory not bound to one host cell (see below): on a single-cell host it is charged to that cell
  like bound memory; otherwise its small-page part is `HostState.unbound_memory_mb`, which the
  fitter takes from the host-wide small-page budget, and a hugepage part is only reported (notes):
  the kernel's free counts show it for running domains.

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
    to several nodes or to none is *unbound*: on no cell, in `unbound_memory_mb` (per page size in
    `unbound_by_size_mb`), and `compute_host_state` decides where it is charged (above);
  - page size from `<memoryBacking><hugepages>` (the `<page>` whose nodeset names the guest cell,
    else one without nodeset; a size of None is the host default, 2048 KiB); no hugepages = 4 KiB.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from agent.claims.model import Claim, ClaimState, uuid_key
from agent.config import ComputeConfig
from agent.cpuset import format_cpu_set
from agent.errors import InvalidInput
from agent.libvirt_ops.domain_model import DomainPlacement, guest_cell_page_kib
from agent.libvirt_ops.inventory import DomainInventory
from agent.numa.placement import Placement
from agent.numa.state import CellUsage, HostState
from agent.numa.topology import SMALL_PAGE_KB, HostTopology

log = logging.getLogger("compute_agent.claims")

DEFAULT_HUGEPAGE_KB = 2048

CpuCells = Mapping[int, int]  # online or not, every CPU of the topology -> its cell id


@dataclass(slots=True)
class _CellAcc:
    pinned: set[int] = field(default_factory=set)
    memory_mb: int = 0
    pages: dict[int, int] = field(default_factory=dict)
    floating: int = 0

    def frozen(self) -> CellUsage:
        return CellUsage(
            pinned_cpus=frozenset(self.pinned),
            used_memory_mb=self.memory_mb,
            used_pages=dict(self.pages),
            floating_vcpus=self.floating,
        )


@dataclass(frozen=True, slots=True)
class DomainUsage:
    """What one holder (domain or claim) takes, per host cell."""

    name: str
    uuid: str
    cells: Mapping[int, CellUsage]  # host cell id -> what this holder takes there
    unbound_memory_mb: int = 0  # memory not bound to one host cell (counted on no cell)
    source: str = "pins"  # "agent_placement" | "pins" | "claim"
    notes: tuple[str, ...] = ()  # CPUs outside the topology, unknown page sizes, ...
    unbound_by_size_mb: Mapping[int, int] = field(default_factory=dict)  # page size KiB -> unbound MiB

    @property
    def pinned_cpus(self) -> frozenset[int]:
        out: set[int] = set()
        for u in self.cells.values():
            out |= u.pinned_cpus
        return frozenset(out)


@dataclass(frozen=True, slots=True)
class HostStateReport:
    """What `compute_host_state` found. Also a ledger `HostView`: `Ledger.claim` reads `state`
    and refuses an instance in `active_uuids`."""

    state: HostState
    overlaps: tuple[str, ...] = ()  # one line per host CPU pinned by more than one holder
    # domain memory (any page size) not charged to any cell: 0 on a single-cell host, where it is
    # charged to the one cell; its small-page part is state.unbound_memory_mb
    unbound_memory_mb: int = 0
    holders: tuple[DomainUsage, ...] = ()  # what was counted, for reports and debugging
    notes: tuple[str, ...] = ()
    active_uuids: frozenset[str] = frozenset()  # uuid_key() of every active domain
    unreadable: tuple[str, ...] = ()  # the inventory's domains that could not be read


def _pages_for(memory_kib: int, size_kb: int) -> int:
    return -(-memory_kib // size_kb)


def _mib(kib: int) -> int:
    return -(-kib // 1024)


def cpu_cells(topology: HostTopology) -> dict[int, int]:
    """CPU -> cell id for every CPU of the topology (built once per host state)."""
    return {cpu: cell.id for cell in topology.cells for cpu in cell.cpus}


def _freeze(
    name: str, uuid: str, acc: dict[int, _CellAcc], unbound_kib: Mapping[int, int], source: str, notes: list[str]
) -> DomainUsage:
    cells = {cid: a.frozen() for cid, a in sorted(acc.items())}
    total = sum(unbound_kib.values())
    return DomainUsage(
        name=name,
        uuid=uuid,
        cells=cells,
        unbound_memory_mb=_mib(total) if total else 0,
        source=source,
        notes=tuple(notes),
        unbound_by_size_mb={size: _mib(kib) for size, kib in sorted(unbound_kib.items()) if kib},
    )


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


def placement_usage(
    placement: Placement,
    topology: HostTopology,
    *,
    name: str = "",
    uuid: str = "",
    source: str = "claim",
    cpu_cell: CpuCells | None = None,
) -> DomainUsage:
    """Usage of a Placement: exactly its pinned CPUs, floating vCPUs, memory and pages."""
    cell_of = cpu_cells(topology) if cpu_cell is None else cpu_cell
    acc: dict[int, _CellAcc] = {}
    notes: list[str] = []
    for c in placement.cells:
        a = acc.setdefault(c.host_cell, _CellAcc())
        a.pinned |= c.pinned_cpus
        a.floating += c.floating_vcpu_count
        _add_memory(a, topology, c.host_cell, c.memory_mb * 1024, c.pagesize_kb)
    if placement.emulator_isolated:
        for cpu in placement.emulator_pins:
            cid = cell_of.get(cpu)
            if cid is None:
                notes.append(f"emulator CPU {cpu} is not an online CPU of any cell")
                continue
            acc.setdefault(cid, _CellAcc()).pinned.add(cpu)
    _move_to_real_cells(acc, cell_of, notes)
    return _freeze(name, uuid, acc, {}, source, notes)


def _move_to_real_cells(acc: dict[int, _CellAcc], cell_of: CpuCells, notes: list[str]) -> None:
    """A pinned CPU recorded on a cell it does not belong to is moved to its real cell (one of no
    online cell is dropped, with a note)."""
    for cid, a in list(acc.items()):
        for cpu in list(a.pinned):
            real = cell_of.get(cpu)
            if real is None:
                notes.append(f"pinned CPU {cpu} is not an online CPU of any cell")
                a.pinned.discard(cpu)
            elif real != cid:
                a.pinned.discard(cpu)
                acc.setdefault(real, _CellAcc()).pinned.add(cpu)


def _cells_touched(cpus: Iterable[int], cell_of: CpuCells) -> set[int]:
    return {cid for cpu in cpus if (cid := cell_of.get(cpu)) is not None}


def _is_dedicated_single(cpus: frozenset[int] | None, compute_cfg: ComputeConfig) -> int | None:
    if cpus is None or len(cpus) != 1:
        return None
    (cpu,) = cpus
    if compute_cfg.cpu_dedicated_set is not None and cpu not in compute_cfg.cpu_dedicated_set:
        return None
    return cpu


def _agent_placement(domain: DomainPlacement) -> Placement | None:
    if domain.agent_placement is None:
        return None
    try:
        return Placement.from_json(dict(domain.agent_placement))
    except InvalidInput as exc:
        log.warning(
            "domain %s (%s): unreadable agent placement metadata (%s); counting its pins", domain.name, domain.uuid, exc
        )
        return None


def _vcpu_usage(
    domain: DomainPlacement,
    compute_cfg: ComputeConfig,
    cell_of: CpuCells,
    cells_with_cpus: set[int],
    acc: dict[int, _CellAcc],
    notes: list[str],
) -> set[int]:
    """Pinned and floating vCPUs into `acc`; returns the CPUs the vCPUs pin."""
    vcpu_pinned: set[int] = set()
    for v in range(max(0, domain.vcpus)):
        pins = domain.vcpu_pins.get(v, domain.vcpu_cpuset)
        cpu = _is_dedicated_single(pins, compute_cfg)
        if cpu is not None:
            cid = cell_of.get(cpu)
            if cid is None:
                notes.append(f"vCPU {v} pinned to CPU {cpu}, which is not an online CPU of any cell")
                continue
            acc.setdefault(cid, _CellAcc()).pinned.add(cpu)
            vcpu_pinned.add(cpu)
            continue
        touched = _cells_touched(pins, cell_of) if pins is not None else set(cells_with_cpus)
        if pins is not None and not touched:
            notes.append(f"vCPU {v} pinned to {format_cpu_set(pins)}, no online CPU of any cell")
        for cid in touched:
            acc.setdefault(cid, _CellAcc()).floating += 1
    return vcpu_pinned


def _thread_usage(
    domain: DomainPlacement,
    compute_cfg: ComputeConfig,
    cell_of: CpuCells,
    vcpu_pinned: set[int],
    acc: dict[int, _CellAcc],
    notes: list[str],
) -> None:
    """Emulator and iothreads pinned to one dedicated CPU of their own into `acc`."""
    extra_threads = [("emulator", domain.emulator_pins)]
    extra_threads += [(f"iothread {i}", p) for i, p in sorted(domain.iothread_pins.items())]
    for what, pins in extra_threads:
        cpu = _is_dedicated_single(pins, compute_cfg)
        if cpu is None or cpu in vcpu_pinned:
            continue
        cid = cell_of.get(cpu)
        if cid is None:
            notes.append(f"{what} pinned to CPU {cpu}, which is not an online CPU of any cell")
            continue
        acc.setdefault(cid, _CellAcc()).pinned.add(cpu)


def _memory_usage(
    domain: DomainPlacement, topology: HostTopology, acc: dict[int, _CellAcc], notes: list[str]
) -> dict[int, int]:
    """Bound memory of each guest cell into `acc`; returns the unbound KiB per page size."""
    guest_cells = [(g.id, g.memory_kib) for g in domain.guest_cells] or [(0, domain.memory_kib)]
    unbound_kib: dict[int, int] = {}  # page size -> KiB
    for gid, kib in guest_cells:
        nodes = domain.memnodes.get(gid)
        if nodes is None and domain.numatune_nodeset is not None:
            nodes = domain.numatune_nodeset
        size_kb = guest_cell_page_kib(domain, gid, default_hugepage_kb=DEFAULT_HUGEPAGE_KB)
        host_cell = next(iter(nodes)) if nodes is not None and len(nodes) == 1 else None
        if host_cell is not None and host_cell not in topology.cell_ids:
            notes.append(f"guest cell {gid} memory bound to host node {host_cell}, which does not exist")
            host_cell = None
        if host_cell is None:
            unbound_kib[size_kb] = unbound_kib.get(size_kb, 0) + kib
            continue
        if size_kb != SMALL_PAGE_KB and topology.cell(host_cell).page_pool(size_kb) is None:
            notes.append(f"guest cell {gid} uses {size_kb} KiB pages, which host cell {host_cell} lacks")
        _add_memory(acc.setdefault(host_cell, _CellAcc()), topology, host_cell, kib, size_kb)
    return unbound_kib


def domain_usage(
    domain: DomainPlacement, topology: HostTopology, compute_cfg: ComputeConfig, *, cpu_cell: CpuCells | None = None
) -> DomainUsage:
    """What `domain` holds on this host (see the module doc for the heuristic)."""
    cell_of = cpu_cells(topology) if cpu_cell is None else cpu_cell
    placement = _agent_placement(domain)
    if placement is not None:
        return placement_usage(
            placement, topology, name=domain.name, uuid=domain.uuid, source="agent_placement", cpu_cell=cell_of
        )
    acc: dict[int, _CellAcc] = {}
    notes: list[str] = []
    cells_with_cpus = {c.id for c in topology.cells if c.cpus}
    vcpu_pinned = _vcpu_usage(domain, compute_cfg, cell_of, cells_with_cpus, acc, notes)
    _thread_usage(domain, compute_cfg, cell_of, vcpu_pinned, acc, notes)
    unbound_kib = _memory_usage(domain, topology, acc, notes)
    return _freeze(domain.name, domain.uuid, acc, unbound_kib, "pins", notes)


def _domains_of(
    domains: DomainInventory | Iterable[DomainPlacement], active_uuids: Iterable[str] | None
) -> tuple[list[DomainPlacement], frozenset[str], tuple[str, ...]]:
    """(domains, uuid_key of the active ones, unreadable). A plain iterable of domains without
    `active_uuids` counts every domain as active (the safe direction: nothing is skipped)."""
    if isinstance(domains, DomainInventory):
        listed = list(domains.domains)
        active = domains.active_uuids if active_uuids is None else active_uuids
        unreadable = tuple(domains.unreadable)
    else:
        listed = list(domains)
        active = [d.uuid for d in listed] if active_uuids is None else active_uuids
        unreadable = ()
    return listed, frozenset(uuid_key(u) for u in active), unreadable


USAGE_CACHE_ENTRIES = 4096  # claims' usages kept between host states; far above the live claims of a host


class _ClaimUsageCache:
    """The usage of each claim's placement, reused by the next host state instead of recomputed.

    A claim's usage depends only on its (immutable) Placement, its name and uuid, and the topology's
    layout (which cell each CPU is in, which cells have a 4 KiB page pool), so the entry is keyed by
    all of them. The ledger hands out one Placement object per stored placement, so the object's
    identity is the key; the entry keeps the object itself, so its id cannot be reused by another
    while the entry lives. Thread-safe: a lost race computes the same value twice.
    """

    def __init__(self, max_entries: int = USAGE_CACHE_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: dict[tuple[int, str, str], tuple[Placement, Layout, DomainUsage]] = {}

    def usage(self, placement: Placement, topology: HostTopology, name: str, uuid: str, layout: Layout) -> DomainUsage:
        key = (id(placement), name, uuid)
        hit = self._entries.get(key)
        if hit is not None and hit[0] is placement and hit[1] == layout:
            return hit[2]
        usage = placement_usage(placement, topology, name=name, uuid=uuid, cpu_cell=dict(layout[0]))
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key] = (placement, layout, usage)
        return usage


#: (cpu -> cell id pairs in topology order, ids of the cells with a 4 KiB page pool)
Layout = tuple[tuple[tuple[int, int], ...], frozenset[int]]
_claim_usages = _ClaimUsageCache()


_last_layout: list[tuple[HostTopology, Layout]] = []  # the last topology's layout (topologies are immutable)


def topology_layout(topology: HostTopology) -> Layout:
    """What a placement's usage depends on in a topology (page counts are not part of it)."""
    last = _last_layout[-1] if _last_layout else None
    if last is not None and last[0] is topology:
        return last[1]
    cpus = tuple((cpu, cell.id) for cell in topology.cells for cpu in cell.cpus)
    small = frozenset(cell.id for cell in topology.cells if cell.page_pool(SMALL_PAGE_KB) is not None)
    layout = (cpus, small)
    if last is not None and last[1] == layout:
        layout = last[1]  # the same layout object again: the usage cache compares it by identity first
    _last_layout[:] = [(topology, layout)]
    return layout


def _claim_holders(
    claims: Iterable[Claim], topology: HostTopology, domain_uuids: set[str], layout: Layout
) -> tuple[list[DomainUsage], dict[str, list[Claim]]]:
    """(usage of every claim that holds something, live claims by uuid_key of their instance)."""
    holders: list[DomainUsage] = []
    live_claims: dict[str, list[Claim]] = {}
    for c in claims:
        if c.state in (ClaimState.HELD, ClaimState.MIGRATING):
            live_claims.setdefault(uuid_key(c.instance_uuid), []).append(c)
            name = f"claim {c.migration_id}"
        elif c.state is ClaimState.CONFIRMED and uuid_key(c.instance_uuid) not in domain_uuids:
            name = f"claim {c.migration_id} (confirmed)"
        else:
            continue
        holders.append(_claim_usages.usage(c.placement, topology, name, c.instance_uuid, layout))
    return holders, live_claims


def _counted_by_its_claim(domain: DomainPlacement, active: frozenset[str], its_claims: list[Claim]) -> bool:
    """Is `domain` the incoming copy of a live claim (so the claim counts it, not the domain)?"""
    if uuid_key(domain.uuid) not in active:
        return True  # the incoming (not yet running) copy of a live claim
    mine = _agent_placement(domain)
    if mine is not None and any(mine == c.placement for c in its_claims):
        return True  # the incoming domain carries exactly the claim's placement: counted once
    log.warning(
        "domain %s (%s) runs here and also has a live claim (%s): counting both",
        domain.name,
        domain.uuid,
        ", ".join(c.migration_id for c in its_claims),
    )
    return False


def _domain_holders(
    domains: list[DomainPlacement],
    active: frozenset[str],
    live_claims: Mapping[str, list[Claim]],
    topology: HostTopology,
    compute_cfg: ComputeConfig,
    cell_of: CpuCells,
) -> list[DomainUsage]:
    holders = []
    for d in domains:
        its_claims = live_claims.get(uuid_key(d.uuid))
        if its_claims and _counted_by_its_claim(d, active, its_claims):
            continue
        holders.append(domain_usage(d, topology, compute_cfg, cpu_cell=cell_of))
    return holders


@dataclass(slots=True)
class _Totals:
    """What every holder takes, summed per host cell, while `compute_host_state` counts."""

    topology: HostTopology
    acc: dict[int, _CellAcc]
    pinned: set[int] = field(default_factory=set)  # every CPU some holder pins
    pins: list[tuple[str, frozenset[int]]] = field(default_factory=list)  # (holder name, CPUs) per cell use
    overlapping: bool = False  # some CPU is pinned twice: `overlaps` names them
    unbound_small: int = 0  # MiB of small pages on no cell
    unbound_other: int = 0  # MiB of hugepages on no cell
    notes: list[str] = field(default_factory=list)

    def add(self, h: DomainUsage) -> None:
        if h.notes:
            self.notes.extend(f"{h.name}: {n}" for n in h.notes)
        if h.unbound_by_size_mb:
            self._add_unbound(h)
        for cid, u in h.cells.items():
            self._add_cell(h, cid, u)

    def _add_unbound(self, h: DomainUsage) -> None:
        topology = self.topology
        single_cell = topology.cells[0].id if len(topology.cells) == 1 else None
        for size, mb in h.unbound_by_size_mb.items():
            if single_cell is not None:
                _add_memory(self.acc[single_cell], topology, single_cell, mb * 1024, size)
            elif size == SMALL_PAGE_KB:
                self.unbound_small += mb
            else:
                self.unbound_other += mb
                self.notes.append(
                    f"{h.name}: {mb} MiB of {size} KiB pages bound to no single host cell: counted on no cell"
                )

    def _add_cell(self, h: DomainUsage, cid: int, u: CellUsage) -> None:
        a = self.acc.get(cid)
        if a is None:
            self.notes.append(f"{h.name}: uses host cell {cid}, which does not exist")
            return
        if u.pinned_cpus:
            self.overlapping = self.overlapping or not self.pinned.isdisjoint(u.pinned_cpus)
            self.pinned |= u.pinned_cpus
            self.pins.append((h.name or h.uuid, u.pinned_cpus))
        a.pinned |= u.pinned_cpus
        a.memory_mb += u.used_memory_mb
        a.floating += u.floating_vcpus
        for size, n in u.used_pages.items():
            a.pages[size] = a.pages.get(size, 0) + n

    def overlaps(self) -> tuple[str, ...]:
        """One line per CPU pinned by more than one holder (each logged at WARNING)."""
        if not self.overlapping:
            return ()
        pinned_by: dict[int, list[str]] = {}
        for name, cpus in self.pins:
            for cpu in cpus:
                pinned_by.setdefault(cpu, []).append(name)
        lines = tuple(
            f"CPU {cpu} is pinned by {len(names)} holders: {', '.join(sorted(names))}"
            for cpu, names in sorted(pinned_by.items())
            if len(names) > 1
        )
        for line in lines:
            log.warning("host state: %s", line)
        return lines


def _reserved_pages(compute_cfg: ComputeConfig) -> dict[int, dict[int, int]]:
    """host cell -> page size KiB -> pages the operator reserved."""
    reserved: dict[int, dict[int, int]] = {}
    for node, size, count in compute_cfg.reserved_huge_pages:
        per_size = reserved.setdefault(node, {})
        per_size[size] = per_size.get(size, 0) + count
    return reserved


def _host_state(topology: HostTopology, totals: _Totals, compute_cfg: ComputeConfig) -> HostState:
    return HostState(
        topology=topology,
        usage={cid: a.frozen() for cid, a in totals.acc.items()},
        cpu_dedicated_set=compute_cfg.cpu_dedicated_set,
        cpu_shared_set=compute_cfg.cpu_shared_set,
        reserved_memory_mb=compute_cfg.reserved_host_memory_mb,
        reserved_pages=_reserved_pages(compute_cfg),
        cpu_allocation_ratio=compute_cfg.cpu_allocation_ratio,
        ram_allocation_ratio=compute_cfg.ram_allocation_ratio,
        unbound_memory_mb=totals.unbound_small,
    )


def compute_host_state(
    topology: HostTopology,
    domains: DomainInventory | Iterable[DomainPlacement],
    claims: Iterable[Claim],
    compute_cfg: ComputeConfig,
    *,
    active_uuids: Iterable[str] | None = None,
) -> HostStateReport:
    """The host's state: topology minus config reservations, domain usage and live claims.

    `domains`: a DomainInventory (its `active_uuids` say which domains run) or DomainPlacements;
    `active_uuids` overrides which are active (default for a plain list: all of them). This never
    raises for unreadable domains (they are in the report); `host_state_fn` does.
    """
    listed, active, unreadable = _domains_of(domains, active_uuids)
    layout = topology_layout(topology)
    cell_of = dict(layout[0])
    holders, live_claims = _claim_holders(claims, topology, {uuid_key(d.uuid) for d in listed}, layout)
    holders += _domain_holders(listed, active, live_claims, topology, compute_cfg, cell_of)
    totals = _Totals(topology, {c.id: _CellAcc() for c in topology.cells})
    for h in holders:
        totals.add(h)
    overlaps = totals.overlaps()
    return HostStateReport(
        state=_host_state(topology, totals, compute_cfg),
        overlaps=overlaps,
        unbound_memory_mb=totals.unbound_small + totals.unbound_other,
        holders=tuple(holders),
        notes=tuple(totals.notes),
        active_uuids=active,
        unreadable=unreadable,
    )


def host_state_fn(
    topology: HostTopology | Callable[[], HostTopology],
    domains: Callable[[], DomainInventory | Iterable[DomainPlacement]],
    compute_cfg: ComputeConfig,
) -> Callable[[Iterable[Claim]], HostStateReport]:
    """A `host_state_fn` for `Ledger.claim`: recomputes the state from the ledger's live claims.

    `topology` may be a callable so fresh kernel page counts are read at each claim. `domains`
    returns the host's DomainInventory (`read_domains(conn)`): its `require_complete()` is called,
    so no claim is made on a host with a domain whose usage is unknown (IncompleteInventory), and
    its `active_uuids` let the ledger refuse an instance that already runs here. A plain iterable
    of DomainPlacement is accepted too (every domain counted as active).
    The result is a HostStateReport (a ledger HostView).
    """

    def fn(claims: Iterable[Claim]) -> HostStateReport:
        topo = topology() if callable(topology) else topology
        inventory = domains()
        if isinstance(inventory, DomainInventory):
            inventory.require_complete()
        return compute_host_state(topo, inventory, claims, compute_cfg)

    return fn


__all__ = [
    "DomainUsage",
    "HostStateReport",
    "compute_host_state",
    "cpu_cells",
    "domain_usage",
    "host_state_fn",
    "placement_usage",
]
