"""Builders of the core's inputs: host topologies, host states, instance requests, the shared fit scenarios.

Each builder takes the few numbers a test cares about and fills in the rest the same way for everyone:

- `topology(cells=2, cores_per_cell=4, threads=2)`: a regular SMT host (`HostTopology`) with Linux
  CPU numbering and 2 MiB (and 1 GiB) page pools; `state_fn(topo)` turns it into the ledger's
  host-state function.
- `request(vcpus=2, memory_mb=1024)`: a dedicated, 2 MiB-page instance split evenly over `numa_nodes`
  guest cells (`InstanceRequest`), with a fresh UUID unless given one.
- `state_cell(0, [0, 1, 2, 3], smt=True, pinned=[1])` and `host_state(*cells)`: a `HostState` with
  usage, cell by cell; `cells_request((2, 1024), (2, 1024, 1))`: a request given cell by cell
  (vCPUs, MiB[, dedicated count]).
- `FIT_SCENARIOS` / `fit_scenarios()`: the fit scenarios shared with the fitter benchmark.
"""

from __future__ import annotations

import json
import uuid as uuidlib
from pathlib import Path
from typing import Any, Callable, Iterable

from agent.claims.hoststate import HostStateReport, host_state_fn
from agent.config import ComputeConfig
from agent.libvirt_ops.domain_xml import DomainPlacement
from agent.numa.request import (
    CpuPolicy,
    EmulatorThreadsPolicy,
    GuestCell,
    InstanceRequest,
    MigrationWishes,
    PageSizeKind,
    PageSizeWish,
    ThreadPolicy,
)
from agent.numa.state import HostState
from agent.numa.topology import HostTopology

__all__ = [
    "FIT_SCENARIOS",
    "NO_RESERVE",
    "cells_request",
    "fit_scenarios",
    "host_state",
    "request",
    "state_cell",
    "state_fn",
    "topology",
]

# No host memory held back, so that a test's numbers are the host's numbers.
NO_RESERVE = ComputeConfig(reserved_host_memory_mb=0)
# The scenario file the fitter's tests and bench/fit_bench.py share; it lives beside the checkout
# (shared/bench/), so tests skip when it is absent.
FIT_SCENARIOS = Path(__file__).resolve().parents[3] / "shared" / "bench" / "fit-scenarios.json"

_2M_KB, _1G_KB = 2048, 1048576
_NO_WISHES = MigrationWishes()  # host config decides every migration feature


# --- topologies and host states -------------------------------------------------------------------


def topology(
    cells: int = 2,
    cores_per_cell: int = 4,
    threads: int = 2,
    memory_mb_per_cell: int = 16384,
    huge_2m: int = 1024,
    huge_2m_free: int | None = None,
    huge_1g: int = 0,
    small_pool: bool = False,
    hostname: str = "test",
) -> HostTopology:
    """A host with `cells` cells of `cores_per_cell` cores x `threads` threads (Linux-style ids:
    thread t of core k of cell c is c*cores + k + t*cells*cores)."""
    pools = _page_pools(memory_mb_per_cell, huge_2m, huge_2m_free, huge_1g, small_pool)
    doc_cells = [_topology_cell(c, cells, cores_per_cell, threads, memory_mb_per_cell, pools) for c in range(cells)]
    return HostTopology.from_json({"hostname": hostname, "cells": doc_cells})


def _topology_cell(
    c: int, cells: int, cores_per_cell: int, threads: int, memory_mb: int, pools: list[dict[str, int]]
) -> dict[str, Any]:
    per_thread = cells * cores_per_cell
    siblings = [[c * cores_per_cell + k + t * per_thread for t in range(threads)] for k in range(cores_per_cell)]
    return {
        "id": c,
        "cpus": sorted(cpu for core in siblings for cpu in core),
        "siblings": sorted(siblings),
        "memory_kb": memory_mb * 1024,
        "pages": [dict(p) for p in pools],
        "distances": {str(o): 10 if o == c else 21 for o in range(cells)},
    }


def _page_pools(
    memory_mb: int, huge_2m: int, huge_2m_free: int | None, huge_1g: int, small_pool: bool
) -> list[dict[str, int]]:
    """One cell's page pools; the small pool (only with `small_pool`) is what the huge pages leave."""
    pools = []
    if small_pool:
        small = (memory_mb * 1024 - huge_2m * _2M_KB - huge_1g * _1G_KB) // 4
        pools.append({"size_kb": 4, "total": small, "free": small})
    if huge_2m:
        free = huge_2m if huge_2m_free is None else huge_2m_free
        pools.append({"size_kb": _2M_KB, "total": huge_2m, "free": free})
    if huge_1g:
        pools.append({"size_kb": _1G_KB, "total": huge_1g, "free": huge_1g})
    return pools


def state_fn(
    topo: HostTopology, domains: Iterable[DomainPlacement] = (), cfg: ComputeConfig = NO_RESERVE
) -> Callable[..., HostStateReport]:
    """The ledger's host-state function for `topo` with these running `domains`."""
    doms = list(domains)
    return host_state_fn(topo, lambda: doms, cfg)


