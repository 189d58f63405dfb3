"""Independent checks of the fitting rules, for tests: `check_placement` validates a Placement against
the rules without using agent.numa.fit, and `brute_force_fits` decides fit/no-fit by trying every
ordering of host cells (fine for <= 4 host cells). Only `HostState.resources()` is shared with the
fitter: it fixes the resource semantics (free dedicated CPUs, shared CPUs, floating capacity, free
hugepages, small-page MiB).

Rules checked here that are easy to get wrong:

* memory overcommit (``small_floating_mb``, and the same pool for the host-level budget
  ``reserved_memory_mb`` + ``unbound_memory_mb``) only for an instance with no page size request
  and nothing pinned; everyone else gets ``small_free_mb``;
* floating vCPUs float over the host cell's shared CPUs minus every CPU the instance takes on that
  host cell (dedicated vCPUs, reserved siblings, isolated emulator CPU). Which CPUs those are is the
  fitter's deterministic selection rule, re-implemented independently in `expected_taken`;
* no floating starvation: on a host cell where the instance takes shared CPUs or puts floating
  vCPUs, what is left of the shared pool must hold the cell's existing floating vCPUs plus the
  instance's (``existing + new <= int(len(left) * cpu_allocation_ratio)``, and a non-empty pool when
  anything floats there). The oracle applies it with the same deterministic selection the fitter
  uses (the fitter does not try other selections), and `check_placement` checks it on the CPUs the
  placement actually takes;
* an instance cannot overcommit against itself (Nova's `_numa_fit_instance_cell`), whatever the
  allocation ratios: a guest cell's floating vCPUs never outnumber the CPUs they float over on its
  host cell (the shared CPUs minus the instance's own there), and its small-page memory never
  exceeds the host cell's small-page memory in all (``small_total_mb``)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from agent.numa.placement import CellPlacement, Placement
from agent.numa.request import EmulatorThreadsPolicy, InstanceRequest, PageSizeKind, ThreadPolicy
from agent.numa.state import CellResources, HostState


def _pinned(request: InstanceRequest) -> bool:
    return request.is_pinned or any(c.dedicated_vcpus for c in request.cells)


def _page_kind(request: InstanceRequest) -> tuple[str, int | None]:
    ps = request.page_size
    if ps is None or ps.kind is PageSizeKind.SMALL or (ps.kind is PageSizeKind.EXPLICIT and ps.size_kb == 4):
        return "small", 4
    if ps.kind is PageSizeKind.EXPLICIT:
        return "explicit", ps.size_kb
    return ps.kind.value, None


def overcommit_ok(request: InstanceRequest) -> bool:
    """Nova: only an instance asking for no page size and pinning nothing overcommits memory."""
    return request.page_size is None and not _pinned(request)


def _small_avail(request: InstanceRequest, res: CellResources) -> int:
    return res.small_floating_mb if overcommit_ok(request) else res.small_free_mb


def _small_fits(request: InstanceRequest, res: CellResources, mem_mb: int) -> bool:
    """Within the pool the instance may use, and no more than the cell has: no self-overcommit."""
    return _small_avail(request, res) >= mem_mb and res.small_total_mb >= mem_mb


def _huge_fits(res: CellResources, size: int, mem_mb: int) -> bool:
    if size not in res.free_pages:
        return False
    kb = mem_mb * 1024
    return kb % size == 0 and res.free_pages[size] * size >= kb


def expected_pagesize(request: InstanceRequest, res: CellResources, mem_mb: int) -> int | None:
    """The page size the rules pick for `mem_mb` on this host cell, or None if no size fits."""
    kind, size = _page_kind(request)
    if kind == "small":
        return 4 if _small_fits(request, res, mem_mb) else None
    if kind == "explicit":
        assert size is not None
        return size if _huge_fits(res, size, mem_mb) else None
    huge = sorted((s for s in res.free_pages if s != 4), reverse=True)
    for s in huge:
        if _huge_fits(res, s, mem_mb):
            return s
    if kind == "any" and _small_fits(request, res, mem_mb):
        return 4
    return None


def _cores(res: CellResources) -> list[tuple[int, ...]]:
    groups = [tuple(g) for g in res.cell.siblings]
    covered = {c for g in groups for c in g}
    groups += [(c,) for c in res.dedicated_cpus - covered]
    return groups


def policy_capacity(policy: ThreadPolicy, res: CellResources) -> int:
    free = res.dedicated_cpus
    cores = _cores(res)
    if policy is ThreadPolicy.PREFER:
        return len(free)
    if policy is ThreadPolicy.REQUIRE:
        return sum(len(g) for g in cores if len(g) >= 2 and all(c in free for c in g))
    return sum(1 for g in cores if all(c in free for c in g))


def expected_taken(policy: ThreadPolicy, res: CellResources, count: int) -> set[int]:
    """The CPUs (picked + reserved siblings) the selection rule takes for `count` CPUs (the dedicated
    vCPUs plus the isolated emulator CPU) on this host cell. Assumes the policy capacity suffices.
    prefer: cores with the most free dedicated threads first (ties: lower first CPU), their free
    threads in order; require: whole free SMT cores in order; isolate: the first thread of each fully
    free core in order, the other threads reserved."""
    if count <= 0:
        return set()
    free = res.dedicated_cpus
    cores = sorted(_cores(res))
    if policy is ThreadPolicy.ISOLATE:
        whole = [g for g in cores if all(c in free for c in g)]
        return {c for g in whole[:count] for c in g}
    if policy is ThreadPolicy.REQUIRE:
        order = [c for g in cores if len(g) >= 2 and all(c in free for c in g) for c in g]
    else:
        ranked = sorted(cores, key=lambda g: -sum(1 for c in g if c in free))
        order = [c for g in ranked for c in g if c in free]
    assert len(order) >= count
    return set(order[:count])


def floating_pool(state: HostState, res: CellResources, mine: set[int]) -> tuple[frozenset[int], int]:
    """What floating vCPUs may float over on this host cell once the instance's own CPUs there
    (`mine`) are excluded, and how many more floating vCPUs that pool accepts."""
    pool = res.shared_cpus - mine
    room = int(len(pool) * state.cpu_allocation_ratio) - state.cell_usage(res.cell.id).floating_vcpus
    return pool, room


def starves(state: HostState, res: CellResources, mine: set[int], n_float: int) -> bool:
    """Whether taking `mine` on this host cell and adding `n_float` floating vCPUs there leaves the
    cell's floating vCPUs (existing + new) without enough shared CPUs. A cell whose shared pool the
    instance does not touch and gets no floating vCPU is not judged (an over-full cell is not the
    instance's doing)."""
    if not n_float and res.shared_cpus.isdisjoint(mine):
        return False
    left = res.shared_cpus - mine
    floating = state.cell_usage(res.cell.id).floating_vcpus + n_float
    if floating and not left:
        return True
    return floating > int(len(left) * state.cpu_allocation_ratio)


def pair_fits(request: InstanceRequest, state: HostState, guest: int, host_cell: int) -> int | None:
    """Naive per-pair check: the page size if guest cell `guest` fits host cell `host_cell`."""
    g = request.cells[guest]
    res = state.resources(host_cell)
    need = len(g.dedicated_vcpus)
    if guest == 0 and request.emulator_threads is EmulatorThreadsPolicy.ISOLATE:
        need += 1
    if need > policy_capacity(request.thread_policy, res):
        return None
    n_float = len(g.vcpus - g.dedicated_vcpus)
    taken = expected_taken(request.thread_policy, res, need)
    if starves(state, res, taken, n_float) or n_float > len(res.shared_cpus - taken):
        return None  # (the second: more floating vCPUs than CPUs to float over, a self-overcommit)
    return expected_pagesize(request, res, g.memory_mb)


def small_budget(request: InstanceRequest, state: HostState) -> int:
    rs = state.all_resources()
    pool = sum(r.small_floating_mb for r in rs) if overcommit_ok(request) else sum(r.small_free_mb for r in rs)
    # reserved_memory_mb and the small-page memory of domains bound to no cell (unbound_memory_mb)
    # come off the host-wide sum; an instance without small-page memory is never blocked by them
    return max(0, pool - state.reserved_memory_mb - state.unbound_memory_mb)


def brute_force_fits(request: InstanceRequest, state: HostState) -> bool:
    host_ids = [c.id for c in state.topology.cells]
    n = len(request.cells)
    budget = small_budget(request, state)
    table = {(i, h): pair_fits(request, state, i, h) for i in range(n) for h in host_ids}
    for perm in itertools.permutations(host_ids, n):
        sizes = [table[(i, h)] for i, h in enumerate(perm)]
        if any(s is None for s in sizes):
            continue
        small = sum(request.cells[i].memory_mb for i, s in enumerate(sizes) if s == 4)
        if small <= budget:
            return True
    return False


@dataclass
class _Audit:
    """What check_placement accumulates over the placement's cells."""

    request: InstanceRequest
    state: HostState
    placement: Placement
    used: set[int] = field(default_factory=set)  # every host CPU the instance takes exclusively
    vcpu_union: set[int] = field(default_factory=set)
    floating_pins: dict[int, tuple[int, ...]] = field(default_factory=dict)
    small_total: int = 0

    @property
    def policy(self) -> ThreadPolicy:
        return self.request.thread_policy

    @property
    def emu_isolate(self) -> bool:
        return self.request.emulator_threads is EmulatorThreadsPolicy.ISOLATE

    def take(self, cpu: int, what: str) -> None:
        assert cpu not in self.used, f"host CPU {cpu} used twice ({what})"
        self.used.add(cpu)

    def isolated_emulator_on(self, cp: CellPlacement) -> bool:
        return self.emu_isolate and cp.guest_cell == 0 and bool(self.placement.emulator_pins)


def check_placement(request: InstanceRequest, state: HostState, placement: Placement) -> None:
    """Assert that `placement` obeys every fitting rule for `request` on `state`."""
    assert placement.fits is True
    n = len(request.cells)
    assert sorted(c.guest_cell for c in placement.cells) == list(range(n)), "each guest cell placed once"
    hosts = [c.host_cell for c in placement.cells]
    assert len(set(hosts)) == n, f"guest cells share a host cell: {hosts}"
    host_ids = {c.id for c in state.topology.cells}
    assert set(hosts) <= host_ids
    audit = _Audit(request, state, placement)
    for cp in placement.cells:
        _check_cell(audit, cp)
    _check_emulator(audit)
    _check_exclusive(audit, host_ids)
    # host-level small-page budget
    assert audit.small_total <= small_budget(request, state), "reserved_memory_mb / unbound_memory_mb violated"


def _check_cell(a: _Audit, cp: CellPlacement) -> None:
    g = a.request.cells[cp.guest_cell]
    res = a.state.resources(cp.host_cell)
    assert set(cp.vcpus) == set(g.vcpus) and list(cp.vcpus) == sorted(g.vcpus)
    assert cp.dedicated_vcpus == g.dedicated_vcpus
    assert set(cp.cpu_pins) == set(g.vcpus)
    assert cp.memory_mb == g.memory_mb
    ded_cpus = _check_dedicated(a, cp, res)
    # every CPU the instance takes on this host cell: vCPUs, reserved siblings, isolated emulator
    mine = set(ded_cpus) | set(cp.reserved_cpus)
    n_sel = len(ded_cpus)
    if a.isolated_emulator_on(cp):
        mine.add(a.placement.emulator_pins[0])
        n_sel += 1
    assert mine == expected_taken(a.policy, res, n_sel), (
        f"CPUs taken on host cell {cp.host_cell} {sorted(mine)} are not the selection rule's"
    )
    _check_floating(a, cp, res, mine)
    _check_thread_policy(a, cp, res, ded_cpus)
    for cpu in cp.reserved_cpus:
        assert cpu in res.dedicated_cpus
        a.take(cpu, "reserved sibling")
    # memory
    want = expected_pagesize(a.request, res, g.memory_mb)
    assert want is not None, f"guest cell {g.id} memory does not fit host cell {cp.host_cell}"
    assert cp.pagesize_kb == want, f"page size {cp.pagesize_kb} != expected {want}"
    if want == 4:
        a.small_total += g.memory_mb


def _check_dedicated(a: _Audit, cp: CellPlacement, res: CellResources) -> list[int]:
    """Each dedicated vCPU on its own free dedicated CPU; returns those CPUs."""
    ded_cpus = []
    for v in sorted(cp.dedicated_vcpus):
        pin = cp.cpu_pins[v]
        assert len(pin) == 1, f"dedicated vCPU {v} pinned to {pin}"
        cpu = pin[0]
        assert cpu in res.dedicated_cpus, f"vCPU {v} on {cpu}, not a free dedicated CPU of cell {cp.host_cell}"
        a.take(cpu, f"vCPU {v}")
        ded_cpus.append(cpu)
        a.vcpu_union.add(cpu)
    return ded_cpus


def _check_floating(a: _Audit, cp: CellPlacement, res: CellResources, mine: set[int]) -> None:
    """Floating vCPUs on the shared CPUs minus the instance's own, within the ratio, starving no one."""
    floating = set(cp.vcpus) - cp.dedicated_vcpus
    pool, room = floating_pool(a.state, res, mine)
    for v in floating:
        assert tuple(cp.cpu_pins[v]) == tuple(sorted(pool)), (
            f"floating vCPU {v} on {cp.cpu_pins[v]}, expected the shared CPUs minus the instance's own"
        )
        a.vcpu_union.update(cp.cpu_pins[v])
        a.floating_pins[v] = tuple(cp.cpu_pins[v])
    if floating:
        assert pool, "floating vCPUs without a shared CPU"
        assert len(floating) <= room, "cpu_allocation_ratio exceeded"
        assert len(floating) <= len(pool), "more floating vCPUs than CPUs to float over (self-overcommit)"
    assert not starves(a.state, res, mine, len(floating)), (
        f"host cell {cp.host_cell}: the instance's CPUs there {sorted(mine)} leave too few shared CPUs"
        f" for the cell's floating vCPUs"
    )


def _check_thread_policy(a: _Audit, cp: CellPlacement, res: CellResources, ded_cpus: list[int]) -> None:
    free = res.dedicated_cpus
    core_of = {c: grp for grp in _cores(res) for c in grp}
    for cpu in ded_cpus:
        grp = core_of[cpu]
        if a.policy is ThreadPolicy.REQUIRE:
            assert len(grp) >= 2 and all(c in free for c in grp), f"require: {cpu} not on a whole free SMT core"
        elif a.policy is ThreadPolicy.ISOLATE:
            assert all(c in free for c in grp), f"isolate: core of {cpu} not fully free"
            for sib in grp:
                if sib != cpu:
                    assert sib in cp.reserved_cpus, f"isolate: sibling {sib} of {cpu} not reserved"
    if a.policy is not ThreadPolicy.ISOLATE:
        assert not cp.reserved_cpus, "reserved CPUs without thread policy isolate"
        return
    per_core: dict[tuple[int, ...], int] = {}
    for cpu in ded_cpus:
        per_core[core_of[cpu]] = per_core.get(core_of[cpu], 0) + 1
    assert all(k == 1 for k in per_core.values()), "isolate: two vCPUs on one core"
    owners = set(ded_cpus)
    if a.isolated_emulator_on(cp):
        owners.add(a.placement.emulator_pins[0])
    siblings = {s for c in owners if c in core_of for s in core_of[c] if s != c}
    assert set(cp.reserved_cpus) == siblings, "isolate: reserved CPUs are not exactly the siblings"


def _check_emulator(a: _Audit) -> None:
    placement, state, policy = a.placement, a.state, a.policy
    if not a.emu_isolate:
        assert not placement.emulator_isolated
        if state.cpu_shared_set:
            assert placement.emulator_pins == tuple(sorted(state.cpu_shared_set))
        else:
            assert placement.emulator_pins == tuple(sorted(a.vcpu_union))
        return
    assert placement.emulator_isolated
    assert len(placement.emulator_pins) == 1
    cpu = placement.emulator_pins[0]
    c0 = placement.cell_for_guest(0)
    res = state.resources(c0.host_cell)
    free = res.dedicated_cpus
    assert cpu in free, "isolated emulator CPU must be a free dedicated CPU of guest cell 0's host cell"
    a.take(cpu, "emulator")
    grp = {c: g for g in _cores(res) for c in g}[cpu]
    if policy is ThreadPolicy.REQUIRE:
        assert len(grp) >= 2 and all(c in free for c in grp)
    elif policy is ThreadPolicy.ISOLATE:
        assert all(c in free for c in grp)
        for sib in grp:
            if sib != cpu:
                assert sib in c0.reserved_cpus


def _check_exclusive(a: _Audit, host_ids: set[int]) -> None:
    placement, state = a.placement, a.state
    # the dedicated guarantee: no floating vCPU may run on a CPU the instance takes exclusively
    for v, pin in a.floating_pins.items():
        assert a.used.isdisjoint(pin), f"floating vCPU {v} floats over exclusive CPUs {sorted(a.used & set(pin))}"
    # no starvation, counted from what the placement takes as a whole (independent of `mine` above):
    # every host cell whose shared pool loses a CPU or gains floating vCPUs must still hold them all
    exclusive = placement.pinned_cpus
    assert exclusive == a.used, "Placement.pinned_cpus is not what the cells and emulator take"
    for cid in host_ids:
        res = state.resources(cid)
        new = sum(len(c.vcpus) - len(c.dedicated_vcpus) for c in placement.cells if c.host_cell == cid)
        taken_shared = res.shared_cpus & exclusive
        if not new and not taken_shared:
            continue
        left = res.shared_cpus - exclusive
        total = state.cell_usage(cid).floating_vcpus + new
        assert total <= int(len(left) * state.cpu_allocation_ratio), (
            f"host cell {cid}: {total} floating vCPUs on {len(left)} shared CPUs left (ratio exceeded)"
        )
        assert left or not total, f"host cell {cid}: floating vCPUs left without a shared CPU"
