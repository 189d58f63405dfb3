"""Host state: topology - config - domain usage - live claims, computed by one function."""

from __future__ import annotations

import logging

import pytest

from agent.claims.hoststate import compute_host_state, domain_usage, host_state_fn
from agent.claims.ledger import Claim, ClaimState
from agent.config import ComputeConfig
from agent.libvirt_ops.domain_xml import DomainPlacement, GuestNumaCell, HugepageBacking
from agent.libvirt_ops.inventory import DomainInventory, IncompleteInventory
from agent.numa.fit import fit
from agent.numa.placement import CellPlacement, Placement
from tests.claims.helpers import NO_RESERVE, request, topology

# 2 cells x 4 cores x 2 threads: cell 0 = {0-3, 8-11}, cell 1 = {4-7, 12-15}; siblings (k, k+8)
TOPO = topology(huge_2m=1024, huge_2m_free=512)


def dom(name="d1", uuid="11111111-1111-1111-1111-111111111111", **kw) -> DomainPlacement:
    kw.setdefault("vcpus", 2)
    kw.setdefault("memory_kib", 1024 * 1024)
    return DomainPlacement(name=name, uuid=uuid, **kw)


def claim_of(
    placement: Placement, state=ClaimState.HELD, mid="m1", uuid="22222222-2222-2222-2222-222222222222"
) -> Claim:
    return Claim(mid, uuid, "src", "{}", placement, state, 0.0, 100.0, 0.0, None, 60.0)


def one_cell_placement(
    host_cell=1, cpus=(4, 5), memory_mb=1024, pagesize_kb=2048, emulator=(), iso=False, reserved=()
) -> Placement:
    pins = {v: (c,) for v, c in enumerate(cpus)}
    return Placement(
        cells=(
            CellPlacement(
                0, host_cell, tuple(pins), pins, memory_mb, pagesize_kb, frozenset(pins), frozenset(reserved)
            ),
        ),
        emulator_pins=tuple(emulator),
        emulator_isolated=iso,
    )


def test_pinned_domain_with_hugepages_counts_cpus_memory_and_pages():
    d = dom(
        vcpu_pins={0: frozenset({1}), 1: frozenset({9})},
        emulator_pins=frozenset({1, 9}),
        guest_cells=(GuestNumaCell(0, frozenset({0, 1}), 1024 * 1024),),
        memnodes={0: frozenset({0})},
        hugepages=(HugepageBacking(2048, None),),
    )
    u = domain_usage(d, TOPO, NO_RESERVE)
    assert u.cells[0].pinned_cpus == {1, 9}
    assert u.cells[0].used_memory_mb == 1024
    assert u.cells[0].used_pages == {2048: 512}
    assert u.cells[0].floating_vcpus == 0
    assert u.unbound_memory_mb == 0
    rep = compute_host_state(TOPO, [d], [], NO_RESERVE)
    assert rep.state.cell_usage(0).pinned_cpus == {1, 9}
    assert rep.overlaps == ()
    # kernel says 512 free (the domain's 512 are in use); used_pages 512 -> promisable 512, not 0
    assert rep.state.resources(0).free_pages[2048] == 512


def test_hugepage_size_none_is_host_default_and_per_guest_cell_nodeset():
    d = dom(
        vcpus=4,
        memory_kib=4 * 1024 * 1024,
        guest_cells=(
            GuestNumaCell(0, frozenset({0, 1}), 2 * 1024 * 1024),
            GuestNumaCell(1, frozenset({2, 3}), 2 * 1024 * 1024),
        ),
        memnodes={0: frozenset({0}), 1: frozenset({1})},
        hugepages=(HugepageBacking(1048576, frozenset({1})), HugepageBacking(None, None)),
    )
    u = domain_usage(d, TOPO, NO_RESERVE)
    assert u.cells[0].used_pages == {2048: 1024}
    assert u.cells[1].used_pages == {1048576: 2}
    assert any("1048576 KiB pages" in n for n in u.notes)  # host cell 1 has no 1 GiB pool


def test_emulator_isolated_via_agent_metadata_counts_exact_placement():
    p = one_cell_placement(host_cell=0, cpus=(0, 1), emulator=(2,), iso=True, reserved=(8, 9))
    d = dom(agent_placement=p.to_json(), vcpu_pins={0: frozenset({0}), 1: frozenset({1})})
    u = domain_usage(d, TOPO, NO_RESERVE)
    assert u.source == "agent_placement"
    assert u.cells[0].pinned_cpus == {0, 1, 2, 8, 9}  # isolated siblings + emulator CPU


