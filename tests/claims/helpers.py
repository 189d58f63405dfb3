"""Small hosts, requests and the no-double-booking invariant for the claim ledger tests."""

from __future__ import annotations

import uuid as uuidlib
from typing import Iterable

from agent.claims.hoststate import compute_host_state, host_state_fn
from agent.claims.ledger import Claim, Ledger
from agent.config import ComputeConfig
from agent.libvirt_ops.domain_xml import DomainPlacement
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
from agent.numa.topology import SMALL_PAGE_KB, HostTopology

NO_RESERVE = ComputeConfig(reserved_host_memory_mb=0)


def topology(
    cells: int = 2,
    cores_per_cell: int = 4,
    threads: int = 2,
    memory_mb_per_cell: int = 16384,
    huge_2m: int = 1024,
    huge_2m_free: int | None = None,
    huge_1g: int = 0,
    small_pool: bool = False,
) -> HostTopology:
    """A host with `cells` cells of `cores_per_cell` cores x `threads` threads (Linux-style ids:
    thread t of core k of cell c is c*cores + k + t*cells*cores)."""
    per_thread = cells * cores_per_cell
    doc_cells = []
    for c in range(cells):
        cpus, siblings = [], []
        for k in range(cores_per_cell):
            core = [c * cores_per_cell + k + t * per_thread for t in range(threads)]
            cpus += core
            siblings.append(core)
        pages = []
        huge_kb = huge_2m * 2048 + huge_1g * 1048576
        if small_pool:
            small = (memory_mb_per_cell * 1024 - huge_kb) // 4
            pages.append({"size_kb": 4, "total": small, "free": small})
        if huge_2m:
            pages.append({"size_kb": 2048, "total": huge_2m, "free": huge_2m if huge_2m_free is None else huge_2m_free})
        if huge_1g:
            pages.append({"size_kb": 1048576, "total": huge_1g, "free": huge_1g})
        doc_cells.append(
            {
                "id": c,
                "cpus": sorted(cpus),
                "siblings": sorted(siblings),
                "memory_kb": memory_mb_per_cell * 1024,
                "pages": pages,
                "distances": {str(o): 10 if o == c else 21 for o in range(cells)},
            }
        )
    return HostTopology.from_json({"hostname": "test", "cells": doc_cells})


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
) -> InstanceRequest:
    assert vcpus % numa_nodes == 0 and memory_mb % numa_nodes == 0
    per = vcpus // numa_nodes
    cells = []
    for i in range(numa_nodes):
        ids = frozenset(range(i * per, (i + 1) * per))
        cells.append(
            GuestCell(
                id=i, vcpus=ids, memory_mb=memory_mb // numa_nodes, dedicated_vcpus=ids if dedicated else frozenset()
            )
        )
    page = (
        None
        if page_kb is None
        else (PageSizeWish(PageSizeKind.SMALL) if page_kb == 4 else PageSizeWish(PageSizeKind.EXPLICIT, page_kb))
    )
    return InstanceRequest(
        uuid=uuid or str(uuidlib.uuid4()),
        vcpus=vcpus,
        memory_mb=memory_mb,
        cells=tuple(cells),
        cpu_policy=CpuPolicy.DEDICATED if dedicated else CpuPolicy.SHARED,
        thread_policy=thread_policy,
        emulator_threads=EmulatorThreadsPolicy.ISOLATE if emulator_isolate else EmulatorThreadsPolicy.SHARE,
        page_size=page,
        numa_implicit=numa_nodes == 1,
    )


def state_fn(topo: HostTopology, domains: Iterable[DomainPlacement] = (), cfg: ComputeConfig = NO_RESERVE):
    doms = list(domains)
    return host_state_fn(topo, lambda: doms, cfg)


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


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def fill_ledger(state_dir, n: int, *, live_every: int = 400, now: float = 1_000_000.0) -> None:
    """A ledger with `n` claims, fast (about a second for 20,000): one real claim is stored through
    the ledger, then copied `n` times by one SQL statement, every copy's checksum computed by the
    ledger's own claim_sum. One claim in `live_every` is held, the others released."""
    from agent.claims.rows import CLAIM_COLUMNS

    cols = ", ".join(CLAIM_COLUMNS)
    with Ledger.open(state_dir, clock=lambda: now) as led:
        led.claim("proto", request(2, 512), "src", 600, state_fn(topology()))
        conn = led._conn
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            f"""WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i + 1 < ?)
            INSERT INTO claims ({cols}, row_sum)
            SELECT printf('m%06d', i), printf('00000000-0000-4000-8000-%012d', i), source_host, request_json,
                   placement_json, CASE WHEN i % ? = 0 THEN 'held' ELSE 'released' END,
                   created_at + i, expires_at + i, updated_at + i, reason, ttl_s, ''
            FROM seq, claims WHERE migration_id = 'proto'""",
            (n, live_every),
        )
        conn.execute("DELETE FROM claims WHERE migration_id = 'proto'")
        conn.execute(f"UPDATE claims SET row_sum = claim_sum({cols})")
        conn.execute("COMMIT")
