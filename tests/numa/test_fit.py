"""Tests of agent.numa.fit: one test per rule, property tests against an independent validator and a
brute-force search, and the shared benchmark scenarios."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import InvalidHostState, InvalidRequest
from agent.numa.fit import fit
from agent.numa.placement import NoFit, Placement
from agent.numa.request import (
    CpuPolicy,
    EmulatorThreadsPolicy,
    GuestCell,
    InstanceRequest,
    PageSizeKind,
    PageSizeWish,
    ThreadPolicy,
)
from agent.numa.state import HostState
from agent.testing.builders import FIT_SCENARIOS, fit_scenarios
from agent.testing.builders import cells_request as req
from agent.testing.builders import host_state as host
from agent.testing.builders import state_cell as cell
from tests.numa.placement_check import brute_force_fits, check_placement

GiB_KB = 1048576


# --- fits checked against the independent validator ---------------------------------------------


def placed(request: InstanceRequest, state: HostState, **kw: Any) -> Placement:
    result = fit(request, state, **kw)
    assert isinstance(result, Placement), getattr(result, "reason", result)
    check_placement(request, state, result)
    json.dumps(result.to_json())
    return result


def nofit(request: InstanceRequest, state: HostState, **kw: Any) -> NoFit:
    result = fit(request, state, **kw)
    assert isinstance(result, NoFit), result
    assert result.reason
    assert set(result.cell_reasons) == {c.id for c in state.topology.cells}
    assert result.to_json()["fits"] is False
    assert not brute_force_fits(request, state)
    return result


def pins(p: Placement, guest: int = 0) -> list[int]:
    c = p.cell_for_guest(guest)
    return [c.cpu_pins[v][0] for v in sorted(c.dedicated_vcpus)]


P2M = PageSizeWish(PageSizeKind.EXPLICIT, 2048)
P1G = PageSizeWish(PageSizeKind.EXPLICIT, GiB_KB)
LARGE = PageSizeWish(PageSizeKind.LARGE)
ANY = PageSizeWish(PageSizeKind.ANY)
SMALL = PageSizeWish(PageSizeKind.SMALL)

SMT8 = list(range(8))  # siblings [0,4] [1,5] [2,6] [3,7]


# --- thread policies -----------------------------------------------------------------------------


def test_prefer_packs_sibling_threads_on_smt():
    st_ = host(cell(0, SMT8, smt=True, pinned=[0]))
    p = placed(req((3, 1024)), st_)
    # fully free cores [1,5] and [2,6] first (most free threads), then sorted by (core, thread)
    assert pins(p) == [1, 5, 2]
    assert p.cells[0].reserved_cpus == frozenset()


def test_prefer_uses_partial_cores_when_needed():
    st_ = host(cell(0, SMT8, smt=True, pinned=[0, 1, 2]))
    p = placed(req((3, 1024)), st_)
    # whole core [3,7] is picked first, then the lowest half-free core [0,4] -> 4; mapped by (core, thread)
    assert pins(p) == [4, 3, 7]


def test_prefer_non_smt_lowest_ids():
    st_ = host(cell(0, [0, 1, 2, 3], pinned=[1]))
    assert pins(placed(req((2, 1024)), st_)) == [0, 2]
    nofit(req((4, 1024)), st_)


def test_require_uses_whole_free_smt_cores():
    st_ = host(cell(0, SMT8, smt=True, pinned=[0]))
    p = placed(req((3, 1024), threads=ThreadPolicy.REQUIRE), st_)
    assert pins(p) == [1, 5, 2]  # 6 (rest of the trailing core) stays free
    assert p.cells[0].reserved_cpus == frozenset()
    # 6 threads on whole free cores; the half-free core [0,4] does not count
    placed(req((6, 1024), threads=ThreadPolicy.REQUIRE), st_)
    r = nofit(req((7, 1024), threads=ThreadPolicy.REQUIRE), st_)
    assert "6 free threads on whole free SMT cores < 7 vCPUs" in r.reason


def test_require_fails_without_smt():
    st_ = host(cell(0, list(range(8))))
    r = nofit(req((2, 1024), threads=ThreadPolicy.REQUIRE), st_)
    assert "no SMT" in r.cell_reasons[0]


def test_isolate_reserves_siblings():
    st_ = host(cell(0, SMT8, smt=True, pinned=[0]))
    p = placed(req((2, 1024), threads=ThreadPolicy.ISOLATE), st_)
    assert pins(p) == [1, 2]
    assert p.cells[0].reserved_cpus == frozenset({5, 6})
    assert p.pinned_cpus == frozenset({1, 2, 5, 6})
    placed(req((3, 1024), threads=ThreadPolicy.ISOLATE), st_)
    r = nofit(req((4, 1024), threads=ThreadPolicy.ISOLATE), st_)
    assert "3 fully free cores < 4 vCPUs" in r.reason


def test_isolate_non_smt_takes_plain_cpus():
    st_ = host(cell(0, [0, 1, 2, 3], pinned=[0]))
    p = placed(req((3, 1024), threads=ThreadPolicy.ISOLATE), st_)
    assert pins(p) == [1, 2, 3]
    assert p.cells[0].reserved_cpus == frozenset()


def test_isolate_core_with_sibling_outside_dedicated_set_is_not_fully_free():
    st_ = host(cell(0, SMT8, smt=True), cpu_dedicated_set=[0, 1, 2, 3, 5, 6, 7], cpu_shared_set=[4])
    p = placed(req((3, 1024), threads=ThreadPolicy.ISOLATE), st_)
    assert pins(p) == [1, 2, 3]  # core [0,4] is not fully free: 4 is a shared CPU
    nofit(req((4, 1024), threads=ThreadPolicy.ISOLATE), st_)


# --- emulator threads ----------------------------------------------------------------------------


def test_emulator_isolate_prefer_takes_one_more_cpu():
    st_ = host(cell(0, [0, 1, 2, 3]))
    p = placed(req((2, 1024), emulator=EmulatorThreadsPolicy.ISOLATE), st_)
    assert pins(p) == [0, 1]
    assert p.emulator_pins == (2,) and p.emulator_isolated
    assert p.pinned_cpus == frozenset({0, 1, 2})
    placed(req((3, 1024), emulator=EmulatorThreadsPolicy.ISOLATE), st_)
    r = nofit(req((4, 1024), emulator=EmulatorThreadsPolicy.ISOLATE), st_)
    assert "isolated emulator" in r.reason


def test_emulator_isolate_with_thread_isolate_reserves_its_siblings():
    st_ = host(cell(0, SMT8, smt=True))
    p = placed(req((2, 1024), threads=ThreadPolicy.ISOLATE, emulator=EmulatorThreadsPolicy.ISOLATE), st_)
    assert pins(p) == [0, 1]
    assert p.emulator_pins == (2,)
    assert p.cells[0].reserved_cpus == frozenset({4, 5, 6})
    nofit(req((4, 1024), threads=ThreadPolicy.ISOLATE, emulator=EmulatorThreadsPolicy.ISOLATE), st_)


def test_emulator_isolate_with_require_takes_a_thread_of_a_whole_core():
    st_ = host(cell(0, SMT8, smt=True, pinned=[1]))
    p = placed(req((2, 1024), threads=ThreadPolicy.REQUIRE, emulator=EmulatorThreadsPolicy.ISOLATE), st_)
    assert pins(p) == [0, 4] and p.emulator_pins == (2,)
    placed(req((5, 1024), threads=ThreadPolicy.REQUIRE, emulator=EmulatorThreadsPolicy.ISOLATE), st_)
    nofit(req((6, 1024), threads=ThreadPolicy.REQUIRE, emulator=EmulatorThreadsPolicy.ISOLATE), st_)


def test_emulator_isolate_counts_on_guest_cell_0_host_cell():
    # guest cell 0 needs 2+1 CPUs: only host cell 1 has 3; guest cell 1 (2 vCPUs) goes to host cell 0
    st_ = host(cell(0, [0, 1]), cell(1, [2, 3, 4]))
    p = placed(req((2, 1024), (2, 1024), emulator=EmulatorThreadsPolicy.ISOLATE), st_)
    assert p.cell_for_guest(0).host_cell == 1 and p.emulator_pins == (4,)
    assert p.cell_for_guest(1).host_cell == 0


def test_emulator_share_uses_shared_set_or_vcpu_pins():
    st_ = host(cell(0, [0, 1, 2, 3]), cell(1, [4, 5, 6, 7]))
    p = placed(req((2, 1024)), st_)
    assert not p.emulator_isolated and p.emulator_pins == tuple(sorted(pins(p)))
    st2 = host(
        cell(0, [0, 1, 2, 3]), cell(1, [4, 5, 6, 7]), cpu_dedicated_set=[1, 2, 3, 5, 6, 7], cpu_shared_set=[0, 4]
    )
    p2 = placed(req((2, 1024)), st2)
    assert p2.emulator_pins == (0, 4)


# --- CPU sets and floating vCPUs -------------------------------------------------------------------


def test_dedicated_and_shared_sets():
    st_ = host(cell(0, [0, 1, 2, 3]), cpu_dedicated_set=[2, 3], cpu_shared_set=[0, 1])
    p = placed(req((3, 1024, 2), policy=CpuPolicy.MIXED), st_)
    c = p.cells[0]
    assert [c.cpu_pins[0], c.cpu_pins[1], c.cpu_pins[2]] == [(2,), (3,), (0, 1)]
    assert c.dedicated_vcpus == frozenset({0, 1})
    nofit(req((3, 1024)), st_)  # only 2 CPUs in the dedicated set


def test_mixed_floating_vcpus_exclude_own_dedicated_cpus():
    # no cpu_dedicated_set / cpu_shared_set: the pools overlap; floating vCPUs must not float over the
    # CPUs the instance pinned to its dedicated vCPUs
    st_ = host(cell(0, [0, 1, 2, 3]))
    p = placed(req((3, 1024, 2), policy=CpuPolicy.MIXED), st_)
    c = p.cells[0]
    assert [c.cpu_pins[0], c.cpu_pins[1], c.cpu_pins[2]] == [(0,), (1,), (2, 3)]
    assert p.emulator_pins == (0, 1, 2, 3)  # share, no cpu_shared_set: union of the vCPU pins
    # other CPUs pinned already (by other instances) are gone from both pools anyway
    p = placed(req((3, 1024, 1), policy=CpuPolicy.MIXED), host(cell(0, [0, 1, 2, 3], pinned=[0])))
    assert p.cells[0].cpu_pins[0] == (1,) and p.cells[0].cpu_pins[1] == (2, 3)


def test_mixed_floating_vcpus_exclude_reserved_siblings_and_emulator():
    st_ = host(cell(0, SMT8, smt=True))
    p = placed(req((3, 1024, 1), policy=CpuPolicy.MIXED, threads=ThreadPolicy.ISOLATE), st_)
    c = p.cells[0]
    assert pins(p) == [0] and c.reserved_cpus == frozenset({4})
    assert c.cpu_pins[1] == c.cpu_pins[2] == (1, 2, 3, 5, 6, 7)
    p = placed(
        req((3, 1024, 1), policy=CpuPolicy.MIXED, threads=ThreadPolicy.ISOLATE, emulator=EmulatorThreadsPolicy.ISOLATE),
        st_,
    )
    c = p.cells[0]
    assert pins(p) == [0] and p.emulator_pins == (1,) and c.reserved_cpus == frozenset({4, 5})
    assert c.cpu_pins[1] == (2, 3, 6, 7)
    # emulator isolate only: guest cell 0 pins the emulator CPU, its floating vCPUs avoid it
    p = placed(
        req((3, 1024, 2), policy=CpuPolicy.MIXED, emulator=EmulatorThreadsPolicy.ISOLATE), host(cell(0, [0, 1, 2, 3]))
    )
    assert pins(p) == [0, 1] and p.emulator_pins == (2,) and p.cells[0].cpu_pins[2] == (3,)


def test_mixed_floating_capacity_counts_the_reduced_pool():
    # 4 CPUs, ratio 1.0: the whole shared set would take 4 floating vCPUs, minus 2 dedicated only 2
    st_ = host(cell(0, [0, 1, 2, 3]), cpu_allocation_ratio=1.0)
    placed(req((4, 1024, 2), policy=CpuPolicy.MIXED), st_)
    r = nofit(req((5, 1024, 2), policy=CpuPolicy.MIXED), st_)
    assert "room for 2 more floating vCPUs (cpu_allocation_ratio 1 once the 2 CPUs the instance pins there" in r.reason
    # existing floating vCPUs of the cell count against the reduced pool: int(2 * 4.0) - 7 = 1
    st2 = host(cell(0, [0, 1, 2, 3], floating_vcpus=7), cpu_allocation_ratio=4.0)
    placed(req((3, 1024, 2), policy=CpuPolicy.MIXED), st2)
    nofit(req((4, 1024, 2), policy=CpuPolicy.MIXED), st2)
    # with an existing load above the reduced capacity nothing floating fits (whole set: 16 - 9 = 7)
    st3 = host(cell(0, [0, 1, 2, 3], floating_vcpus=9), cpu_allocation_ratio=4.0)
    r = nofit(req((3, 1024, 2), policy=CpuPolicy.MIXED), st3)
    assert "room for 0 more floating vCPUs" in r.reason
    placed(req((3, 1024), policy=CpuPolicy.SHARED), st3)  # no exclusion for a floating-only instance


def test_mixed_floating_needs_a_cpu_left_after_exclusion():
    # all 4 CPUs go to dedicated vCPUs: no CPU left for the floating one (before: it floated over them)
    st_ = host(cell(0, [0, 1, 2, 3]))
    r = nofit(req((5, 1024, 4), policy=CpuPolicy.MIXED), st_)
    assert "no shared CPUs left for 1 floating vCPUs of guest cell 0" in r.reason
    placed(req((4, 1024, 3), policy=CpuPolicy.MIXED), st_)
    # the isolated emulator CPU counts too
    nofit(req((4, 1024, 3), policy=CpuPolicy.MIXED, emulator=EmulatorThreadsPolicy.ISOLATE), st_)
    # and so do isolate-reserved siblings: 2 cores, 1 dedicated vCPU takes a whole core
    st2 = host(cell(0, [0, 1, 2, 3], smt=True), cpu_allocation_ratio=1.0)
    placed(req((3, 1024, 1), policy=CpuPolicy.MIXED, threads=ThreadPolicy.ISOLATE), st2)
    nofit(req((4, 1024, 1), policy=CpuPolicy.MIXED, threads=ThreadPolicy.ISOLATE), st2)
    placed(req((4, 1024, 1), policy=CpuPolicy.MIXED, threads=ThreadPolicy.PREFER), st2)


def test_mixed_exclusion_partial_overlap_of_configured_sets():
    # dedicated set 0-3, shared set 2-5: only 2 and 3 are in both pools
    st_ = host(
        cell(0, list(range(6))), cpu_dedicated_set=[0, 1, 2, 3], cpu_shared_set=[2, 3, 4, 5], cpu_allocation_ratio=1.0
    )
    p = placed(req((4, 1024, 3), policy=CpuPolicy.MIXED), st_)
    assert pins(p) == [0, 1, 2] and p.cells[0].cpu_pins[3] == (3, 4, 5)
    nofit(req((7, 1024, 3), policy=CpuPolicy.MIXED), st_)  # 4 floating > 3 left
    # disjoint sets: nothing to exclude
    st2 = host(cell(0, list(range(6))), cpu_dedicated_set=[0, 1, 2], cpu_shared_set=[3, 4, 5], cpu_allocation_ratio=1.0)
    p = placed(req((6, 1024, 3), policy=CpuPolicy.MIXED), st2)
    assert p.cells[0].cpu_pins[3] == (3, 4, 5)


def test_mixed_exclusion_decides_the_matching():
    # guest cell 0 (2 dedicated + 3 floating) fits host cell 0 only under the old rule (4 shared CPUs);
    # with its own 2 CPUs excluded, 2 remain (ratio 1.0) < 3: it must take host cell 1, and guest
    # cell 1 (3 dedicated + 1 floating: 1 CPU left, enough) host cell 0, against the tie break (the
    # assignment costs are equal; lower host cell ids go to lower guest cells).
    st_ = host(cell(0, [0, 1, 2, 3]), cell(1, list(range(4, 10))), cpu_allocation_ratio=1.0)
    r = req((5, 1024, 2), (4, 1024, 3), policy=CpuPolicy.MIXED)
    for pref in ("spread", "pack"):
        p = placed(r, st_, preference=pref)
        assert p.cell_for_guest(0).host_cell == 1 and p.cell_for_guest(1).host_cell == 0
        assert p.cell_for_guest(0).cpu_pins[4] == (6, 7, 8, 9)
        assert p.cell_for_guest(1).cpu_pins[8] == (3,)
    # with host cell 1 too small for guest cell 0 as well, nothing fits
    small = host(cell(0, [0, 1, 2, 3]), cell(1, [4, 5, 6, 7]), cpu_allocation_ratio=1.0)
    r2 = nofit(r, small)
    assert "guest cell 0 fits no host cell" in r2.reason


# --- no floating starvation: the instance's CPUs must leave room for the cell's floating vCPUs ------


def test_dedicated_pinning_refused_when_it_starves_existing_floating_vcpus():
    # no CPU sets: the pools overlap. 4 CPUs, ratio 1.0, 4 floating vCPUs already: pinning any CPU
    # would leave 4 floating vCPUs on 3 shared CPUs
    full = host(cell(0, [0, 1, 2, 3], floating_vcpus=4), cpu_allocation_ratio=1.0)
    r = nofit(req((1, 1024)), full)
    assert "the 1 shared CPUs guest cell 0 would pin there leave only 3 shared CPUs" in r.reason
    assert "4 floating vCPUs already on the cell" in r.reason
    # 3 floating vCPUs: one CPU may go, not two
    st_ = host(cell(0, [0, 1, 2, 3], floating_vcpus=3), cpu_allocation_ratio=1.0)
    assert pins(placed(req((1, 1024)), st_)) == [0]
    nofit(req((2, 1024)), st_)
    # an empty pool is refused whatever the ratio: 1 floating vCPU, both CPUs asked for
    st2 = host(cell(0, [0, 1], floating_vcpus=1), cpu_allocation_ratio=4.0)
    placed(req((1, 1024)), st2)
    r = nofit(req((2, 1024)), st2)
    assert "leave no shared CPU to the 1 floating vCPUs already on the cell" in r.reason
    # without floating vCPUs on the cell every CPU may be pinned
    placed(req((2, 1024)), host(cell(0, [0, 1]), cpu_allocation_ratio=4.0))


def test_starvation_counts_reserved_siblings_and_isolated_emulator():
    # SMT [0,2] [1,3], ratio 1.0, 2 floating vCPUs: isolate takes 0 and reserves 2 -> 2 left, fits;
    # with 3 floating vCPUs isolate is refused while prefer (takes only CPU 0) still fits
    st_ = host(cell(0, [0, 1, 2, 3], smt=True, floating_vcpus=2), cpu_allocation_ratio=1.0)
    p = placed(req((1, 1024), threads=ThreadPolicy.ISOLATE), st_)
    assert pins(p) == [0] and p.cells[0].reserved_cpus == frozenset({2})
    st3 = host(cell(0, [0, 1, 2, 3], smt=True, floating_vcpus=3), cpu_allocation_ratio=1.0)
    nofit(req((1, 1024), threads=ThreadPolicy.ISOLATE), st3)
    placed(req((1, 1024), threads=ThreadPolicy.PREFER), st3)
    # the isolated emulator CPU leaves the pool too
    st4 = host(cell(0, [0, 1, 2, 3], floating_vcpus=2), cpu_allocation_ratio=1.0)
    placed(req((2, 1024)), st4)
    placed(req((1, 1024), emulator=EmulatorThreadsPolicy.ISOLATE), st4)
    nofit(req((2, 1024), emulator=EmulatorThreadsPolicy.ISOLATE), st4)


def test_mixed_counts_existing_and_own_floating_vcpus_on_the_reduced_pool():
    # 6 CPUs, ratio 1.0, 2 floating vCPUs already; 2 dedicated leave 4 shared CPUs: 2 more floating fit
    st_ = host(cell(0, list(range(6)), floating_vcpus=2), cpu_allocation_ratio=1.0)
    p = placed(req((4, 1024, 2), policy=CpuPolicy.MIXED), st_)
    assert p.cells[0].cpu_pins[2] == (2, 3, 4, 5)
    r = nofit(req((5, 1024, 2), policy=CpuPolicy.MIXED), st_)
    assert "2 floating vCPUs already there) < 3 of guest cell 0" in r.reason


def test_starvation_fits_where_enough_shared_cpus_remain():
    # host cell 0 has more free CPUs (spread would pick it) but its floating vCPUs need all its
    # shared CPUs; host cell 1 has room left after pinning: the matching takes host cell 1
    st_ = host(
        cell(0, list(range(8)), floating_vcpus=16),
        cell(1, list(range(8, 12)), floating_vcpus=4),
        cpu_allocation_ratio=2.0,
    )
    for pref in ("spread", "pack"):
        p = placed(req((2, 1024)), st_, preference=pref)
        assert p.cells[0].host_cell == 1 and pins(p) == [8, 9]  # 4 floating on 2 CPUs at ratio 2.0
    nofit(req((3, 1024)), st_)
    # two guest cells: only one can go to host cell 1, the other has nowhere to go
    nofit(req((1, 1024), (2, 1024)), st_)
    # a floating-only instance does not shrink the pool: only the ratio counts (room 16 - 16 = 0 on
    # host cell 0, 8 - 4 = 4 on host cell 1)
    assert placed(req((4, 1024), policy=CpuPolicy.SHARED), st_).cells[0].host_cell == 1
    nofit(req((5, 1024), policy=CpuPolicy.SHARED), st_)


def test_starvation_rule_leaves_disjoint_cpu_sets_alone():
    # configured, disjoint sets: pinning never touches the shared pool; even a cell already above its
    # ratio (e.g. after lowering cpu_allocation_ratio) takes dedicated vCPUs
    for floating in (0, 2, 5):
        st_ = host(
            cell(0, [0, 1, 2, 3], floating_vcpus=floating),
            cpu_dedicated_set=[2, 3],
            cpu_shared_set=[0, 1],
            cpu_allocation_ratio=1.0,
        )
        assert pins(placed(req((2, 1024)), st_)) == [2, 3]
        assert pins(
            placed(req((1, 1024), threads=ThreadPolicy.ISOLATE, emulator=EmulatorThreadsPolicy.ISOLATE), st_)
        ) == [2]
        if floating < 2:
            placed(req((3, 1024, 2), policy=CpuPolicy.MIXED), st_)
        else:  # the mixed instance's own floating vCPU would make it worse
            nofit(req((3, 1024, 2), policy=CpuPolicy.MIXED), st_)
    # partly overlapping sets, cell already over its ratio: CPUs outside the shared set are fine,
    # taking a shared one is not
    over = host(
        cell(0, [0, 1, 2, 3], floating_vcpus=3),
        cpu_dedicated_set=[0, 1, 2],
        cpu_shared_set=[2, 3],
        cpu_allocation_ratio=1.0,
    )
    assert pins(placed(req((2, 1024)), over)) == [0, 1]
    nofit(req((3, 1024)), over)


def test_starvation_uses_the_deterministic_selection_only():
    # deliberate limitation: prefer takes the lowest free dedicated CPU (0), which is shared; CPU 1
    # (dedicated only) would have left both shared CPUs to the 2 floating vCPUs, but the fitter does
    # not search other selections, and the oracle agrees (nofit() checks brute_force_fits)
    st_ = host(
        cell(0, [0, 1, 2, 3], floating_vcpus=2),
        cpu_dedicated_set=[0, 1],
        cpu_shared_set=[0, 3],
        cpu_allocation_ratio=1.0,
    )
    nofit(req((1, 1024)), st_)
    # with room for one floating vCPU less it fits, on CPU 0
    st1 = host(
        cell(0, [0, 1, 2, 3], floating_vcpus=1),
        cpu_dedicated_set=[0, 1],
        cpu_shared_set=[0, 3],
        cpu_allocation_ratio=1.0,
    )
    assert pins(placed(req((1, 1024)), st1)) == [0]


def test_floating_overcommit_with_cpu_allocation_ratio():
    # the ratio lets instances share the 2 shared CPUs (8 floating vCPUs in all), but one instance
    # cannot overcommit against itself: at most 2 floating vCPUs in one guest cell (issue 11, defect 10)
    st_ = host(cell(0, [0, 1, 2, 3]), cpu_dedicated_set=[2, 3], cpu_shared_set=[0, 1], cpu_allocation_ratio=4.0)
    p = placed(req((2, 1024), policy=CpuPolicy.SHARED), st_)
    assert all(p.cells[0].cpu_pins[v] == (0, 1) for v in range(2))
    r = nofit(req((3, 1024), policy=CpuPolicy.SHARED), st_)
    assert "3 floating vCPUs of guest cell 0 > the 2 shared CPUs they would float over" in r.reason
    st2 = host(
        cell(0, [0, 1, 2, 3], floating_vcpus=6),
        cpu_dedicated_set=[2, 3],
        cpu_shared_set=[0, 1],
        cpu_allocation_ratio=4.0,
    )
    placed(req((2, 1024), policy=CpuPolicy.SHARED), st2)
    st3 = host(
        cell(0, [0, 1, 2, 3], floating_vcpus=7),
        cpu_dedicated_set=[2, 3],
        cpu_shared_set=[0, 1],
        cpu_allocation_ratio=4.0,
    )
    r = nofit(req((2, 1024), policy=CpuPolicy.SHARED), st3)
    assert "room for 1 more floating vCPUs" in r.reason


def test_ram_allocation_ratio_only_for_floating_guests():
    # 4096 MiB small pages, 3072 used: 1024 free; ratio 1.5 -> floating guests may take 3072
    st_ = host(cell(0, [0, 1, 2, 3], small_mb=4096, small_free_mb=1024), ram_allocation_ratio=1.5)
    placed(req((2, 3072), policy=CpuPolicy.SHARED), st_)
    nofit(req((2, 3073), policy=CpuPolicy.SHARED), st_)
    placed(req((2, 1024)), st_)
    r = nofit(req((2, 1025)), st_)
    assert "1024 free small-page MiB < 1025 MiB" in r.reason


def test_ram_overcommit_only_without_page_size_request():
    # Nova: hw:mem_page_size=small (or 4 KiB, or any falling back to small pages) means no overcommit
    st_ = host(cell(0, [0, 1, 2, 3], small_mb=4096, small_free_mb=1024), ram_allocation_ratio=1.5)
    placed(req((2, 3072), policy=CpuPolicy.SHARED), st_)  # no page size: overcommit allowed
    for page in (SMALL, PageSizeWish(PageSizeKind.EXPLICIT, 4), ANY):
        p = placed(req((2, 1024), policy=CpuPolicy.SHARED, page=page), st_)
        assert p.cells[0].pagesize_kb == 4
        r = nofit(req((2, 1025), policy=CpuPolicy.SHARED, page=page), st_)
        assert "1024 free small-page MiB < 1025 MiB" in r.reason, r.reason


def test_ram_overcommit_never_for_mixed_instances():
    st_ = host(cell(0, [0, 1, 2, 3], small_mb=4096, small_free_mb=1024), ram_allocation_ratio=1.5)
    placed(req((2, 1024, 1), policy=CpuPolicy.MIXED), st_)
    r = nofit(req((2, 1025, 1), policy=CpuPolicy.MIXED), st_)
    assert "1024 free small-page MiB < 1025 MiB" in r.reason
    # the floating-only instance next to it may use the overcommitted pool
    placed(req((2, 3072), policy=CpuPolicy.SHARED), st_)


def test_reserved_memory_pool_follows_overcommit_rule():
    # 2048 MiB small pages free per cell, ram ratio 2.0: 4096 MiB overcommitted pool per cell
    cells = (cell(0, [0, 1], small_mb=2048), cell(1, [2, 3], small_mb=2048))
    st_ = host(*cells, ram_allocation_ratio=2.0, reserved_memory_mb=6144)
    # no page size, floating only: budget 8192 - 6144 = 2048
    placed(req((1, 1024), (1, 1024), policy=CpuPolicy.SHARED), st_)
    r = nofit(req((1, 1024), (1, 1025), policy=CpuPolicy.SHARED), st_)
    assert "8192 MiB small-page (ram_allocation_ratio applied) memory" in r.reason
    # a page size request (or a dedicated vCPU) uses the free pool: 4096 - 6144 < 0, no room at all
    for r_ in (
        req((1, 16), policy=CpuPolicy.SHARED, page=SMALL),
        req((1, 16), policy=CpuPolicy.SHARED, page=PageSizeWish(PageSizeKind.EXPLICIT, 4)),
        req((1, 16)),
        req((2, 16, 1), policy=CpuPolicy.MIXED),
    ):
        r = nofit(r_, st_)
        assert "4096 MiB free small-page memory, 6144 MiB of which is reserved" in r.reason, r.reason
    st2 = host(*cells, ram_allocation_ratio=2.0, reserved_memory_mb=2048)
    placed(req((1, 1024), (1, 1024), policy=CpuPolicy.SHARED, page=SMALL), st2)
    nofit(req((1, 1024), (1, 1025), policy=CpuPolicy.SHARED, page=SMALL), st2)


def test_plain_shared_instance_without_numa_is_placed_in_one_host_cell_known_limitation():
    # B9, documented limitation (request.py / fit.py docstring): no hw:numa_nodes, no pinning, no
    # page size -> one implicit guest cell, fitted into ONE host cell (Nova would float it over
    # the whole host). Refused when no single cell has room although the host as a whole does.
    from agent.numa.request import parse_request

    r = parse_request({"uuid": "8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a12", "vcpus": 4, "memory_mb": 6144})
    assert r.numa_implicit and len(r.cells) == 1 and not r.is_pinned
    two = host(cell(0, [0, 1], small_mb=4096), cell(1, [2, 3], small_mb=4096), cpu_allocation_ratio=1.0)
    nofit(r, two)  # 8 GiB and 4 CPUs on the host, but 4 GiB / 2 CPUs per cell
    p = placed(r, host(cell(0, [0, 1, 2, 3], small_mb=8192), cell(1, [4, 5], small_mb=1024)))
    assert [c.host_cell for c in p.cells] == [0]
    assert all(p.cells[0].cpu_pins[v] == (0, 1, 2, 3) for v in range(4))


def test_memory_only_cpuless_cell():
    st_ = host(cell(0, [0, 1]), cell(1, [], small_mb=65536))
    p = placed(req((2, 1024)), st_)
    assert p.cells[0].host_cell == 0
    r = nofit(req((1, 1024), (1, 1024)), st_)
    assert "host cell 1: 0 free dedicated CPUs < 1 vCPUs of guest cell 0" in r.reason
    nofit(req((1, 1024), (1, 1024), policy=CpuPolicy.SHARED), st_)
    # a guest cell without vCPUs may go to the memory-only cell
    p2 = placed(req((2, 1024), (0, 4096)), st_)
    assert p2.cell_for_guest(1).host_cell == 1


# --- memory and page sizes -----------------------------------------------------------------------


def test_small_pages_default_and_explicit():
    st_ = host(cell(0, [0, 1], small_mb=2048, pages={2048: (1024, 1024)}))
    for page in (None, SMALL, PageSizeWish(PageSizeKind.EXPLICIT, 4)):
        p = placed(req((1, 2048), page=page), st_)
        assert p.cells[0].pagesize_kb == 4
        nofit(req((1, 2049), page=page), st_)


def test_explicit_hugepages_and_multiples():
    st_ = host(cell(0, [0, 1], pages={2048: (512, 512), GiB_KB: (4, 3)}))
    assert placed(req((1, 1024), page=P2M), st_).cells[0].pagesize_kb == 2048
    nofit(req((1, 1026), page=P2M), st_)  # 512 pages = 1024 MiB only
    nofit(req((1, 1025), page=P2M), st_)  # not a multiple of 2 MiB
    assert placed(req((1, 3072), page=P1G), st_).cells[0].pagesize_kb == GiB_KB
    r = nofit(req((1, 4096), page=P1G), st_)
    assert "1GiB pages: 3 free < 4 needed" in r.reason
    r = nofit(req((1, 1536), page=P1G), st_)
    assert "not a multiple of 1GiB" in r.reason
    r = nofit(req((1, 64), page=PageSizeWish(PageSizeKind.EXPLICIT, 16384)), st_)
    assert "no 16MiB pages" in r.reason


def test_hugepages_never_overcommit():
    st_ = host(cell(0, [0, 1], pages={2048: (512, 512)}), ram_allocation_ratio=4.0)
    nofit(req((1, 2048), policy=CpuPolicy.SHARED, page=P2M), st_)


def test_large_picks_largest_fitting_hugepage_size():
    st_ = host(cell(0, [0, 1], pages={2048: (2048, 2048), GiB_KB: (4, 1)}))
    assert placed(req((1, 1024), page=LARGE), st_).cells[0].pagesize_kb == GiB_KB
    assert placed(req((1, 2048), page=LARGE), st_).cells[0].pagesize_kb == 2048  # only 1 free 1GiB page
    assert placed(req((1, 1536), page=LARGE), st_).cells[0].pagesize_kb == 2048  # not a 1GiB multiple
    nofit(req((1, 8192), page=LARGE), st_)  # small pages are not an option
    nofit(req((1, 1024), page=LARGE), host(cell(0, [0, 1])))


def test_any_prefers_hugepages_then_small():
    st_ = host(cell(0, [0, 1], small_mb=8192, pages={2048: (512, 512)}))
    assert placed(req((1, 1024), page=ANY), st_).cells[0].pagesize_kb == 2048
    assert placed(req((1, 4096), page=ANY), st_).cells[0].pagesize_kb == 4
    nofit(req((1, 8193), page=ANY), st_)


def test_reserved_pages_are_not_promised():
    st_ = host(cell(0, [0, 1], pages={2048: (1024, 1024)}), reserved_pages={"0": {"2048": 512}})
    placed(req((1, 1024), page=P2M), st_)
    nofit(req((1, 1026), page=P2M), st_)


def test_used_pages_are_not_promised():
    st_ = host(cell(0, [0, 1], pages={2048: (1024, 1024)}, used_pages={2048: 1000}))
    placed(req((1, 48), page=P2M), st_)
    nofit(req((1, 50), page=P2M), st_)


def test_reserved_memory_mb_is_per_host_small_pages():
    st_ = host(cell(0, [0, 1], small_mb=2048), cell(1, [2, 3], small_mb=2048), reserved_memory_mb=1024)
    placed(req((1, 1536), (1, 1536)), st_)  # 3072 <= 4096 - 1024
    r = nofit(req((1, 2048), (1, 1536)), st_)
    assert "reserved_memory_mb" in r.reason
    # hugepage-backed guests do not touch the small-page budget
    st2 = host(cell(0, [0, 1], small_mb=1024, pages={2048: (1024, 1024)}), reserved_memory_mb=1024)
    placed(req((1, 2048), page=P2M), st2)
    nofit(req((1, 16)), st2)


def test_unbound_memory_mb_is_taken_from_the_host_small_page_budget():
    # one 8 GiB cell, kernel says all free (guest RAM of an unbound domain not touched yet), but a
    # domain without numatune already uses 6 GiB of small pages somewhere on the host
    st_ = host(cell(0, [0, 1, 2, 3], small_mb=8192), unbound_memory_mb=6144)
    assert st_.unbound_memory_mb == 6144
    placed(req((1, 2048)), st_)
    r = nofit(req((1, 6144)), st_)  # pinned, no overcommit: 6144 > 8192 - 6144
    assert "unbound_memory_mb" in r.reason and "6144 MiB used by domains not bound" in r.reason
    # adds up with reserved_memory_mb
    st2 = host(cell(0, [0, 1, 2, 3], small_mb=8192), unbound_memory_mb=4096, reserved_memory_mb=2048)
    placed(req((1, 2048)), st2)
    nofit(req((1, 2049)), st2)
    # the overcommit pool (plain shared instance, no page size) is reduced the same way
    st3 = host(cell(0, [0, 1, 2, 3], small_mb=8192), unbound_memory_mb=6144, ram_allocation_ratio=1.5)
    placed(req((1, 6144), policy=CpuPolicy.SHARED), st3)  # 12288 - 6144 >= 6144
    nofit(req((1, 6145), policy=CpuPolicy.SHARED), st3)
    # hugepage-only instances are not blocked by it
    st4 = host(cell(0, [0, 1], small_mb=1024, pages={2048: (1024, 1024)}), unbound_memory_mb=99999)
    placed(req((1, 2048), page=P2M), st4)
    nofit(req((1, 16)), st4)


def test_unbound_memory_mb_with_any_forces_hugepages():
    cells = (
        cell(0, [0, 1], small_mb=2048, pinned=[0], pages={GiB_KB: (1, 1)}),
        cell(1, [2, 3, 4, 5], small_mb=2048),
    )
    assert placed(req((1, 1024), page=ANY), host(*cells)).cells[0].host_cell == 1
    p = placed(req((1, 1024), page=ANY), host(*cells, unbound_memory_mb=1500, reserved_memory_mb=2000))
    assert p.cells[0].host_cell == 0 and p.cells[0].pagesize_kb == GiB_KB


def test_unbound_memory_mb_json_round_trip_and_range():
    st_ = host(cell(0, [0, 1]), unbound_memory_mb=3072)
    doc = st_.to_json()
    assert doc["unbound_memory_mb"] == 3072
    assert HostState.from_json(doc) == st_
    absent = host(cell(0, [0, 1]))
    assert absent.unbound_memory_mb == 0 and absent.to_json()["unbound_memory_mb"] == 0
    for bad in (-1, 1 << 41, "12", 1.5):
        with pytest.raises(InvalidHostState):
            host(cell(0, [0, 1]), unbound_memory_mb=bad)


def test_reserved_memory_with_any_forces_hugepage_cell():
    # host cell 1 is freer (spread would pick it) but has no hugepages: small pages there would break
    # the reserved budget, so the fitter must take host cell 0's hugepages.
    cells = (
        cell(0, [0, 1], small_mb=2048, pinned=[0], pages={GiB_KB: (1, 1)}),
        cell(1, [2, 3, 4, 5], small_mb=2048),
    )
    assert placed(req((1, 1024), page=ANY), host(*cells)).cells[0].host_cell == 1
    p = placed(req((1, 1024), page=ANY), host(*cells, reserved_memory_mb=3500))
    assert p.cells[0].host_cell == 0 and p.cells[0].pagesize_kb == GiB_KB
    nofit(req((1, 2048), page=ANY), host(*cells, reserved_memory_mb=3500))


def test_reserved_memory_with_any_two_guest_cells_matching():
    # hugepages on host cells 0 and 1 only fit guest cell 0 (1 GiB) / guest cell 1 (2 MiB multiples);
    # with a tight budget exactly one small-page cell is allowed.
    cells = (
        cell(0, [0, 1], small_mb=1024, pages={GiB_KB: (1, 1)}),
        cell(1, [2, 3], small_mb=1024, pages={2048: (256, 256)}),
        cell(2, [4, 5, 6, 7], small_mb=4096),
    )
    r = req((1, 1024), (2, 512), page=ANY)
    p = placed(r, host(*cells, reserved_memory_mb=6144 - 1024))
    assert sum(c.memory_mb for c in p.cells if c.pagesize_kb == 4) <= 1024
    p = placed(r, host(*cells, reserved_memory_mb=6144 - 512))
    assert sum(c.memory_mb for c in p.cells if c.pagesize_kb == 4) <= 512
    p = placed(r, host(*cells, reserved_memory_mb=6144 - 511))
    assert [c.pagesize_kb for c in p.cells] == [GiB_KB, 2048]
    # hugepage-only placements are not blocked even when the host is already below its reservation
    p = placed(r, host(*cells, reserved_memory_mb=9999))
    assert [c.pagesize_kb for c in p.cells] == [GiB_KB, 2048]
    # 1 GiB guest cells: one of them needs small pages wherever it goes
    nofit(req((1, 1024), (2, 1024), page=ANY), host(*cells, reserved_memory_mb=6144 - 1023))
    placed(req((1, 1024), (2, 1024), page=ANY), host(*cells, reserved_memory_mb=6144 - 1024))


# --- matching and preference ---------------------------------------------------------------------


def test_matching_beats_greedy_order():
    # guest cell 0 (1 vCPU) fits both host cells; guest cell 1 (4 vCPUs) only host cell 0. A greedy
    # pass in guest order taking the first/freest host cell puts guest cell 0 on host cell 0 and fails.
    st_ = host(cell(0, [0, 1, 2, 3, 4]), cell(1, [5, 6]))
    for pref in ("spread", "pack"):
        p = placed(req((1, 1024), (4, 1024)), st_, preference=pref)
        assert p.cell_for_guest(1).host_cell == 0 and p.cell_for_guest(0).host_cell == 1


def test_three_cells_of_different_sizes_matching():
    st_ = host(cell(0, [0, 1, 2]), cell(1, [3, 4, 5, 6, 7, 8]), cell(2, [9, 10, 11, 12]))
    p = placed(req((2, 512), (5, 512), (3, 512)), st_)
    assert [c.host_cell for c in p.cells] == [0, 1, 2]


def test_spread_vs_pack():
    st_ = host(cell(0, [0, 1, 2, 3], pinned=[0, 1]), cell(1, [4, 5, 6, 7]), cell(2, [8, 9, 10, 11], pinned=[8]))
    assert placed(req((2, 1024)), st_).cells[0].host_cell == 1
    assert placed(req((2, 1024)), st_, preference="pack").cells[0].host_cell == 0
    p = placed(req((1, 1024), (1, 1024)), st_, preference="pack")
    assert {c.host_cell for c in p.cells} == {0, 2}


def test_spread_breaks_cpu_ties_by_free_memory_then_id():
    st_ = host(cell(0, [0, 1], small_mb=4096), cell(1, [2, 3], small_mb=8192), cell(2, [4, 5], small_mb=8192))
    assert placed(req((1, 1024)), st_).cells[0].host_cell == 1
    assert placed(req((1, 1024)), st_, preference="pack").cells[0].host_cell == 0
    same = host(cell(0, [0, 1]), cell(1, [2, 3]), cell(2, [4, 5]))
    p = placed(req((1, 1024), (1, 1024)), same)
    assert sorted(c.host_cell for c in p.cells) == [0, 1]


def test_deterministic():
    st_ = host(cell(0, SMT8, smt=True, pinned=[3]), cell(1, list(range(8, 16)), smt=True, pinned=[9]))
    r = req((3, 1024), (2, 1024), threads=ThreadPolicy.ISOLATE)
    a = fit(r, st_)
    assert all(fit(r, st_) == a for _ in range(5))


def test_nofit_reasons_name_cells_and_hall_violator():
    st_ = host(cell(0, [0]), cell(1, [1]), cell(2, [2, 3, 4, 5]))
    r = nofit(req((3, 512), (4, 512), (1, 512)), st_)
    assert "guest cells 0 and 1 both only fit host cell 2" in r.reason
    assert r.cell_reasons[0].startswith("host cell 0: 1 free dedicated CPUs < 3 vCPUs of guest cell 0")
    assert "guest cell 2 would fit" in r.cell_reasons[1]
    r2 = nofit(req((1, 512), (1, 512), (1, 512), (1, 512)), st_)
    assert "4 guest cells need distinct host cells but the host has only 3" in r2.reason


def test_nofit_reason_mentions_memory_and_cpus():
    st_ = host(cell(3, [0, 1], pages={GiB_KB: (3, 3)}))
    r = nofit(req((4, 8192), page=P1G), st_)
    assert r.cell_reasons[3] == (
        "host cell 3: 2 free dedicated CPUs < 4 vCPUs of guest cell 0; 1GiB pages: 3 free < 8 needed by guest cell 0"
    )


def test_invalid_request_without_cells():
    r = req((1, 512))
    empty = InstanceRequest(
        uuid="u",
        vcpus=0,
        memory_mb=0,
        cells=(),
        cpu_policy=CpuPolicy.DEDICATED,
        thread_policy=ThreadPolicy.PREFER,
        emulator_threads=EmulatorThreadsPolicy.SHARE,
        page_size=None,
    )
    with pytest.raises(InvalidRequest):
        fit(empty, host(cell(0, [0])))
    assert isinstance(fit(r, host(cell(0, [0]))), Placement)


def test_host_without_cells_does_not_crash():
    r = fit(req((1, 512)), host())
    assert isinstance(r, NoFit) and "no NUMA cells" in r.reason


# --- property tests ------------------------------------------------------------------------------


def _draw_pages(draw: st.DrawFn, roomy: bool) -> tuple[list[dict[str, int]], int]:
    """A cell's page pools (small, 2 MiB, 1 GiB, each maybe) and the KiB its hugepages hold."""
    pages = []
    if draw(st.booleans()):
        total = draw(st.sampled_from([0, 1024, 2048, 4096, 8192])) * 256
        free = draw(st.one_of(st.just(total), st.integers(0, total)))
        pages.append({"size_kb": 4, "total": total, "free": free})
    huge_kb = 0
    if roomy or draw(st.booleans()):
        total = draw(st.sampled_from([0, 256, 512, 1024, 1536]))
        pages.append({"size_kb": 2048, "total": total, "free": draw(st.one_of(st.just(total), st.integers(0, total)))})
        huge_kb += total * 2048
    if draw(st.booleans()):
        total = draw(st.integers(0, 3))
        pages.append({"size_kb": GiB_KB, "total": total, "free": draw(st.integers(0, total))})
        huge_kb += total * GiB_KB
    return pages, huge_kb