def test_emulatorpin_single_dedicated_cpu_without_metadata_is_isolated():
    cfg = ComputeConfig(
        cpu_dedicated_set=frozenset(range(1, 8)) | frozenset(range(9, 16)),
        cpu_shared_set=frozenset({0, 8}),
        reserved_host_memory_mb=0,
    )
    d = dom(
        vcpu_pins={0: frozenset({1}), 1: frozenset({2})},
        emulator_pins=frozenset({3}),
        iothread_pins={1: frozenset({0, 8})},
    )
    u = domain_usage(d, TOPO, cfg)
    assert u.cells[0].pinned_cpus == {1, 2, 3}
    # a single pin outside the dedicated set is not exclusive: it floats
    d2 = dom(vcpu_pins={0: frozenset({0}), 1: frozenset({8})})
    u2 = domain_usage(d2, TOPO, cfg)
    assert u2.cells[0].pinned_cpus == frozenset() and u2.cells[0].floating_vcpus == 2


def test_floating_vcpus_count_on_every_cell_their_set_touches():
    d = dom(vcpus=3, vcpu_pins={0: frozenset({0, 1})}, vcpu_cpuset=frozenset({0, 4}))
    u = domain_usage(d, TOPO, NO_RESERVE)
    # vCPU 0 -> cell 0; vCPUs 1, 2 via <vcpu cpuset> touch cells 0 and 1
    assert u.cells[0].floating_vcpus == 3
    assert u.cells[1].floating_vcpus == 2
    # no pinning at all: every cell with CPUs
    u2 = domain_usage(dom(vcpus=2), TOPO, NO_RESERVE)
    assert u2.cells[0].floating_vcpus == 2 and u2.cells[1].floating_vcpus == 2


def test_unbound_memory_is_reported_not_put_on_a_cell():
    d = dom(memory_kib=3 * 1024 * 1024, numatune_nodeset=frozenset({0, 1}))
    u = domain_usage(d, TOPO, NO_RESERVE)
    assert u.unbound_memory_mb == 3072
    assert all(c.used_memory_mb == 0 for c in u.cells.values())
    rep = compute_host_state(TOPO, [d], [], NO_RESERVE)
    assert rep.unbound_memory_mb == 3072
    # single-node numatune binds it
    u2 = domain_usage(dom(memory_kib=1024 * 1024, numatune_nodeset=frozenset({1})), TOPO, NO_RESERVE)
    assert u2.cells[1].used_memory_mb == 1024 and u2.unbound_memory_mb == 0


def test_small_pages_go_to_4k_pool_when_the_cell_reports_one():
    topo = topology(small_pool=True, huge_2m=0)
    d = dom(
        memory_kib=1024 * 1024,
        memnodes={0: frozenset({0})},
        guest_cells=(GuestNumaCell(0, frozenset({0, 1}), 1024 * 1024),),
    )
    u = domain_usage(d, topo, NO_RESERVE)
    assert u.cells[0].used_pages == {4: 262144} and u.cells[0].used_memory_mb == 1024
    u2 = domain_usage(d, TOPO, NO_RESERVE)  # no 4 KiB pool: MiB only
    assert u2.cells[0].used_pages == {} and u2.cells[0].used_memory_mb == 1024


def test_overlapping_domains_are_reported_not_raised(caplog):
    a = dom("a", "aaaaaaaa-0000-0000-0000-000000000000", vcpu_pins={0: frozenset({1}), 1: frozenset({2})})
    b = dom("b", "bbbbbbbb-0000-0000-0000-000000000000", vcpu_pins={0: frozenset({2}), 1: frozenset({3})})
    with caplog.at_level(logging.WARNING, logger="compute_agent.claims"):
        rep = compute_host_state(TOPO, [a, b], [], NO_RESERVE)
    assert len(rep.overlaps) == 1 and "CPU 2" in rep.overlaps[0] and "a" in rep.overlaps[0]
    assert rep.state.cell_usage(0).pinned_cpus == {1, 2, 3}
    assert "CPU 2" in caplog.text


def test_claims_count_only_in_used_pages_and_config_reservations_apply():
    cfg = ComputeConfig(
        reserved_host_memory_mb=1024,
        reserved_huge_pages=((1, 2048, 64),),
        cpu_dedicated_set=frozenset(range(1, 16)) - {8},
        cpu_shared_set=frozenset({0, 8}),
    )
    p = one_cell_placement(host_cell=1, cpus=(4, 5), memory_mb=512)
    rep = compute_host_state(TOPO, [], [claim_of(p)], cfg)
    st = rep.state
    assert st.cell_usage(1).pinned_cpus == {4, 5}
    assert st.cell_usage(1).used_pages == {2048: 256}
    assert st.reserved_memory_mb == 1024 and st.reserved_pages == {1: {2048: 64}}
    # kernel free 512, total 1024, used 256 -> min(512, 768) - 64 reserved
    assert st.resources(1).free_pages[2048] == 448
    assert 4 not in st.resources(1).dedicated_cpus


