#!/usr/bin/env python3
"""Benchmark agent.numa.fit on a scenario file.

    .venv/bin/python bench/fit_bench.py --scenarios ../shared/bench/fit-scenarios.json [--json] [--repeat N]

The file is a JSON list of {"name", "host": <host state>, "instance": <request>} (other keys ignored).
Each scenario is parsed once (HostState.from_json, parse_request); only `fit` is timed, in process, at
least `--repeat` runs (default 20) and at least `--min-time` seconds (default 0.2) per scenario.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from agent.numa.fit import fit
from agent.numa.request import parse_request
from agent.numa.state import HostState


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = (len(sorted_values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def bench_one(scenario: dict[str, Any], repeat: int, min_time: float) -> dict[str, Any]:
    name = str(scenario.get("name", "?"))
    state = HostState.from_json(scenario["host"])
    request = parse_request(scenario["instance"])
    result = fit(request, state)  # warm-up, and the result we report
    times: list[float] = []
    clock = time.perf_counter
    start = clock()
    while len(times) < repeat or clock() - start < min_time:
        t0 = clock()
        fit(request, state)
        times.append(clock() - t0)
    times.sort()
    return {
        "name": name,
        "fits": result.fits,
        "median_ms": round(statistics.median(times) * 1000, 4),
        "p95_ms": round(_percentile(times, 0.95) * 1000, 4),
        "runs": len(times),
        "placement": result.to_json(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", required=True, type=Path, help="JSON list of scenarios")
    ap.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    ap.add_argument("--repeat", type=int, default=20, help="minimum runs per scenario (default 20)")
    ap.add_argument("--min-time", type=float, default=0.2, help="minimum seconds per scenario (default 0.2)")
    args = ap.parse_args(argv)
    try:
        scenarios = json.loads(args.scenarios.read_text())
    except (OSError, ValueError) as exc:
        print(f"fit_bench: cannot read {args.scenarios}: {exc}", file=sys.stderr)
        return 2
    if not isinstance(scenarios, list):
        print(f"fit_bench: {args.scenarios}: expected a JSON list of scenarios", file=sys.stderr)
        return 2
    rows = []
    for k, sc in enumerate(scenarios):
        try:
            rows.append(bench_one(sc, max(1, args.repeat), max(0.0, args.min_time)))
        except (AgentError, KeyError, TypeError) as exc:
            print(
                f"fit_bench: scenario {k} ({sc.get('name', '?') if isinstance(sc, dict) else '?'}): {exc}",
                file=sys.stderr,
            )
            return 2
    if args.json:
        out = [{k: r[k] for k in ("name", "fits", "median_ms", "p95_ms", "placement")} for r in rows]
        json.dump(out, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    width = max([len(r["name"]) for r in rows] + [8])
    print(f"{'scenario':<{width}}  {'fits':>5}  {'median_ms':>10}  {'p95_ms':>10}  {'runs':>6}")
    for r in rows:
        print(
            f"{r['name']:<{width}}  {str(r['fits']).lower():>5}  "
            f"{r['median_ms']:>10.3f}  {r['p95_ms']:>10.3f}  {r['runs']:>6}"
        )
    if rows:
        worst_med = max(rows, key=lambda r: r["median_ms"])
        worst_p95 = max(rows, key=lambda r: r["p95_ms"])
        print(
            f"\n{len(rows)} scenarios; max median {worst_med['median_ms']:.3f} ms ({worst_med['name']}), "
            f"max p95 {worst_p95['p95_ms']:.3f} ms ({worst_p95['name']})"
        )
        families: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            families.setdefault(r["name"].split("/", 1)[0], []).append(r)
        print(f"\n{'family':<16}  {'n':>3}  {'max median_ms':>13}  {'max p95_ms':>10}")
        for fam, rs in families.items():
            print(
                f"{fam:<16}  {len(rs):>3}  "
                f"{max(r['median_ms'] for r in rs):>13.3f}  {max(r['p95_ms'] for r in rs):>10.3f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
