"""Regression tests for issue 11, defect 10: the fitter let a guest cell be larger than the host
cell it lands on (more floating vCPUs than CPUs to float over, more memory than the cell has) when
the allocation ratios allowed it. Nova refuses that whatever the ratios: an instance cannot
overcommit against itself. `placed` / `nofit` check every answer against the independent validator
and the brute-force oracle of tests/numa/placement_check.py, which follow the same rule."""

from __future__ import annotations

import pytest

from agent.numa.request import CpuPolicy, PageSizeKind, PageSizeWish, ThreadPolicy, parse_request
from agent.numa.state import HostState
from agent.testing.builders import cells_request as req
from agent.testing.builders import host_state as host
from agent.testing.builders import state_cell as cell
from tests.numa.test_fit import nofit, pins, placed

SHARED = CpuPolicy.SHARED


@pytest.mark.parametrize("ratio", [1.0, 2.0, 4.0, 16.0])
def test_floating_vcpus_never_outnumber_the_cells_shared_cpus(ratio: float) -> None:
    st_ = host(cell(0, [0, 1, 2, 3]), cpu_allocation_ratio=ratio)
    p = placed(req((4, 1024), policy=SHARED), st_)
    assert all(p.cells[0].cpu_pins[v] == (0, 1, 2, 3) for v in range(4))
    r = nofit(req((5, 1024), policy=SHARED), st_)
    assert "5 floating vCPUs of guest cell 0 > the 4 shared CPUs" in r.reason or "room for" in r.reason


def test_ratio_still_lets_instances_share_the_cell() -> None:
    # 2 shared CPUs at ratio 4: four 2-vCPU instances, one after the other
    st_ = host(cell(0, [0, 1, 2, 3], floating_vcpus=6), cpu_shared_set=[0, 1], cpu_allocation_ratio=4.0)
    placed(req((2, 1024), policy=SHARED), st_)
    r = nofit(req((3, 1024), policy=SHARED), st_)
    assert "room for 2 more floating vCPUs" in r.reason  # the ratio binds first: its message


def test_floating_part_of_a_mixed_guest_cell_counts_the_cpus_left_to_it() -> None:
    # 4 CPUs in both pools, 1 dedicated vCPU: the 4 floating vCPUs would float over the 3 others
    st_ = host(cell(0, [0, 1, 2, 3]), cpu_allocation_ratio=4.0)
    r = nofit(req((5, 1024, 1), policy=CpuPolicy.MIXED), st_)
    assert "4 floating vCPUs of guest cell 0 > the 3 shared CPUs they would float over once the 1 CPUs" in r.reason
    p = placed(req((4, 1024, 1), policy=CpuPolicy.MIXED), st_)
    assert pins(p) == [0] and p.cells[0].cpu_pins[1] == (1, 2, 3)


def test_larger_guest_cell_goes_to_the_larger_host_cell() -> None:
    # the 6-vCPU guest cell fits only host cell 1; the ratio would have let it onto host cell 0
    st_ = host(cell(0, [0, 1, 2, 3]), cell(1, [4, 5, 6, 7, 8, 9, 10, 11]), cpu_allocation_ratio=4.0)
    p = placed(req((6, 1024), (2, 1024), policy=SHARED), st_, preference="pack")
    assert [c.host_cell for c in p.cells] == [1, 0]
    r = nofit(req((6, 1024), (6, 1024), policy=SHARED), st_)
    assert "guest cells 0 and 1 both only fit host cell 1" in r.reason


@pytest.mark.parametrize("ratio", [1.5, 2.0, 8.0])
def test_memory_never_exceeds_the_cells_small_pages(ratio: float) -> None:
    st_ = host(cell(0, [0, 1, 2, 3], small_mb=4096), ram_allocation_ratio=ratio)
    placed(req((2, 4096), policy=SHARED), st_)
    r = nofit(req((2, 4097), policy=SHARED), st_)
    assert "4097 MiB of guest cell 0 > the cell's 4096 MiB of small-page memory" in r.reason
    # a used cell still takes an overcommitted guest, up to its own size
    used = host(cell(0, [0, 1, 2, 3], small_mb=4096, small_free_mb=1024), ram_allocation_ratio=ratio)
    placed(req((2, min(4096, int(4096 * ratio) - 3072)), policy=SHARED), used)


def test_memory_limit_without_a_small_page_pool_is_memtotal_minus_hugepages() -> None:
    doc = {
        "hostname": "h",
        "cells": [
            {
                "id": 0,
                "cpus": [0, 1],
                "siblings": [[0], [1]],
                "memory_kb": 6 * 1048576,
                "pages": [{"size_kb": 2048, "total": 1024, "free": 1024}],  # 2 GiB of hugepages
            }
        ],
        "ram_allocation_ratio": 2.0,
    }
    st_ = HostState.from_json(doc)
    assert st_.resources(0).small_total_mb == 4096
    placed(req((1, 4096), policy=SHARED), st_)
    nofit(req((1, 4097), policy=SHARED), st_)
    # hugepages are bounded by the free pages anyway; ANY falls back to small pages within the limit
    any_ = PageSizeWish(PageSizeKind.ANY)
    assert placed(req((1, 2048), policy=SHARED, page=any_), st_).cells[0].pagesize_kb == 2048
    nofit(req((1, 4097), policy=SHARED, page=any_), st_)


def test_plain_instance_without_numa_is_held_to_one_cell() -> None:
    # the known limitation (one implicit guest cell) meets the rule: 3 vCPUs do not float over 2 CPUs
    request = parse_request({"uuid": "8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a12", "vcpus": 3, "memory_mb": 1024})
    two = host(cell(0, [0, 1]), cell(1, [2, 3]), cpu_allocation_ratio=16.0)
    nofit(request, two)
    placed(request, host(cell(0, [0, 1]), cell(1, [2, 3, 4])))


def test_isolate_on_smt_with_dedicated_set_reserves_whole_cores() -> None:
    # documented difference from Nova (fit.py): Nova filters SMT hosts out for isolate
    st_ = host(cell(0, list(range(8)), smt=True), cpu_dedicated_set=list(range(8)), cpu_shared_set=[])
    p = placed(req((2, 1024), threads=ThreadPolicy.ISOLATE), st_)
    assert pins(p) == [0, 1] and p.cells[0].reserved_cpus == frozenset({4, 5})