def test_claim_states_and_domain_dedup():
    p = one_cell_placement(host_cell=1, cpus=(4, 5))
    uuid = "22222222-2222-2222-2222-222222222222"
    incoming = dom("vm", uuid, vcpu_pins={0: frozenset({4}), 1: frozenset({5})})
    # live claim + its incoming (not yet active) domain: counted once (no overlap)
    rep = compute_host_state(TOPO, [incoming], [claim_of(p, ClaimState.MIGRATING)], NO_RESERVE, active_uuids=())
    assert rep.overlaps == () and rep.state.cell_usage(1).pinned_cpus == {4, 5}
    assert [h.source for h in rep.holders] == ["claim"]
    # confirmed claim with its domain present: the domain counts
    rep = compute_host_state(TOPO, [incoming], [claim_of(p, ClaimState.CONFIRMED)], NO_RESERVE)
    assert rep.overlaps == () and len(rep.holders) == 1 and rep.holders[0].source == "pins"
    # confirmed claim, domain not listed yet: the claim counts
    rep = compute_host_state(TOPO, [], [claim_of(p, ClaimState.CONFIRMED)], NO_RESERVE)
    assert rep.state.cell_usage(1).pinned_cpus == {4, 5}
    # released / expired claims hold nothing
    for s in (ClaimState.RELEASED, ClaimState.EXPIRED):
        rep = compute_host_state(TOPO, [], [claim_of(p, s)], NO_RESERVE)
        assert rep.state.cell_usage(1).pinned_cpus == frozenset()


def test_claim_overlapping_a_domain_is_reported():
    p = one_cell_placement(host_cell=1, cpus=(4, 5))
    other = dom("other", "33333333-3333-3333-3333-333333333333", vcpu_pins={0: frozenset({5}), 1: frozenset({6})})
    rep = compute_host_state(TOPO, [other], [claim_of(p)], NO_RESERVE)
    assert len(rep.overlaps) == 1 and "CPU 5" in rep.overlaps[0]


def test_pins_outside_topology_are_notes_not_crashes():
    d = dom(
        vcpu_pins={0: frozenset({99}), 1: frozenset({98, 97})},
        memnodes={0: frozenset({7})},
        guest_cells=(GuestNumaCell(0, frozenset({0, 1}), 1024),),
    )
    u = domain_usage(d, TOPO, NO_RESERVE)
    assert len(u.notes) == 3
    assert u.unbound_memory_mb == 1


# --- B1: only the incoming copy of a live claim's instance is deduplicated -----------------------

X = "8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a10"


def test_running_domain_with_a_live_claim_is_still_counted():
    """An ACTIVE domain of the claimed instance that does not carry the claim's placement really
    runs here: both it and the claim hold their CPUs (the overlap is reported, nothing vanishes)."""
    running = dom("X", X, vcpu_pins={0: frozenset({2}), 1: frozenset({3})})
    claim = claim_of(one_cell_placement(host_cell=0, cpus=(0, 1)), uuid=X)
    for active in (None, [X.upper()]):  # a plain list counts every domain as active
        rep = compute_host_state(TOPO, [running], [claim], NO_RESERVE, active_uuids=active)
        assert rep.state.cell_usage(0).pinned_cpus == {0, 1, 2, 3}
        assert {h.source for h in rep.holders} == {"claim", "pins"}
    # same CPUs: both counted, and the operator sees the overlap
    clash = claim_of(one_cell_placement(host_cell=0, cpus=(2, 3)), uuid=X)
    rep = compute_host_state(TOPO, [running], [clash], NO_RESERVE)
    assert len(rep.overlaps) == 2