@st.composite
def host_states(draw: st.DrawFn, roomy: bool = False) -> HostState:
    """Random small hosts; `roomy` ones have 3-4 cells with more CPUs and memory, so that multi-cell
    requests fit often and the matching (not a single obvious cell) decides."""
    n_cells = draw(st.sampled_from([3, 4] if roomy else [1, 2, 3, 3, 4, 4]))
    cells = []
    cpu = 0
    all_cpus: list[int] = []
    for cid in range(n_cells):
        k = draw(st.sampled_from([2, 4, 5, 6, 8] if roomy else [0, 1, 2, 3, 4, 4, 5, 6, 6, 8, 8, 8]))
        cpus = list(range(cpu, cpu + k))
        cpu += k
        all_cpus += cpus
        smt = draw(st.sampled_from([True, True, False] if roomy else [True, False]))
        if smt:
            siblings = [cpus[i : i + 2] for i in range(0, k, 2)]
        else:
            siblings = [[c] for c in cpus]
        max_pinned = max(1, k // 4 if roomy else k // 2)
        pinned = sorted(draw(st.sets(st.sampled_from(cpus), max_size=max_pinned))) if cpus else []
        pages, huge_kb = _draw_pages(draw, roomy)
        used_pages = {}
        if draw(st.booleans()):
            used_pages["2048"] = draw(st.sampled_from([0, 128, 512]))
        cells.append(
            {
                "id": cid,
                "cpus": cpus,
                "siblings": siblings,
                "memory_kb": draw(st.sampled_from([1024, 2048, 4096, 8192])) * 1024 + huge_kb,
                "pages": pages,
                "pinned_cpus": pinned,
                "used_memory_mb": draw(st.sampled_from([0, 512, 1024])),
                "used_pages": used_pages,
                "floating_vcpus": draw(st.integers(0, 6)),
            }
        )
    doc: dict[str, Any] = {"hostname": "h", "cells": cells}
    if all_cpus and not roomy and draw(st.integers(0, 2)) == 0:
        # "b": in both sets (overlapping pools, where mixed instances exclude their own CPUs)
        roles = draw(
            st.lists(st.sampled_from(["d", "d", "d", "s", "b", "-"]), min_size=len(all_cpus), max_size=len(all_cpus))
        )
        doc["cpu_dedicated_set"] = [c for c, r in zip(all_cpus, roles, strict=True) if r in "db"]
        doc["cpu_shared_set"] = [c for c, r in zip(all_cpus, roles, strict=True) if r in "sb"]
    doc["reserved_memory_mb"] = draw(st.sampled_from([0, 0, 0, 512, 2048, 6000]))
    if draw(st.booleans()):
        doc["reserved_pages"] = {str(draw(st.integers(0, n_cells - 1))): {"2048": draw(st.sampled_from([64, 256]))}}
    doc["cpu_allocation_ratio"] = draw(st.sampled_from([1.0, 2.0, 4.0]))
    doc["ram_allocation_ratio"] = draw(st.sampled_from([1.0, 1.5]))
    state = HostState.from_json(doc)
    if draw(st.integers(0, 2)) == 0:
        # a reservation close to what is free, so that reserved_memory_mb decides between page sizes
        slack = draw(st.sampled_from([0, 256, 512, 1024, 1536, 2048, 3072]))
        state = dataclasses.replace(
            state, reserved_memory_mb=max(0, sum(r.small_free_mb for r in state.all_resources()) - slack)
        )
    if draw(st.integers(0, 2)) == 0:
        # part of the host-level budget taken by domains bound to no cell instead
        unbound = draw(st.sampled_from([256, 1024, 4096]))
        moved = draw(st.sampled_from([0, min(unbound, state.reserved_memory_mb)]))
        state = dataclasses.replace(
            state, unbound_memory_mb=unbound, reserved_memory_mb=state.reserved_memory_mb - moved
        )
    return state


@st.composite
def requests(draw: st.DrawFn) -> InstanceRequest:
    n = draw(st.integers(1, 3))
    sizes = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n, unique=True))  # different sizes
    mems = draw(st.lists(st.sampled_from([256, 512, 512, 1024, 1024, 1536, 2048, 3072]), min_size=n, max_size=n))
    policy = draw(st.sampled_from(list(CpuPolicy)))
    cells = []
    nxt = 0
    for k in range(n):
        vcpus = frozenset(range(nxt, nxt + sizes[k]))
        nxt += sizes[k]
        if policy is CpuPolicy.SHARED:
            ded: frozenset[int] = frozenset()
        elif policy is CpuPolicy.DEDICATED:
            ded = vcpus
        else:
            ded = frozenset(draw(st.sets(st.sampled_from(sorted(vcpus)))))
        cells.append(GuestCell(id=k, vcpus=vcpus, memory_mb=mems[k], dedicated_vcpus=ded))
    page = draw(st.sampled_from([None, SMALL, LARGE, ANY, ANY, P2M, P1G, PageSizeWish(PageSizeKind.EXPLICIT, 4)]))
    return InstanceRequest(
        uuid="u",
        vcpus=nxt,
        memory_mb=sum(mems),
        cells=tuple(cells),
        cpu_policy=policy,
        thread_policy=draw(st.sampled_from(list(ThreadPolicy))),
        emulator_threads=draw(st.sampled_from(list(EmulatorThreadsPolicy))),
        page_size=page,
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=host_states(), request=requests(), preference=st.sampled_from(["spread", "pack"]))
def test_property_fit_is_valid_and_exact(state: HostState, request: InstanceRequest, preference: str):
    result = fit(request, state, preference=preference)  # type: ignore[arg-type]
    expected = brute_force_fits(request, state)
    assert result.fits == expected, getattr(result, "reason", result)
    if isinstance(result, Placement):
        check_placement(request, state, result)
        assert fit(request, state, preference=preference) == result  # type: ignore[arg-type]
    else:
        assert result.reason
        assert set(result.cell_reasons) == {c.id for c in state.topology.cells}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=host_states(roomy=True), request=requests(), preference=st.sampled_from(["spread", "pack"]))
