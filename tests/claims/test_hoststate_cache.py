"""compute_host_state reuses each claim's usage between host states (hoststate._ClaimUsageCache):
the result must be exactly what a fresh computation gives, whatever changed in between."""

from __future__ import annotations

from agent.claims import hoststate
from agent.claims.hoststate import compute_host_state, placement_usage
from agent.claims.ledger import Claim, ClaimState
from agent.numa.placement import CellPlacement, Placement
from tests.claims.helpers import NO_RESERVE, topology

UUID = "22222222-2222-2222-2222-222222222222"


def placement(host_cell: int, cpus: tuple[int, ...], memory_mb: int = 512, pagesize_kb: int = 2048) -> Placement:
    pins = {v: (c,) for v, c in enumerate(cpus)}
    cell = CellPlacement(0, host_cell, tuple(pins), pins, memory_mb, pagesize_kb, frozenset(pins), frozenset())
    return Placement(cells=(cell,))


def claim(p: Placement, mid: str = "m1", uuid: str = UUID, state: ClaimState = ClaimState.HELD) -> Claim:
    return Claim(mid, uuid, "src", "{}", p, state, 0.0, 100.0, 0.0, None, 60.0)


def test_a_repeated_host_state_is_the_same_and_reuses_the_usage():
    topo = topology(huge_2m=1024)
    claims = [claim(placement(1, (4, 5)), "m1"), claim(placement(0, (1, 2)), "m2", "33333333-0000-0000-0000-0")]
    first = compute_host_state(topo, [], claims, NO_RESERVE)
    again = compute_host_state(topo, [], claims, NO_RESERVE)
    assert again.state == first.state and again.holders == first.holders
    assert all(a is b for a, b in zip(again.holders, first.holders, strict=True))  # reused, not recomputed
    fresh = [placement_usage(c.placement, topo, name=f"claim {c.migration_id}", uuid=c.instance_uuid) for c in claims]
    assert list(first.holders) == fresh


def test_another_layout_or_name_or_placement_is_computed_afresh():
    small = topology(huge_2m=1024, small_pool=True)  # 4 KiB pages now count as pages too
    p = placement(1, (4, 5), pagesize_kb=4)
    without_pool = compute_host_state(topology(huge_2m=1024), [], [claim(p)], NO_RESERVE)
    with_pool = compute_host_state(small, [], [claim(p)], NO_RESERVE)
    assert without_pool.state.cell_usage(1).used_pages == {}
    assert with_pool.state.cell_usage(1).used_pages == {4: 512 * 256}
    other_cpus = compute_host_state(small, [], [claim(placement(1, (6, 7), pagesize_kb=4))], NO_RESERVE)
    assert other_cpus.state.cell_usage(1).pinned_cpus == {6, 7}
    renamed = compute_host_state(small, [], [claim(p, "m9")], NO_RESERVE)
    assert renamed.holders[0].name == "claim m9"


def test_two_claims_pinning_one_cpu_are_still_an_overlap():
    topo = topology(huge_2m=1024)
    a, b = claim(placement(1, (4, 5)), "m1"), claim(placement(1, (5, 6)), "m2", "33333333-0000-0000-0000-0")
    rep = compute_host_state(topo, [], [a, b], NO_RESERVE)
    assert rep.overlaps == ("CPU 5 is pinned by 2 holders: claim m1, claim m2",)
    assert compute_host_state(topo, [], [a], NO_RESERVE).overlaps == ()


def test_the_cache_is_bounded():
    cache = hoststate._ClaimUsageCache(max_entries=3)
    topo = topology(huge_2m=1024)
    layout = hoststate.topology_layout(topo)
    for i in range(10):
        cache.usage(placement(1, (4,)), topo, f"claim m{i}", UUID, layout)
        assert len(cache._entries) <= 3
