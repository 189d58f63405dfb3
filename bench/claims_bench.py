"""Claim ledger benchmark: claim + release cycles on a 2-cell, 64-thread host, ledger on disk.

    .venv/bin/python bench/claims_bench.py [--cycles N] [--dir DIR] [--json]
    .venv/bin/python bench/claims_bench.py --scale 20000 [--json]

Each cycle claims a 4-vCPU dedicated, 2 MiB-page instance (the fit sees every live claim: the
host state is recomputed from the ledger inside the claim transaction, as in the agent) and releases
it. The ledger is the real one: WAL, synchronous=FULL, every change one fsync'ed transaction. A
background of 8 held claims keeps the host partly full. Reports claims per second (claim calls
only) and p50/p99 latency of `claim()`; `--json` prints one object with claims_per_s, p50_ms, p99_ms.

`--scale N`: a ledger of N stored claims (one in 400 held, the rest released; built fast by
agent.testing.ledger.fill_ledger), then the median of 5 runs of: the agent's open (integrity check,
schema, every claim's checksum, live claims in full), a read-only open, and `compute-agent claims
list` as a table, as JSON, and as JSON with `--all`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from agent.claims.hoststate import host_state_fn
from agent.claims.ledger import Ledger
from agent.config import ComputeConfig
from agent.numa.request import InstanceRequest
from agent.numa.topology import HostTopology
from agent.testing.builders import request


def build_topology() -> HostTopology:
    """2 cells x 16 cores x 2 threads = 64 CPUs, 64 GiB and 16384 x 2 MiB pages per cell."""
    cells = []
    for c in range(2):
        siblings = [[c * 16 + k, c * 16 + k + 32] for k in range(16)]
        cpus = sorted(x for g in siblings for x in g)
        cells.append(
            {
                "id": c,
                "cpus": cpus,
                "siblings": siblings,
                "memory_kb": 64 * 1024 * 1024,
                "pages": [{"size_kb": 2048, "total": 16384, "free": 16384}],
                "distances": {"0": 10 if c == 0 else 21, "1": 21 if c == 0 else 10},
            }
        )
    return HostTopology.from_json({"hostname": "bench", "cells": cells})


def make_request() -> InstanceRequest:
    """4 dedicated vCPUs and 4 GiB of 2 MiB pages in one implicit guest cell, with a fresh UUID."""
    return request(vcpus=4, memory_mb=4096)


def run(cycles: int, directory: Path, warmup: int = 200) -> dict[str, float]:
    topo = build_topology()
    fn = host_state_fn(topo, list, ComputeConfig())
    lat: list[float] = []
    with Ledger.open(directory) as led:
        for i in range(8):
            led.claim(f"background-{i}", make_request(), "src", 3600, fn)
        for i in range(warmup):  # warm-up: past the first WAL checkpoint (steady state)
            led.claim(f"warm-{i}", make_request(), "src", 60, fn)
            led.release(f"warm-{i}", "bench")
        claim_total = 0.0
        t_all = time.perf_counter()
        for i in range(cycles):
            req = make_request()
            t0 = time.perf_counter()
            led.claim(f"bench-{i}", req, "src", 60, fn)
            dt = time.perf_counter() - t0
            lat.append(dt)
            claim_total += dt
            led.release(f"bench-{i}", "bench cycle")
        wall = time.perf_counter() - t_all
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return {
        "cycles": cycles,
        "claims_per_s": round(cycles / claim_total, 1),
        "cycles_per_s": round(cycles / wall, 1),
        "p50_ms": round(statistics.median(lat) * 1000, 3),
        "p99_ms": round(q[98] * 1000, 3),
        "max_ms": round(max(lat) * 1000, 3),
    }


def _median_s(fn, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 3)


def _cli_list(directory: Path, *extra: str) -> None:
    from agent.claims.cli import add_claims_parser

    parser = argparse.ArgumentParser()
    add_claims_parser(parser.add_subparsers())
    args = parser.parse_args(["claims", "--state-dir", str(directory), *extra])
    with contextlib.redirect_stderr(io.StringIO()):
        assert args.func(args, io.StringIO(), io.StringIO()) == 0


def scale(n: int, directory: Path) -> dict[str, float]:
    from agent.testing.ledger import fill_ledger

    fill_ledger(directory, n)

    def agent_open() -> None:
        Ledger.open(directory).close()

    def readonly_open() -> None:
        Ledger.open(directory, readonly=True).close()

    return {
        "claims": n,
        "agent_open_s": _median_s(agent_open),
        "readonly_open_s": _median_s(readonly_open),
        "list_table_s": _median_s(lambda: _cli_list(directory, "list")),
        "list_json_s": _median_s(lambda: _cli_list(directory, "--json", "list")),
        "list_json_all_s": _median_s(lambda: _cli_list(directory, "--json", "list", "--all"), runs=3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=500)
    ap.add_argument("--dir", type=Path, default=None, help="where the ledger goes (default: a temp dir)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--scale", type=int, default=0, metavar="N", help="time open and list with N stored claims")
    args = ap.parse_args()
    if args.scale:
        with tempfile.TemporaryDirectory(prefix="claims-scale-", dir="/var/tmp") as d:
            print(json.dumps(scale(args.scale, Path(d))))
        return 0
    if args.dir is None:
        with tempfile.TemporaryDirectory(prefix="claims-bench-", dir="/var/tmp") as d:
            res = run(args.cycles, Path(d))
    else:
        res = run(args.cycles, args.dir)
    if args.json:
        print(json.dumps(res))
    else:
        print(
            f"{res['cycles']} claim+release cycles: {res['claims_per_s']} claims/s "
            f"({res['cycles_per_s']} cycles/s), claim p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, "
            f"max {res['max_ms']} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