def test_property_roomy_hosts_multi_cell(state: HostState, request: InstanceRequest, preference: str):
    """Same property on roomier hosts, where multi-cell requests fit often."""
    result = fit(request, state, preference=preference)  # type: ignore[arg-type]
    assert result.fits == brute_force_fits(request, state), getattr(result, "reason", result)
    if isinstance(result, Placement):
        check_placement(request, state, result)


# --- shared scenarios ----------------------------------------------------------------------------


@pytest.mark.skipif(not FIT_SCENARIOS.exists(), reason=f"{FIT_SCENARIOS} absent")
@pytest.mark.parametrize("scenario", fit_scenarios(), ids=lambda s: s["name"])
def test_bench_scenarios(scenario: dict[str, Any]):
    request_mod = pytest.importorskip("agent.numa.request")
    parse_request = getattr(request_mod, "parse_request", None)
    if parse_request is None:
        pytest.skip("parse_request not written yet")
    state = HostState.from_json(scenario["host"])
    request = parse_request(scenario["instance"])
    t0 = time.perf_counter()
    result = fit(request, state)
    elapsed = time.perf_counter() - t0
    assert result.fits == (scenario["expected"] == "fit"), getattr(result, "reason", None)
    if isinstance(result, Placement):
        check_placement(request, state, result)
    assert elapsed < 1.0
