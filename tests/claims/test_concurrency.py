"""Concurrent claims never double-book: 64 threads, and several processes on one ledger file."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from agent.claims.errors import NoFitError
from agent.claims.ledger import ClaimState, Ledger
from tests.claims.helpers import check_invariant, request, state_fn, topology


@pytest.mark.parametrize("binding", ["cpus", "pages"])
def test_64_threads_exactly_k_succeed(tmp_path, binding):
    if binding == "cpus":
        # 16 CPUs, 2 dedicated vCPUs each -> K = 8 (pages are plentiful)
        topo, req_args, k = topology(cells=2, cores_per_cell=4, threads=2, huge_2m=4096), (2, 256), 8
    else:
        # 64 CPUs, 2 x 64 pages of 2 MiB, 20 pages per claim -> 3 per cell, K = 6
        topo, req_args, k = topology(cells=2, cores_per_cell=16, threads=2, huge_2m=64), (2, 40), 6
    fn = state_fn(topo)
    shared = Ledger.open(tmp_path)
    own = [Ledger.open(tmp_path) for _ in range(8)]  # other Ledger objects on the same file
    n = 64
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def worker(i: int) -> None:
        led = shared if i % 2 == 0 else own[i % 8]
        barrier.wait()
        try:
            results[i] = led.claim(f"m-{i}", request(*req_args), "src", 60, fn)
        except NoFitError as exc:
            results[i] = exc
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ok = [r for r in results if getattr(r, "state", None) is ClaimState.HELD]
    nofit = [r for r in results if isinstance(r, NoFitError)]
    assert len(ok) == k, [r for r in results if r not in ok and r not in nofit]
    assert len(nofit) == n - k
    live = shared.live_claims()
    assert len(live) == k
    check_invariant(topo, live)
    for led in [shared, *own]:
        led.close()


def _mp_worker(path: str, worker: int, count: int, out) -> None:  # runs in a child process
    topo = topology(cells=2, cores_per_cell=4, threads=2, huge_2m=4096)
    fn = state_fn(topo)
    got = []
    with Ledger.open(path) as led:
        for j in range(count):
            try:
                led.claim(f"p{worker}-{j}", request(2, 256), f"src{worker}", 60, fn)
                got.append(f"p{worker}-{j}")
            except NoFitError:
                pass
    out.put(got)


def test_processes_on_one_file_exactly_k_succeed(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_mp_worker, args=(str(tmp_path), w, 4, out)) for w in range(4)]
    for p in procs:
        p.start()
    won = []
    for _ in procs:
        won += out.get(timeout=60)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len(won) == 8  # 16 CPUs / 2 per claim, 16 attempts
    with Ledger.open(tmp_path) as led:
        live = led.live_claims()
        assert sorted(c.migration_id for c in live) == sorted(won)
        check_invariant(topology(cells=2, cores_per_cell=4, threads=2, huge_2m=4096), live)
