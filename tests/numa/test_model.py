"""The shared NUMA model: topology/state/placement JSON and the resource semantics in state.py."""

import json

import pytest

from agent.errors import InvalidHostState, InvalidInput
from agent.numa.placement import CellPlacement, NoFit, Placement
from agent.numa.state import HostState
from agent.numa.topology import HostTopology
from agent.testing.builders import FIT_SCENARIOS, fit_scenarios


def _cell(**over):
    cell = {
        "id": 0,
        "cpus": [0, 1, 2, 3],
        "siblings": [[0, 2], [1, 3]],
        "memory_kb": 8 * 1048576,
        "pages": [
            {"size_kb": 4, "total": 1048576, "free": 524288},  # 4 GiB small, 2 GiB free
            {"size_kb": 2048, "total": 1024, "free": 1000},
            {"size_kb": 1048576, "total": 2, "free": 2},
        ],
        "distances": {"0": 10},
    }
    cell.update(over)
    return cell


def test_topology_round_trip():
    doc = {"hostname": "hv", "cells": [_cell()], "online_cpus": [0, 1, 2, 3], "offline_cpus": [], "isolated_cpus": []}
    topo = HostTopology.from_json(doc)
    assert topo.to_json() == doc
    assert HostTopology.from_json(json.dumps(doc)).to_json() == doc


@pytest.mark.parametrize(
    "cells, fragment",
    [
        ([_cell(), _cell()], "duplicate cell id"),
        ([_cell(), _cell(id=1)], "belong to two cells"),
        ([_cell(siblings=[[0, 1]])], "siblings"),
        ([_cell(pages=[{"size_kb": 2048, "total": 1, "free": 2}])], "free"),
        ([_cell(memory_kb=-1)], "memory_kb"),
        ([_cell(distances={"x": 1})], "distances"),
        ([_cell(cpus="0-3")], "$.cells[0].cpus"),
    ],
)
def test_bad_topology_is_typed(cells, fragment):
    with pytest.raises(InvalidHostState) as err:
        HostTopology.from_json({"cells": cells})
    assert fragment in str(err.value)


def test_not_json_is_typed():
    with pytest.raises(InvalidHostState, match="not valid JSON"):
        HostState.from_json(b"{nope")


def test_resources_semantics():
    doc = {
        "cells": [_cell(pinned_cpus=[0], used_pages={"2048": 100}, floating_vcpus=3)],
        "cpu_dedicated_set": [0, 1, 2],
        "cpu_shared_set": [3],
        "reserved_pages": {"0": {"2048": 10, "1048576": 1}},
        "cpu_allocation_ratio": 4.0,
        "ram_allocation_ratio": 1.5,
    }
    r = HostState.from_json(doc).resources(0)
    assert r.dedicated_cpus == {1, 2}
    assert r.shared_cpus == {3}
    assert r.floating_capacity == 1  # 1 shared CPU * 4.0 - 3 floating
    # min(free 1000, total 1024 - used 100) - reserved 10
    assert r.free_pages == {2048: 914, 1048576: 1}
    assert r.small_free_mb == 2048
    # floating: 4096 MiB * 1.5 - (4096 - 2048) used
    assert r.small_floating_mb == 4096
    assert HostState.from_json(HostState.from_json(doc).to_json()) == HostState.from_json(doc)


def test_small_pages_without_4k_entry_derive_from_memory():
    cell = _cell(pages=[{"size_kb": 2048, "total": 1024, "free": 512}], used_memory_mb=3072, used_pages={"2048": 512})
    r = HostState.from_json({"cells": [cell]}).resources(0)
    # 8 GiB - 2 GiB hugepages = 6 GiB small; used 3072 MiB of which 512 x 2 MiB = 1024 MiB hugepages
    assert r.small_free_mb == 6144 - 2048


def _no_4k(used_memory_mb, used_pages, free_2m):
    return HostState.from_json(
        {
            "cells": [
                _cell(
                    memory_kb=10 * 1048576,
                    pages=[{"size_kb": 2048, "total": 1024, "free": free_2m}],
                    used_memory_mb=used_memory_mb,
                    used_pages=used_pages,
                )
            ]
        }
    ).resources(0)


def test_small_used_without_4k_pool_is_our_accounting_not_the_kernels():
    # 10 GiB - 2 GiB hugepages = 8 GiB small in every case
    # hugepages taken by something that is not a domain (DPDK): kernel free 0, we hold none; a domain
    # holds 2 GiB of small pages -> that 2 GiB is small-page usage, the DPDK pages are not
    r = _no_4k(2048, {}, 0)
    assert r.small_free_mb == 6144
    assert r.free_pages == {2048: 0}
    # a claim holds 1024 x 2 MiB not yet backed by QEMU (kernel free still 1024): used_memory_mb
    # counts them (every page size) but they are no small-page memory
    r = _no_4k(2048, {"2048": 1024}, 1024)
    assert r.small_free_mb == 8192
    assert r.free_pages == {2048: 0}
    # a running domain backed by those hugepages (kernel agrees): same answer
    assert _no_4k(2048, {"2048": 1024}, 0).small_free_mb == 8192
    # mixed: 1 GiB of hugepages + 3 GiB small pages used
    r = _no_4k(4096, {"2048": 512}, 512)
    assert r.small_free_mb == 8192 - 3072
    assert r.small_floating_mb == 8192 - 3072  # ram_allocation_ratio 1.0
    # used_pages entries of 4 KiB (no 4 KiB pool reported) are small pages: not subtracted
    assert _no_4k(2048, {"4": 262144}, 1024).small_free_mb == 6144