def state_cell(
    cid: int,
    cpus: list[int],
    *,
    smt: bool = False,
    siblings: list[list[int]] | None = None,
    small_mb: int = 8192,
    small_free_mb: int | None = None,
    pages: dict[int, tuple[int, int]] | None = None,
    pinned: list[int] | None = None,
    used_pages: dict[int, int] | None = None,
    floating_vcpus: int = 0,
) -> dict[str, Any]:
    """A host-state cell. `smt` pairs CPUs i and i+len/2 as siblings (Linux numbering); `pages`
    maps a huge page size (KiB) to (total, free)."""
    if siblings is None:
        siblings = _siblings(cpus, smt)
    free_mb = small_mb if small_free_mb is None else small_free_mb
    page_list = [{"size_kb": 4, "total": small_mb * 256, "free": free_mb * 256}]
    for size, (total, free) in sorted((pages or {}).items()):
        page_list.append({"size_kb": size, "total": total, "free": free})
    huge_kb = sum(size * total for size, (total, _) in (pages or {}).items())
    return {
        "id": cid,
        "cpus": cpus,
        "siblings": siblings,
        "memory_kb": small_mb * 1024 + huge_kb,
        "pages": page_list,
        "pinned_cpus": pinned or [],
        "used_pages": {str(k): v for k, v in (used_pages or {}).items()},
        "floating_vcpus": floating_vcpus,
    }


def _siblings(cpus: list[int], smt: bool) -> list[list[int]]:
    if not smt:
        return [[c] for c in cpus]
    half = len(cpus) // 2
    return [[cpus[k], cpus[k + half]] for k in range(half)]


def host_state(*cells: dict[str, Any], **extra: Any) -> HostState:
    """A HostState of `state_cell` cells; `extra` adds top-level fields (cpu_dedicated_set, ...)."""
    return HostState.from_json({"hostname": "hv", "cells": list(cells), **extra})


# --- instance requests -----------------------------------------------------------------------------


def request(
    vcpus: int = 2,
    memory_mb: int = 1024,
    *,
    dedicated: bool = True,
    page_kb: int | None = 2048,
    numa_nodes: int = 1,
    emulator_isolate: bool = False,
    thread_policy: ThreadPolicy = ThreadPolicy.PREFER,
    uuid: str | None = None,
    migration: MigrationWishes = _NO_WISHES,
    numa_implicit: bool | None = None,
) -> InstanceRequest:
    """An instance of `vcpus` and `memory_mb` split evenly over `numa_nodes` guest cells. page_kb:
    None = not asked, 4 = small, else explicit. numa_implicit defaults to "no hw:numa_nodes" for one node."""
    assert vcpus % numa_nodes == 0 and memory_mb % numa_nodes == 0
    per = vcpus // numa_nodes
    cells = []
    for i in range(numa_nodes):
        ids = frozenset(range(i * per, (i + 1) * per))
        dedicated_ids = ids if dedicated else frozenset()
        cells.append(GuestCell(id=i, vcpus=ids, memory_mb=memory_mb // numa_nodes, dedicated_vcpus=dedicated_ids))
    return InstanceRequest(
        uuid=uuid or str(uuidlib.uuid4()),
        vcpus=vcpus,
        memory_mb=memory_mb,
        cells=tuple(cells),
        cpu_policy=CpuPolicy.DEDICATED if dedicated else CpuPolicy.SHARED,
        thread_policy=thread_policy,
        emulator_threads=EmulatorThreadsPolicy.ISOLATE if emulator_isolate else EmulatorThreadsPolicy.SHARE,
        page_size=_page_wish(page_kb),
        migration=migration,
        numa_implicit=numa_nodes == 1 if numa_implicit is None else numa_implicit,
    )


def _page_wish(page_kb: int | None) -> PageSizeWish | None:
    if page_kb is None:
        return None
    if page_kb == 4:
        return PageSizeWish(PageSizeKind.SMALL)
    return PageSizeWish(PageSizeKind.EXPLICIT, page_kb)


def cells_request(
    *cells: tuple[int, int] | tuple[int, int, int],
    policy: CpuPolicy = CpuPolicy.DEDICATED,
    threads: ThreadPolicy = ThreadPolicy.PREFER,
    emulator: EmulatorThreadsPolicy = EmulatorThreadsPolicy.SHARE,
    page: PageSizeWish | None = None,
) -> InstanceRequest:
    """cells: (vcpus, memory_mb[, dedicated count]) each; vCPU ids are consecutive across cells.
    Without a dedicated count a cell's vCPUs are all dedicated, or none under CpuPolicy.SHARED."""
    out = []
    nxt = 0
    for k, spec in enumerate(cells):
        vcpus = frozenset(range(nxt, nxt + spec[0]))
        nxt += spec[0]
        out.append(GuestCell(id=k, vcpus=vcpus, memory_mb=spec[1], dedicated_vcpus=_dedicated(spec, vcpus, policy)))
    return InstanceRequest(
        uuid="u",
        vcpus=nxt,
        memory_mb=sum(c.memory_mb for c in out),
        cells=tuple(out),
        cpu_policy=policy,
        thread_policy=threads,
        emulator_threads=emulator,
        page_size=page,
    )


def _dedicated(spec: tuple[int, ...], vcpus: frozenset[int], policy: CpuPolicy) -> frozenset[int]:
    if len(spec) == 3:
        return frozenset(sorted(vcpus)[: spec[2]])
    return frozenset() if policy is CpuPolicy.SHARED else vcpus


# --- shared scenarios ------------------------------------------------------------------------------


def fit_scenarios() -> list[dict[str, Any]]:
    """The shared fit scenarios ({"name", "host", "instance", ...} each); [] when the file is absent."""
    if not FIT_SCENARIOS.exists():
        return []
    scenarios: list[dict[str, Any]] = json.loads(FIT_SCENARIOS.read_text())
    return scenarios