def test_incoming_domain_is_skipped_when_inactive_or_carrying_the_claims_placement():
    p = one_cell_placement(host_cell=1, cpus=(4, 5))
    claim = claim_of(p, ClaimState.MIGRATING, uuid=X)
    # active, agent metadata = the claim's placement: the migrated domain, counted once
    arrived = dom("X", X, agent_placement=p.to_json(), vcpu_pins={0: frozenset({4}), 1: frozenset({5})})
    inv = DomainInventory((arrived,), frozenset({X}))
    rep = compute_host_state(TOPO, inv, [claim], NO_RESERVE)
    assert rep.overlaps == () and len(rep.holders) == 1 and rep.active_uuids == {X.replace("-", "")}
    # active, metadata of ANOTHER placement: counted as well
    other = dom("X", X, agent_placement=one_cell_placement(host_cell=0, cpus=(0, 1)).to_json())
    rep = compute_host_state(TOPO, DomainInventory((other,), frozenset({X})), [claim], NO_RESERVE)
    assert rep.state.cell_usage(0).pinned_cpus == {0, 1} and rep.state.cell_usage(1).pinned_cpus == {4, 5}
    # not active (the paused/defined incoming copy): skipped whatever it says
    rep = compute_host_state(TOPO, DomainInventory((other,), frozenset()), [claim], NO_RESERVE)
    assert rep.state.cell_usage(0).pinned_cpus == frozenset() and len(rep.holders) == 1


def test_host_state_fn_takes_an_inventory_and_refuses_an_incomplete_one():
    running = dom("X", X, vcpu_pins={0: frozenset({2}), 1: frozenset({3})})
    fn = host_state_fn(TOPO, lambda: DomainInventory((running,), frozenset({X})), NO_RESERVE)
    rep = fn([])
    assert rep.state.cell_usage(0).pinned_cpus == {2, 3} and rep.active_uuids == {X.replace("-", "")}
    bad = host_state_fn(TOPO, lambda: DomainInventory((running,), frozenset({X}), ("vm9: bad XML",)), NO_RESERVE)
    with pytest.raises(IncompleteInventory, match="vm9"):
        bad([])
    # compute_host_state itself reports, never raises
    rep = compute_host_state(TOPO, DomainInventory((running,), frozenset({X}), ("vm9: bad XML",)), [], NO_RESERVE)
    assert rep.unreadable == ("vm9: bad XML",)
    # backwards compatible: a plain list of domains, all of them active
    assert host_state_fn(TOPO, lambda: [running], NO_RESERVE)([]).active_uuids == {X.replace("-", "")}


# --- B2: memory bound to no single cell -----------------------------------------------------------


def test_unbound_memory_on_a_single_cell_host_is_charged_to_that_cell():
    for small_pool in (False, True):
        topo = topology(cells=1, cores_per_cell=4, threads=1, memory_mb_per_cell=8192, huge_2m=0, small_pool=small_pool)
        plain = dom(vcpus=1, memory_kib=6 * 1024 * 1024)  # no numatune: bound to no node
        rep = compute_host_state(topo, [plain], [], NO_RESERVE)
        u = rep.state.cell_usage(0)
        assert u.used_memory_mb == 6144
        assert u.used_pages == ({4: 6144 * 256} if small_pool else {})
        assert rep.state.unbound_memory_mb == 0 and rep.unbound_memory_mb == 0
        assert rep.state.resources(0).small_free_mb == 2048
        # so a 6 GiB pinned guest does not fit any more
        assert not fit(request(1, 6144, page_kb=4), rep.state).fits
        assert fit(request(1, 2048, page_kb=4), rep.state).fits


def test_unbound_small_memory_on_a_multi_cell_host_is_host_state_unbound_memory():
    topo = topology(cells=2, cores_per_cell=2, threads=1, memory_mb_per_cell=4096, huge_2m=0)
    plain = dom(vcpus=1, memory_kib=3 * 1024 * 1024, numatune_nodeset=frozenset({0, 1}))
    rep = compute_host_state(topo, [plain], [], NO_RESERVE)
    assert rep.state.unbound_memory_mb == 3072 and rep.unbound_memory_mb == 3072
    assert all(rep.state.cell_usage(c).used_memory_mb == 0 for c in (0, 1))
    assert rep.state.to_json()["unbound_memory_mb"] == 3072
    # 8 GiB of small pages, 3 GiB used somewhere: 5 GiB left host-wide
    assert fit(request(2, 4096, page_kb=4, numa_nodes=2), rep.state).fits
    assert not fit(request(2, 6144, page_kb=4, numa_nodes=2), rep.state).fits
    # unbound hugepage memory is not small-page memory: reported, not in the small budget
    huge = dom(vcpus=1, memory_kib=1024 * 1024, hugepages=(HugepageBacking(2048, None),))
    rep = compute_host_state(TOPO, [huge], [], NO_RESERVE)
    assert rep.state.unbound_memory_mb == 0 and rep.unbound_memory_mb == 1024
    assert any("2048 KiB pages bound to no single host cell" in n for n in rep.notes)
