"""The no-double-booking invariant and ledger opening for the claim ledger tests.

Hosts, requests, host-state functions and the fake clock come from agent.testing (re-exported here
for the claims tests' imports).
"""

from __future__ import annotations

from typing import Iterable

from agent.claims.hoststate import compute_host_state
from agent.claims.ledger import Claim, Ledger
from agent.config import ComputeConfig
from agent.libvirt_ops.domain_xml import DomainPlacement
from agent.numa.state import HostState
from agent.numa.topology import SMALL_PAGE_KB, HostTopology
from agent.testing.builders import NO_RESERVE, request, state_fn, topology
from agent.testing.clock import FakeClock
from agent.testing.ledger import fill_ledger


def check_invariant(
    topo: HostTopology,
    claims: Iterable[Claim],
    domains: Iterable[DomainPlacement] = (),
    cfg: ComputeConfig = NO_RESERVE,
    active_uuids: Iterable[str] | None = None,
) -> HostState:
    """Every pCPU pinned by at most one holder; no page pool, small-page memory (per cell and
    host-wide, memory bound to no cell and reserved_host_memory_mb included) or floating capacity
    over-promised."""
    report = compute_host_state(topo, domains, claims, cfg, active_uuids=active_uuids)
    assert report.overlaps == (), report.overlaps
    state = report.state
    small_total = small_used = 0
    for cell in topo.cells:
        u = state.cell_usage(cell.id)
        assert u.pinned_cpus <= cell.cpus
        huge_total_kb = huge_used_kb = 0
        for pool in cell.pages:
            used = u.used_pages.get(pool.size_kb, 0)
            reserved = state.reserved_pages.get(cell.id, {}).get(pool.size_kb, 0)
            assert min(pool.free, pool.total - used) - reserved >= 0, (cell.id, pool, used)
            if pool.size_kb != SMALL_PAGE_KB:
                huge_total_kb += pool.total * pool.size_kb
                huge_used_kb += used * pool.size_kb
        small_pool = cell.page_pool(SMALL_PAGE_KB)
        if small_pool is not None:
            total_mb = small_pool.total * SMALL_PAGE_KB // 1024
            used_mb = -(-u.used_pages.get(SMALL_PAGE_KB, 0) * SMALL_PAGE_KB // 1024)
        else:
            total_mb = (cell.memory_kb - huge_total_kb) // 1024
            used_mb = u.used_memory_mb - huge_used_kb // 1024
        assert used_mb <= total_mb, ("small-page MiB", cell.id, used_mb, total_mb)
        small_total += total_mb
        small_used += used_mb
        res = state.resources(cell.id)
        shared = len(res.shared_cpus)
        assert u.floating_vcpus <= int(shared * state.cpu_allocation_ratio), (cell.id, u)
    # memory bound to no single cell (all of it small pages in these tests) is host-wide
    unbound = report.unbound_memory_mb
    assert small_used + unbound + state.reserved_memory_mb <= small_total, (
        "host small-page MiB",
        small_used,
        unbound,
        state.reserved_memory_mb,
        small_total,
    )
    return state


def open_ledger(path, clock=None, **kw) -> Ledger:
    if clock is not None:
        kw["clock"] = clock
    return Ledger.open(path, **kw)


__all__ = [
    "NO_RESERVE",
    "FakeClock",
    "check_invariant",
    "fill_ledger",
    "open_ledger",
    "request",
    "state_fn",
    "topology",
]
