"""Fit an instance request onto a host: `fit(request, state) -> Placement | NoFit`.

Pure, no I/O. Resource semantics come from `agent.numa.state` (`HostState.resources(cell)`); this
module only decides *where* things go.

Algorithm (exact and polynomial, no enumeration of cell orderings):

1. Per host cell, derive once (lazily) what its free dedicated CPUs offer under the thread policy:
   ``prefer`` = number of free dedicated CPUs, ``require`` = threads of whole free SMT cores (cores
   with >= 2 threads, all of them free dedicated CPUs), ``isolate`` = number of fully free cores
   (every thread of the sibling group is a free dedicated CPU).
2. Per pair (guest cell i, host cell j) decide feasibility independently: dedicated vCPUs (+ the
   isolated emulator CPU for guest cell 0) against the policy capacity, the host cell's floating
   vCPUs (its existing ones plus the guest cell's) against the room left on its shared CPUs (minus
   the instance's own CPUs there when the dedicated and shared pools overlap, see Interpretations),
   memory against the page size the request asks for
   (the page size per pair is a function of the pair: the largest that fits for LARGE/ANY). Resources
   of different host cells are independent, guest cells go to distinct host cells, and the CPUs a
   guest cell takes on a host cell are a deterministic function of the pair (step 5), so the pair
   questions are independent.
   Guest cells of the same shape (CPUs needed, floating vCPUs, memory) share one row of answers.
3. Bipartite matching (Kuhn's augmenting paths) tells whether every guest cell can get a distinct
   host cell; if not, a Hall violator (a set of guest cells with too few usable host cells) is reported.
4. A min-cost assignment (Hungarian algorithm, O(n^2 m)) picks the matching: cost = rank of the
   host cell's free resources, i.e. of the pair key (free dedicated CPUs - floating capacity for
   floating-only instances -, free MiB of the page size chosen for the pair); spread: most free first,
   pack: least free first; ties broken by host cell id (lower first, guest cells in host-id order).
   The host-level ``reserved_memory_mb`` + ``unbound_memory_mb`` constraint is on the sum of
   small-page MiB the instance puts on the host. That sum is fixed for small/explicit/large requests; with ``any`` it
   depends on the pairs (small pages are used on a pair only when no hugepage size fits there). If
   the preferred assignment breaks the budget, a second assignment minimises small-page MiB first
   (preference second); when even the minimum breaks the budget nothing fits. This is exact.
5. Only for the chosen pairs are actual CPU ids selected (deterministic, lowest ids first); the
   one exception is step 2 on a host cell that has floating vCPUs (existing ones or the guest
   cell's) and whose shared and free dedicated CPUs overlap, which needs the same selection to know
   what is left of the floating pool.

Interpretations (documented here because the issue text leaves them open):

* KNOWN LIMITATION (not fixed): a plain shared instance without NUMA (no ``hw:numa_nodes``, no
  pinning, no page size; Nova gives it no NUMA topology and lets it float over the whole host) is
  parsed into one implicit guest cell (``InstanceRequest.numa_implicit``) and placed in ONE host
  cell like any other guest cell: its floating vCPUs float over that host cell's shared CPUs only
  and all its memory must fit that host cell. It is refused when no single host cell has room,
  even if the host as a whole does. The fitter does not look at ``numa_implicit``; so the
  self-overcommit rule below holds it to one host cell's CPUs and memory too (Nova holds it to the
  whole host's, placement's ``max_unit``).

* Memory overcommit follows Nova: only an instance that asks for no page size at all
  (``page_size is None``) and pins nothing (cpu_policy ``shared``, no dedicated vCPU) may use the
  overcommitted small-page pool ``small_floating_mb`` (``ram_allocation_ratio`` applied). Any page
  size request (``small``, an explicit 4 KiB, ``any`` falling back to small pages) or any dedicated
  vCPU means ``small_free_mb``: no overcommit.
* Host-level small-page budget, same split: an instance that may overcommit must keep
  ``sum(small_floating_mb) - instance_small_mb >= reserved_memory_mb + unbound_memory_mb``
  (otherwise ``ram_allocation_ratio`` could never take effect), every other instance
  ``sum(small_free_mb) - instance_small_mb >= reserved_memory_mb + unbound_memory_mb``.
  ``HostState.unbound_memory_mb`` is small-page memory of domains bound to no single cell (no
  numatune): it is counted on no cell, so it can only be taken from the host-wide sum. An instance
  with no small-page memory at all (hugepages only) is never refused by this rule, even on a host
  already below its reservation.
* An instance cannot overcommit against itself (Nova's ``_numa_fit_instance_cell``): whatever
  ``cpu_allocation_ratio`` and ``ram_allocation_ratio`` say, a guest cell's floating vCPUs never
  outnumber the CPUs they float over on its host cell (``shared_cpus`` minus the instance's own
  CPUs there, see below), and its small-page memory never exceeds the host cell's small-page
  memory in all (``CellResources.small_total_mb``: the 4 KiB pool's total, else MemTotal minus the
  hugepage pools, as Nova's ``can_fit_pagesize(..., use_free=False)`` / ``host_cell.memory``). The
  ratios only let several instances share a cell. Dedicated vCPUs and hugepages need free CPUs and
  free pages anyway, which no ratio stretches. With strict memory binding this is also what keeps
  one guest from running its node out of memory by itself. DIFFERS FROM NOVA (stricter): Nova
  checks a mixed instance's dedicated vCPUs only; the floating vCPUs of a mixed guest cell are held
  to the same rule here.
* DIFFERS FROM NOVA: thread policy ``isolate`` on an SMT host with a ``cpu_dedicated_set`` is
  served by reserving whole cores (each vCPU takes a fully free core; its siblings are kept idle and
  counted as the instance's, ``CellPlacement.reserved_cpus``). Nova refuses it there: since Train
  ``isolate`` with PCPU inventory becomes a forbidden ``HW_CPU_HYPERTHREADING`` trait, so hosts with
  SMT are filtered out.
* An explicit page size of 4 KiB is treated like ``small`` (small pages, no overcommit).
* Floating vCPUs of a guest cell float over the host cell's ``shared_cpus`` minus every CPU the
  instance pins or reserves on that host cell (its dedicated vCPUs' CPUs, isolate-reserved siblings,
  the isolated emulator CPU). That only removes anything when the dedicated and shared pools overlap
  (e.g. neither ``cpu_dedicated_set`` nor ``cpu_shared_set`` configured); it keeps the dedicated
  guarantee. The emulator threads with ``share`` and no ``cpu_shared_set`` float over the union of
  the vCPUs' pins, i.e. of the reduced pools and the dedicated CPUs.
* No floating starvation. The CPUs the instance takes exclusively on a host cell leave that cell's
  shared pool for good, also for the floating vCPUs already running there (they float over every
  shared CPU, so pinning one of them shrinks their pool). So on every host cell the instance uses,
  with ``remaining`` = ``shared_cpus`` minus the instance's CPUs there (as above), a pair fits only if
  ``existing + new <= int(len(remaining) * cpu_allocation_ratio)`` and ``new <= len(remaining)`` (no
  self-overcommit, above) and, when ``existing + new > 0``,
  ``remaining`` is non-empty (``existing`` = the cell's floating vCPUs, ``CellUsage.floating_vcpus``;
  ``new`` = the guest cell's floating vCPUs). This applies to dedicated-only guest cells too: a
  dedicated vCPU, reserved sibling or isolated emulator CPU that would push the cell's existing
  floating vCPUs beyond the ratio (or leave them no CPU) makes the pair infeasible. A cell the
  instance takes no shared CPU from and puts no floating vCPU on is not checked (its pool does not
  change): an instance is never refused because a cell was over its ratio already (e.g. a lowered
  ``cpu_allocation_ratio``), only for making it worse there. Without exclusion the rule is the
  plain ``new <= CellResources.floating_capacity`` (which counts the whole shared set), so it
  changes nothing for disjoint ``cpu_dedicated_set`` / ``cpu_shared_set``.
  The CPUs excluded are those step 5 selects for the pair (deterministic, the thread policy's order),
  so the pair question stays independent and the matching exact. The fitter computes that selection
  during the pair checks only on host cells with floating vCPUs (existing or new) whose shared and
  free dedicated CPUs overlap. Deliberately simple: it does not try other CPU selections to spare
  the shared pool (e.g. free dedicated CPUs outside ``cpu_shared_set`` when the sets only partly
  overlap, or a different core), so it can answer no-fit where a different choice of CPUs on the
  same host cell would fit. "Exact" means exact for this deterministic selection.
* With an isolated emulator thread, the emulator takes the CPU the thread policy would pick after the
  vCPUs' CPUs (prefer: next thread in packing order; require: next thread of a whole free SMT core;
  isolate: first thread of the next fully free core, whose siblings are reserved too).
* vCPUs are mapped in ascending vCPU id order to the chosen CPUs sorted by (core, thread), where a
  core is ordered by its lowest CPU id and a thread by its position in the sibling group.
"""