def test_pinned_cpu_outside_cell_rejected():
    with pytest.raises(InvalidHostState, match="pinned_cpus"):
        HostState.from_json({"cells": [_cell(pinned_cpus=[9])]})


@pytest.mark.skipif(not FIT_SCENARIOS.exists(), reason="shared scenarios absent")
def test_scenario_memory_is_consistent_with_free_pages():
    """The shared scenarios count used_memory_mb over every page size; our small-page view of a
    cell must equal its 4 KiB free count (the no-fit scenarios ask for exactly that + 1 MiB)."""
    for sc in fit_scenarios():
        state = HostState.from_json(sc["host"])
        for res in state.all_resources():
            small = res.cell.page_pool(4)
            assert res.small_free_mb == small.free * 4 // 1024


def test_placement_round_trip_and_pinned_cpus():
    p = Placement(
        cells=(
            CellPlacement(
                guest_cell=0,
                host_cell=1,
                vcpus=(0, 1),
                cpu_pins={0: (5,), 1: (8, 9)},
                memory_mb=1024,
                pagesize_kb=2048,
                dedicated_vcpus=frozenset({0}),
                reserved_cpus=frozenset({6}),
            ),
        ),
        emulator_pins=(7,),
        emulator_isolated=True,
    )
    assert Placement.from_json(p.to_json()) == p
    assert p.pinned_cpus == {5, 6, 7}
    assert p.to_json()["cells"][0]["cpu_pins"] == {"0": [5], "1": [8, 9]}
    assert NoFit("no room").to_json() == {"fits": False, "cells": [], "emulator_pins": [], "reason": "no room"}


def test_placement_bad_input_typed():
    with pytest.raises(InvalidInput):
        Placement.from_json({"fits": True, "cells": [{"guest_cell": 0}]})
    with pytest.raises(InvalidInput, match="cpu_pins"):
        Placement.from_json(
            {
                "fits": True,
                "cells": [
                    {
                        "guest_cell": 0,
                        "host_cell": 0,
                        "vcpus": [0, 1],
                        "cpu_pins": {"0": [1]},
                        "memory_mb": 1,
                        "pagesize_kb": 4,
                    }
                ],
            }
        )


def _pl_cell(**over):
    c = {
        "guest_cell": 0,
        "host_cell": 0,
        "vcpus": [0, 1],
        "cpu_pins": {"0": [1], "1": [2, 3]},
        "memory_mb": 512,
        "pagesize_kb": 4,
        "dedicated_vcpus": [0],
    }
    c.update(over)
    return c


@pytest.mark.parametrize(
    "cells, emulator, field",
    [
        ([_pl_cell(dedicated_vcpus=[0, 7])], [], "dedicated_vcpus"),
        ([_pl_cell(pagesize_kb=0)], [], "pagesize_kb"),
        ([_pl_cell(pagesize_kb=-2048)], [], "pagesize_kb"),
        ([_pl_cell(pagesize_kb=1 << 31)], [], "pagesize_kb"),
        ([_pl_cell(memory_mb=-4096)], [], "memory_mb"),
        ([_pl_cell(memory_mb=1 << 41)], [], "memory_mb"),
        ([_pl_cell(host_cell=-1)], [], "host_cell"),
        ([_pl_cell(guest_cell=-1)], [], "guest_cell"),
        ([_pl_cell(), _pl_cell(host_cell=1, vcpus=[2], cpu_pins={"2": [5]}, dedicated_vcpus=[2])], [], "guest_cell"),
        (
            [_pl_cell(), _pl_cell(guest_cell=1, host_cell=1, vcpus=[1], cpu_pins={"1": [5]}, dedicated_vcpus=[])],
            [],
            "vcpus",
        ),
        ([_pl_cell(vcpus=[0, 0, 1])], [], "vcpus"),
        ([_pl_cell(vcpus=[-1, 1], cpu_pins={"-1": [1], "1": [2]}, dedicated_vcpus=[])], [], "vcpus"),
        ([_pl_cell(cpu_pins={"0": [], "1": [2, 3]})], [], "cpu_pins[0]"),
        ([_pl_cell(cpu_pins={"0": [1], "1": [2, -3]})], [], "cpu_pins[1]"),
        ([_pl_cell(reserved_cpus=[-1])], [], "reserved_cpus"),
        ([_pl_cell()], [-1], "emulator_pins"),
    ],
)
def test_placement_from_json_rejects_insane_documents(cells, emulator, field):
    # a domain's agent metadata is read back with Placement.from_json: a bad document must be an
    # InvalidInput naming the field, never a crash (KeyError, ZeroDivisionError) or negative usage later
    with pytest.raises(InvalidInput, match=field.replace("[", r"\[").replace("]", r"\]")):
        Placement.from_json({"fits": True, "cells": cells, "emulator_pins": emulator})


def test_placement_from_json_accepts_what_the_fitter_writes():
    ok = Placement.from_json(
        {
            "fits": True,
            "cells": [
                _pl_cell(),
                _pl_cell(
                    guest_cell=1,
                    host_cell=1,
                    vcpus=[2],
                    cpu_pins={"2": [5]},
                    dedicated_vcpus=[2],
                    memory_mb=0,
                    pagesize_kb=1048576,
                ),
            ],
            "emulator_pins": [1, 2, 3, 5],
        }
    )
    assert [c.host_cell for c in ok.cells] == [0, 1]
    assert ok.pinned_cpus == {1, 5}