from __future__ import annotations

import itertools
from typing import Iterator, Literal, NamedTuple, Sequence

from agent.errors import InvalidInput, InvalidRequest
from agent.numa.placement import CellPlacement, NoFit, Placement, cell_placement
from agent.numa.request import (
    EmulatorThreadsPolicy,
    GuestCell,
    InstanceRequest,
    PageSizeKind,
    ThreadPolicy,
)
from agent.numa.state import CellResources, HostState
from agent.numa.topology import SMALL_PAGE_KB

Preference = Literal["spread", "pack"]

__all__ = ["fit", "Preference", "pagesize_name"]


def pagesize_name(size_kb: int) -> str:
    """Human name of a page size: 4KiB, 2MiB, 1GiB."""
    if size_kb % (1024 * 1024) == 0:
        return f"{size_kb // (1024 * 1024)}GiB"
    if size_kb % 1024 == 0:
        return f"{size_kb // 1024}MiB"
    return f"{size_kb}KiB"


# --- per host cell CPU view ----------------------------------------------------------------------


class _HostCell:
    """What one host cell offers, derived from its CellResources. Everything but the counts the
    pair checks need is computed lazily: only matched host cells ever need their cores listed."""

    __slots__ = (
        "idx",
        "id",
        "res",
        "free",
        "n_free",
        "existing",
        "_caps",
        "_cores",
        "_shared",
        "_overlap",
        "_taken",
        "hugepage_sizes_desc",
    )

    def __init__(self, idx: int, res: CellResources, existing: int = 0) -> None:
        self.idx = idx
        self.id = res.cell.id
        self.res = res
        self.existing = existing  # floating vCPUs already on the cell (CellUsage.floating_vcpus)
        self.free = res.dedicated_cpus
        self.n_free = len(self.free)
        self._caps: tuple[int, int] | None = None
        self._cores: list[tuple[tuple[int, ...], tuple[int, ...]]] | None = None
        self._shared: tuple[int, ...] | None = None
        self._overlap: int | None = None
        self._taken: dict[int, frozenset[int]] = {}
        fp = res.free_pages
        self.hugepage_sizes_desc = tuple(sorted((s for s in fp if s != SMALL_PAGE_KB), reverse=True)) if fp else ()

    def _groups(self) -> list[tuple[int, ...]] | tuple[tuple[int, ...], ...]:
        groups = self.res.cell.siblings
        if self.n_free:
            stray = self.free.difference(*groups)  # only for hand-built topologies: 1-thread cores
            if stray:
                return sorted(list(groups) + [(c,) for c in stray])
        return groups

    @property
    def shared_sorted(self) -> tuple[int, ...]:
        if self._shared is None:
            self._shared = tuple(sorted(self.res.shared_cpus))
        return self._shared

    @property
    def overlap(self) -> int:
        """Whether a floating vCPU's shared CPUs include free dedicated CPUs: 0 = no (disjoint
        pools), 2 = every free dedicated CPU is a shared CPU too (e.g. no CPU sets configured),
        1 = some are."""
        if self._overlap is None:
            shared = self.res.shared_cpus
            if shared.isdisjoint(self.free):
                self._overlap = 0
            else:
                self._overlap = 2 if self.free <= shared else 1
        return self._overlap

    def taken(self, policy: ThreadPolicy, count: int) -> frozenset[int]:
        """Every CPU `select(policy, count)` takes: the picked CPUs and the reserved siblings.
        (The fitter uses one policy per host cell view, so `count` is the cache key.)"""
        t = self._taken.get(count)
        if t is None:
            picked, reserved = self.select(policy, count)
            t = self._taken[count] = frozenset([p[0] for p in picked]).union(reserved)
        return t

    @property
    def cores(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(sibling group, its free dedicated threads) for groups with a free thread, by first CPU."""
        if self._cores is None:
            free = self.free
            contains = free.__contains__
            self._cores = [(g, ft) for g in self._groups() if (ft := tuple(filter(contains, g)))] if free else []
        return self._cores

    def capacity(self, policy: ThreadPolicy) -> int:
        if policy is ThreadPolicy.PREFER:
            return self.n_free
        if self._caps is None:
            if not self.n_free:
                self._caps = (0, 0)
            else:
                sup = self.free.issuperset
                whole = [g for g in self._groups() if sup(g)]
                self._caps = (sum(len(g) for g in whole if len(g) >= 2), len(whole))
        return self._caps[0] if policy is ThreadPolicy.REQUIRE else self._caps[1]

    def select(self, policy: ThreadPolicy, count: int) -> tuple[list[tuple[int, int, int]], set[int]]:
        """Pick `count` CPUs under `policy`: a list of (cpu, core_first_id, thread_pos) in selection
        order, and the set of CPUs reserved (isolate siblings). Assumes capacity(policy) >= count."""
        picked: list[tuple[int, int, int]] = []
        reserved: set[int] = set()
        if count <= 0:
            return picked, reserved
        for entry, siblings in itertools.islice(self._candidates(policy), count):
            picked.append(entry)
            reserved.update(siblings)
        if len(picked) < count:  # pragma: no cover
            raise AssertionError("select() called beyond capacity")
        return picked, reserved

    def _candidates(self, policy: ThreadPolicy) -> Iterator[tuple[tuple[int, int, int], tuple[int, ...]]]:
        """((cpu, core_first_id, thread_pos), siblings it reserves) in the order `policy` picks them."""
        if policy is ThreadPolicy.PREFER:
            return self._prefer_order()
        if policy is ThreadPolicy.REQUIRE:
            return self._require_order()
        return self._isolate_order()

    def _prefer_order(self) -> Iterator[tuple[tuple[int, int, int], tuple[int, ...]]]:
        """Cores with the most free threads first (fewest cores touched), threads in core order."""
        buckets: dict[int, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        for gf in self.cores:
            buckets.setdefault(len(gf[1]), []).append(gf)
        for k in sorted(buckets, reverse=True):
            for group, ft in buckets[k]:
                for cpu in ft:
                    yield (cpu, group[0], group.index(cpu)), ()

    def _require_order(self) -> Iterator[tuple[tuple[int, int, int], tuple[int, ...]]]:
        """Every thread of whole free cores with siblings."""
        sup = self.free.issuperset
        for group in self._groups():
            if len(group) >= 2 and sup(group):
                for pos, cpu in enumerate(group):
                    yield (cpu, group[0], pos), ()

    def _isolate_order(self) -> Iterator[tuple[tuple[int, int, int], tuple[int, ...]]]:
        """The first thread of each whole free core, its siblings reserved."""
        sup = self.free.issuperset
        for group in self._groups():
            if sup(group):
                yield (group[0], group[0], 0), group[1:]


# --- per pair feasibility ------------------------------------------------------------------------


class _PairFit(NamedTuple):
    pagesize_kb: int
    small_mb: int  # small-page MiB this pair puts on the host (for reserved_memory_mb)
    free_mem_mb: int  # free MiB of the chosen page size on the host cell (for spread/pack)


class _Fitter:
    def __init__(self, request: InstanceRequest, state: HostState) -> None:
        self.request = request
        self.state = state
        self.hosts = [
            _HostCell(k, state.resources(c.id), state.cell_usage(c.id).floating_vcpus)
            for k, c in enumerate(state.topology.cells)
        ]
        self.pinned = request.is_pinned or any(g.dedicated_vcpus for g in request.cells)
        # Nova's memory overcommit: only an instance that asks for no page size at all and pins
        # nothing may use the ram_allocation_ratio pool (small_floating_mb); everything else,
        # hw:mem_page_size=small / 4 KiB / any included, gets the free small-page MiB.
        self.overcommit_ok = request.page_size is None and not self.pinned
        self.emu_isolate = request.emulator_threads is EmulatorThreadsPolicy.ISOLATE
        self.policy = request.thread_policy
        ps = request.page_size
        if (
            ps is None
            or ps.kind is PageSizeKind.SMALL
            or (ps.kind is PageSizeKind.EXPLICIT and ps.size_kb == SMALL_PAGE_KB)
        ):
            self.page_kind = PageSizeKind.SMALL
            self.page_size = SMALL_PAGE_KB
        else:
            self.page_kind = ps.kind
            self.page_size = ps.size_kb or 0

    # how many dedicated CPUs guest cell i needs from its host cell
    def cpus_needed(self, g: GuestCell) -> int:
        return len(g.dedicated_vcpus) + (1 if self.emu_isolate and g.id == self.request.cells[0].id else 0)

    def small_avail(self, h: _HostCell) -> int:
        return h.res.small_floating_mb if self.overcommit_ok else h.res.small_free_mb

    def floating_room(self, h: _HostCell, need: int) -> tuple[int, int, int]:
        """(CPUs floating vCPUs may float over on h once the instance is there, how many more
        floating vCPUs that pool accepts on top of the cell's existing ones - negative when the
        instance's own CPUs would already starve the existing ones -, how many of h's shared CPUs
        the instance itself takes there). The instance's own CPUs on h (dedicated vCPUs,
        isolate-reserved siblings, the isolated emulator CPU: exactly what `select(policy, need)`
        takes) are excluded; they can only be shared CPUs too when the dedicated and shared pools
        overlap. Without exclusion this is `floating_capacity` (clamped at 0: a cell already over its
        ratio is not the instance's doing). Assumes need <= capacity(policy)."""
        res = h.res
        overlap = h.overlap if need else 0
        if overlap:
            if overlap == 2 and self.policy is not ThreadPolicy.ISOLATE:
                excluded = need  # prefer/require take exactly `need` free CPUs, all of them shared
            else:
                excluded = len(h.taken(self.policy, need) & res.shared_cpus)
            if excluded:
                pool = len(res.shared_cpus) - excluded
                return pool, int(pool * self.state.cpu_allocation_ratio) - h.existing, excluded
        return len(res.shared_cpus), res.floating_capacity, 0

    def floating_ok(self, h: _HostCell, need: int, n_float: int) -> bool:
        """The no-starvation rule (module doc): after the instance takes its CPUs on h, the rest of
        h's shared pool holds the existing floating vCPUs plus the guest cell's `n_float`."""
        if not (n_float or (need and h.existing)):
            return True  # fast path: nothing would float on h, or the instance takes no CPU there
        pool, room, _ = self.floating_room(h, need)
        # room < 0 only when the instance shrinks the pool below what already floats there
        # (that includes an emptied pool: int(0 * ratio) - existing < 0); n_float <= pool: an
        # instance cannot overcommit against itself (module doc), whatever cpu_allocation_ratio
        return n_float <= room and n_float <= pool

    def small_fits(self, h: _HostCell, mem: int) -> bool:
        """Small-page memory: within the pool the instance may use, and never more than the host
        cell has in all (an instance cannot overcommit against itself, whatever ram_allocation_ratio)."""
        return mem <= self.small_avail(h) and mem <= h.res.small_total_mb

    def _huge_ok(self, h: _HostCell, size: int, mem_kb: int) -> bool:
        free = h.res.free_pages.get(size)
        return free is not None and mem_kb % size == 0 and free * size >= mem_kb

    def memory(self, g: GuestCell, h: _HostCell) -> _PairFit | None:
        mem = g.memory_mb
        kind = self.page_kind
        if kind is PageSizeKind.SMALL:
            return _PairFit(SMALL_PAGE_KB, mem, self.small_avail(h)) if self.small_fits(h, mem) else None
        mem_kb = mem * 1024
        if kind is PageSizeKind.EXPLICIT:
            size = self.page_size
            if self._huge_ok(h, size, mem_kb):
                return _PairFit(size, 0, h.res.free_pages[size] * size // 1024)
            return None
        for size in h.hugepage_sizes_desc:
            if self._huge_ok(h, size, mem_kb):
                return _PairFit(size, 0, h.res.free_pages[size] * size // 1024)
        if kind is PageSizeKind.ANY and self.small_fits(h, mem):
            return _PairFit(SMALL_PAGE_KB, mem, self.small_avail(h))
        return None

    def pair(self, g: GuestCell, h: _HostCell) -> _PairFit | None:
        need = self.cpus_needed(g)
        if need > h.capacity(self.policy):
            return None
        if not self.floating_ok(h, need, len(g.vcpus) - len(g.dedicated_vcpus)):
            return None
        return self.memory(g, h)

    def pair_reasons(self, g: GuestCell, h: _HostCell) -> list[str]:
        """Why guest cell g does not fit host cell h (empty if it does)."""
        out: list[str] = []
        gid = g.id
        need = self.cpus_needed(g)
        emu = " + 1 isolated emulator CPU" if need != len(g.dedicated_vcpus) else ""
        cap = h.capacity(self.policy)
        if need > cap:
            nd = len(g.dedicated_vcpus)
            if self.policy is ThreadPolicy.PREFER:
                out.append(f"{cap} free dedicated CPUs < {nd} vCPUs{emu} of guest cell {gid}")
            elif self.policy is ThreadPolicy.REQUIRE:
                if not any(len(grp) >= 2 for grp in h.res.cell.siblings):
                    out.append(f"no SMT siblings (thread policy require) for {nd} vCPUs{emu} of guest cell {gid}")
                else:
                    out.append(
                        f"{cap} free threads on whole free SMT cores < {nd} vCPUs{emu} of guest cell {gid}"
                        " (thread policy require)"
                    )
            else:
                out.append(f"{cap} fully free cores < {nd} vCPUs{emu} of guest cell {gid} (thread policy isolate)")
        n_float = len(g.vcpus) - len(g.dedicated_vcpus)
        ratio = self.state.cpu_allocation_ratio
        if n_float > 0:
            # the instance's own CPUs can be excluded only where its dedicated CPUs fit at all
            out.extend(self._floating_reasons(gid, h, n_float, need if need <= cap else 0))
        elif need <= cap and h.existing and not self.floating_ok(h, need, 0):
            pool, room, excluded = self.floating_room(h, need)
            left = (
                f"only {pool} shared CPUs (room for {int(pool * ratio)} floating vCPUs at "
                f"cpu_allocation_ratio {ratio:g})"
                if pool
                else "no shared CPU"
            )
            out.append(
                f"the {excluded} shared CPUs guest cell {gid} would pin there leave {left} to the "
                f"{h.existing} floating vCPUs already on the cell"
            )
        if self.memory(g, h) is None:
            out.append(self._memory_reason(g, h))
        return out

    def _floating_reasons(self, gid: int, h: _HostCell, n_float: int, need: int) -> list[str]:
        """Why the `n_float` floating vCPUs of guest cell `gid` do not fit h (empty if they do)."""
        pool, room, excluded = self.floating_room(h, need)
        own = f" once the {excluded} CPUs the instance pins there are excluded" if excluded else ""
        there = f", {h.existing} floating vCPUs already there" if excluded and h.existing else ""
        if not pool:
            left = " left" if excluded else ""
            return [f"no shared CPUs{left} for {n_float} floating vCPUs of guest cell {gid}{own}"]
        if n_float > room:
            return [
                f"room for {max(0, room)} more floating vCPUs (cpu_allocation_ratio "
                f"{self.state.cpu_allocation_ratio:g}{own}{there}) < {n_float} of guest cell {gid}"
            ]
        if n_float > pool:  # what the ratio would allow, but not on fewer CPUs
            return [
                f"{n_float} floating vCPUs of guest cell {gid} > the {pool} shared CPUs they would float"
                f" over{own} (an instance cannot overcommit against itself)"
            ]
        return []

    def _memory_reason(self, g: GuestCell, h: _HostCell) -> str:
        mem = g.memory_mb
        mem_kb = mem * 1024
        gid = g.id
        parts: list[str] = []

        def huge(size: int) -> str:
            name = pagesize_name(size)
            if size not in h.res.free_pages:
                return f"no {name} pages"
            if mem_kb % size:
                return f"{mem} MiB of guest cell {gid} is not a multiple of {name}"
            need = mem_kb // size
            return f"{name} pages: {h.res.free_pages[size]} free < {need} needed by guest cell {gid}"

        def small() -> str:
            if mem <= self.small_avail(h):  # what the ratio would allow, but more than the cell has
                return (
                    f"{mem} MiB of guest cell {gid} > the cell's {h.res.small_total_mb} MiB of small-page memory"
                    " (an instance cannot overcommit against itself)"
                )
            what = "small-page MiB (ram_allocation_ratio applied)" if self.overcommit_ok else "free small-page MiB"
            return f"{self.small_avail(h)} {what} < {mem} MiB of guest cell {gid}"

        kind = self.page_kind
        if kind is PageSizeKind.SMALL:
            return small()
        if kind is PageSizeKind.EXPLICIT:
            return huge(self.page_size)
        if not h.hugepage_sizes_desc:
            parts.append(f"no hugepages for guest cell {gid}")
        else:
            parts.extend(huge(s) for s in h.hugepage_sizes_desc)
        if kind is PageSizeKind.ANY:
            parts.append(small())
        return "; ".join(parts)


# --- matching ------------------------------------------------------------------------------------


def _kuhn(adj: Sequence[Sequence[int]], m: int) -> tuple[list[int], list[int]]:
    """Maximum bipartite matching. Returns (match_of_guest, match_of_host) with -1 for unmatched."""
    n = len(adj)
    mg = [-1] * n
    mh = [-1] * m

    def augment(i: int, seen: list[bool]) -> bool:
        for j in adj[i]:
            if not seen[j]:
                seen[j] = True
                if mh[j] < 0 or augment(mh[j], seen):
                    mg[i] = j
                    mh[j] = i
                    return True
        return False

    for i in range(n):
        augment(i, [False] * m)
    return mg, mh


def _hall_violator(adj: Sequence[Sequence[int]], mg: list[int], mh: list[int]) -> tuple[list[int], list[int]]:
    """From an unmatched guest cell, the guest cells and host cells reachable by alternating paths:
    |guests| > |hosts| and the guests only fit those hosts (König/Hall)."""
    start = mg.index(-1)
    guests = {start}
    hosts: set[int] = set()
    stack = [start]
    while stack:
        i = stack.pop()
        for j in adj[i]:
            if j not in hosts:
                hosts.add(j)
                k = mh[j]
                if k >= 0 and k not in guests:
                    guests.add(k)
                    stack.append(k)
    return sorted(guests), sorted(hosts)


def _hungarian(cost: Sequence[Sequence[int]], m: int) -> list[int]:
    """Min-cost assignment of n rows to distinct columns of an n x m integer matrix (n <= m).
    Returns the column of each row. Classic O(n^2 m) potentials algorithm."""
    n = len(cost)
    u: list[float] = [0] * (n + 1)  # potentials: they meet `inf` only if a row had no column at all
    v: list[float] = [0] * (m + 1)
    p = [0] * (m + 1)  # p[j]: row (1-based) assigned to column j
    way = [0] * (m + 1)
    for i in range(1, n + 1):
        p[0] = i
        j0 = _free_column(cost, m, u, v, p, way)
        while j0:  # augment along the path back to column 0
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    out = [-1] * n
    for j in range(1, m + 1):
        if p[j]:
            out[p[j] - 1] = j - 1
    return out


def _free_column(
    cost: Sequence[Sequence[int]], m: int, u: list[float], v: list[float], p: list[int], way: list[int]
) -> int:
    """Grow the shortest alternating path from row p[0] (updating the potentials u, v and the path
    links `way`) until it reaches an unassigned column; return that column."""
    inf = float("inf")
    j0 = 0
    minv = [inf] * (m + 1)
    used = [False] * (m + 1)
    while True:
        used[j0] = True
        row, ui0 = cost[p[j0] - 1], u[p[j0]]
        delta, j1 = inf, 0
        for j in range(1, m + 1):
            if not used[j]:
                cur = row[j - 1] - ui0 - v[j]
                if cur < minv[j]:
                    minv[j] = cur
                    way[j] = j0
                if minv[j] < delta:
                    delta, j1 = minv[j], j
        for j in range(m + 1):
            if used[j]:
                u[p[j]] += delta
                v[j] -= delta
            else:
                minv[j] -= delta
        j0 = j1
        if p[j0] == 0:
            return j0


def _join_ids(ids: Sequence[int]) -> str:
    s = [str(x) for x in ids]
    if len(s) == 1:
        return s[0]
    return ", ".join(s[:-1]) + " and " + s[-1]


# --- entry point ---------------------------------------------------------------------------------


def _validate(request: InstanceRequest) -> None:
    if not request.cells:
        raise InvalidRequest("instance request has no guest NUMA cells", ("hw:numa_nodes",))
    seen: set[int] = set()
    for k, g in enumerate(request.cells):
        if g.id != k:
            raise InvalidRequest(f"guest cell ids must be 0..{len(request.cells) - 1} in order", ("hw:numa_nodes",))
        if g.vcpus & seen:
            raise InvalidRequest(f"vCPUs {sorted(g.vcpus & seen)} are in two guest cells", ("hw:numa_cpus",))
        seen |= g.vcpus
        if not g.dedicated_vcpus <= g.vcpus:
            raise InvalidRequest(f"guest cell {k}: dedicated vCPUs not among its vCPUs", ("hw:cpu_dedicated_mask",))
        if g.memory_mb < 0:
            raise InvalidRequest(f"guest cell {k}: negative memory", ("hw:numa_mem",))
    ps = request.page_size
    if ps is not None and ps.kind is PageSizeKind.EXPLICIT and (ps.size_kb or 0) <= 0:
        raise InvalidRequest("page size must be a positive number of KiB", ("hw:mem_page_size",))


def fit(request: InstanceRequest, state: HostState, *, preference: Preference = "spread") -> Placement | NoFit:
    """Place `request` on `state`, or say per host cell why it cannot be placed."""
    if preference not in ("spread", "pack"):
        raise InvalidInput(f"preference must be 'spread' or 'pack', not {preference!r}")
    _validate(request)
    f = _Fitter(request, state)
    guests = request.cells
    hosts = f.hosts
    n, m = len(guests), len(hosts)

    pairs = _pairs(f)
    adj = [[j for j in range(m) if pairs[i][j] is not None] for i in range(n)]
    if n > m or any(not a for a in adj):
        return _no_fit(f, pairs, None)
    mg, mh = _kuhn(adj, m)
    if -1 in mg:
        return _no_fit(f, pairs, _hall_violator(adj, mg, mh))

    small_pool, budget = _small_page_budget(f)
    pref, max_pref = _preference(f, pairs, adj, preference)
    infeasible = max_pref * (n + 1)
    assign = _hungarian(
        [[pref[i][j] if pairs[i][j] is not None else infeasible for j in range(m)] for i in range(n)], m
    )
    if _small_mb(pairs, assign) > budget:
        # minimise small-page MiB first, preference second (exact for the budget constraint)
        if f.page_kind is PageSizeKind.ANY:
            assign = _hungarian(_small_first_costs(f, pairs, pref, max_pref), m)
        used = _small_mb(pairs, assign)
        if used > budget:
            return _reserved_no_fit(f, pairs, used, small_pool, budget)
    return _build(f, assign, pairs)


def _pairs(f: _Fitter) -> list[list[_PairFit | None]]:
    """Per-pair feasibility: pairs[i][j] = how guest cell i fits host cell j (None: it does not).
    Guest cells with the same shape (CPUs needed, floating vCPUs, memory) share one row."""
    rows: dict[tuple[int, int, int], list[_PairFit | None]] = {}
    pairs: list[list[_PairFit | None]] = []
    for g in f.request.cells:
        shape = (f.cpus_needed(g), len(g.vcpus) - len(g.dedicated_vcpus), g.memory_mb)
        row = rows.get(shape)
        if row is None:
            row = rows[shape] = [f.pair(g, h) for h in f.hosts]
        pairs.append(row)
    return pairs


def _small_page_budget(f: _Fitter) -> tuple[int, int]:
    """(small-page pool, what the instance may take of it) at host level: reserved_memory_mb and
    unbound_memory_mb come off the pool (clamped at 0: an instance that puts no small-page memory
    on the host is never blocked by it)."""
    if f.overcommit_ok:
        small_pool = sum(h.res.small_floating_mb for h in f.hosts)
    else:
        small_pool = sum(h.res.small_free_mb for h in f.hosts)
    return small_pool, max(0, small_pool - f.state.reserved_memory_mb - f.state.unbound_memory_mb)


def _preference(
    f: _Fitter, pairs: list[list[_PairFit | None]], adj: list[list[int]], preference: Preference
) -> tuple[list[list[int]], int]:
    """(preference cost of each feasible pair, a bound above any entry). Pairs rank by (free
    dedicated CPUs, free MiB of the chosen page size); floating-only instances rank by floating
    capacity instead of free dedicated CPUs."""
    n, m = len(pairs), len(f.hosts)
    cpu_free = [h.n_free if f.pinned else h.res.floating_capacity for h in f.hosts]
    free_mem = {(i, j): _pair(pairs, i, j).free_mem_mb for i in range(n) for j in adj[i]}
    keys = sorted({(cpu_free[j], free_mem[i, j]) for i, j in free_mem})
    rank = {k: r for r, k in enumerate(keys)}
    top = len(keys) - 1
    # tie break, below one rank step: lower host cell ids first, then guest cells in host-id order
    # (minimising sum (n-1-i)*j over a fixed set of host cells pairs them in ascending order)
    k_id = n * n * m + 1
    w = n * (m * k_id + n * m) + 1
    pref = [[0] * m for _ in range(n)]
    for (i, j), mem in free_mem.items():
        r = rank[(cpu_free[j], mem)]
        r = top - r if preference == "spread" else r
        pref[i][j] = r * w + j * k_id + (n - 1 - i) * j
    return pref, (top + 1) * w


def _small_first_costs(
    f: _Fitter, pairs: list[list[_PairFit | None]], pref: list[list[int]], max_pref: int
) -> list[list[int]]:
    """Costs that order assignments by small-page MiB first, preference second."""
    n, m = len(pairs), len(f.hosts)
    big = max_pref * (n + 1)
    infeasible = big * (sum(g.memory_mb for g in f.request.cells) + 2)
    return [
        [big * pf.small_mb + pref[i][j] if (pf := pairs[i][j]) is not None else infeasible for j in range(m)]
        for i in range(n)
    ]


def _pair(pairs: list[list[_PairFit | None]], i: int, j: int) -> _PairFit:
    pf = pairs[i][j]
    assert pf is not None  # callers only ask for feasible pairs
    return pf


def _small_mb(pairs: list[list[_PairFit | None]], assign: list[int]) -> int:
    """Small-page MiB an assignment puts on the host."""
    return sum(_pair(pairs, i, j).small_mb for i, j in enumerate(assign))


def _build(f: _Fitter, assign: list[int], pairs: list[list[_PairFit | None]]) -> Placement:
    request, state = f.request, f.state
    cells: list[CellPlacement] = []
    emulator: tuple[int, ...] = ()
    all_pins: set[int] = set()
    for i, g in enumerate(request.cells):
        h = f.hosts[assign[i]]
        pf = pairs[i][assign[i]]
        assert pf is not None
        need = f.cpus_needed(g)
        picked, reserved = h.select(f.policy, need)
        mine = {p[0] for p in picked}.union(reserved)  # every CPU the instance takes on h
        if need != len(g.dedicated_vcpus):  # guest cell 0 with an isolated emulator thread
            emulator = (picked[-1][0],)
            picked = picked[:-1]
        picked.sort(key=lambda t: (t[1], t[2]))
        pins: dict[int, tuple[int, ...]] = {}
        for v, (cpu, _, _) in zip(sorted(g.dedicated_vcpus), picked, strict=False):
            pins[v] = (cpu,)
            all_pins.add(cpu)
        floating = g.floating_vcpus
        if floating:
            shared = h.shared_sorted
            if h.overlap and not mine.isdisjoint(h.res.shared_cpus):
                shared = tuple(c for c in shared if c not in mine)
            for v in floating:
                pins[v] = shared
            all_pins.update(shared)
        cells.append(
            cell_placement(g.id, h.id, g.vcpus, pins, g.memory_mb, pf.pagesize_kb, g.dedicated_vcpus, reserved)
        )
    if f.emu_isolate:
        return Placement(cells=tuple(cells), emulator_pins=emulator, emulator_isolated=True)
    if state.cpu_shared_set:
        emulator = tuple(sorted(state.cpu_shared_set))
    else:
        emulator = tuple(sorted(all_pins))
    return Placement(cells=tuple(cells), emulator_pins=emulator, emulator_isolated=False)


def _cell_lines(f: _Fitter, pairs: list[list[_PairFit | None]]) -> dict[int, str]:
    out: dict[int, str] = {}
    for j, h in enumerate(f.hosts):
        reasons: list[str] = []
        fits: list[int] = []
        for i, g in enumerate(f.request.cells):
            if pairs[i][j] is None:
                reasons.extend(f.pair_reasons(g, h))
            else:
                fits.append(g.id)
        line = "; ".join(reasons)
        if fits:
            ok = f"guest cell{'s' if len(fits) > 1 else ''} {_join_ids(fits)} would fit"
            line = f"{line}; {ok}" if line else ok
        out[h.id] = f"host cell {h.id}: {line}"
    return out


def _no_fit(f: _Fitter, pairs: list[list[_PairFit | None]], violator: tuple[list[int], list[int]] | None) -> NoFit:
    cell_reasons = _cell_lines(f, pairs)
    lines = list(cell_reasons.values())
    n, m = len(f.request.cells), len(f.hosts)
    if m == 0:
        lines.append("the host has no NUMA cells")
    elif n > m:
        lines.append(f"{n} guest cells need distinct host cells but the host has only {m}")
    nowhere = [g.id for i, g in enumerate(f.request.cells) if all(p is None for p in pairs[i])]
    if nowhere and m:
        lines.append(
            f"guest cell{'s' if len(nowhere) > 1 else ''} {_join_ids(nowhere)} "
            f"fit{'s' if len(nowhere) == 1 else ''} no host cell"
        )
    if violator is not None:
        gs, hs = violator
        host_ids = [f.hosts[j].id for j in hs]
        lines.append(
            f"guest cells {_join_ids(gs)} {'both' if len(gs) == 2 else 'all'} only fit host "
            f"cell{'s' if len(host_ids) > 1 else ''} {_join_ids(host_ids)}"
        )
    return NoFit(reason="\n".join(lines), cell_reasons=cell_reasons)


def _reserved_no_fit(f: _Fitter, pairs: list[list[_PairFit | None]], used: int, pool: int, budget: int) -> NoFit:
    cell_reasons = _cell_lines(f, pairs)
    lines = list(cell_reasons.values())
    what = "small-page (ram_allocation_ratio applied)" if f.overcommit_ok else "free small-page"
    state = f.state
    taken = f"{state.reserved_memory_mb} MiB of which is reserved (reserved_memory_mb)"
    if state.unbound_memory_mb:
        taken += f" and {state.unbound_memory_mb} MiB used by domains not bound to any cell (unbound_memory_mb)"
    lines.append(
        f"every guest cell fits a host cell, but the instance needs at least {used} MiB of small-page "
        f"memory and the host has {pool} MiB {what} memory, {taken}"
    )
    return NoFit(reason="\n".join(lines), cell_reasons=cell_reasons)
