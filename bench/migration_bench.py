#!/usr/bin/env python3
"""Migration benchmark on the testbed (scripts/testbed): the agent's runner vs bare virsh.

    bench/migration_bench.py [--json] [--rounds N]

1. Overhead: the same idle guest (1 dedicated vCPU, 256 MiB) is migrated back and forth between
   host A and host B, alternately by the agent's MigrationRunner (placement from the destination's
   HostState + fit, XML rewritten, monitored) and by

       virsh -c <src> migrate --live --p2p --persistent --undefinesource DOMAIN <dest> <dest migration uri>

   (the same flags the runner uses with no auto-converge/post-copy). Each round does one migration
   with each method, the method that goes first alternating, so each method sees both directions.
   Reported: the median over rounds of runner wall time / virsh wall time (target <= 1.10).
2. The non-converging guest of tests/libvirt_ops/test_migration_testbed.py (64 MiB re-dirtied at
   20 MB/s, bandwidth capped at 16 MiB/s): total time and downtime with post-copy
   (scenario 3) and with auto-converge (scenario 4).

Only the bench's own domains (named mbench-*) are created and removed.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time

from agent.testing import testbed as tb

IDLE = "mbench-idle"
HOT = "mbench-hot"
HOT_GUEST = tb.HOT_GUEST
HOT_CFG = tb.HOT_MIGRATION


def remove(hosts, name: str) -> None:
    for h in hosts:
        tb.destroy_domain(h, name)


def where(hosts, name: str):
    import libvirt  # noqa: PLC0415

    for h in hosts:
        conn = h.connect()
        try:
            try:
                if conn.lookupByName(name).isActive():
                    return h
            except libvirt.libvirtError:
                pass
        finally:
            conn.close()
    raise RuntimeError(f"{name} runs nowhere")


def request_for(uuid: str, memory_mb: int, extra: dict | None = None):
    from agent.numa.request import parse_request  # noqa: PLC0415

    specs = {"hw:cpu_policy": "dedicated"}
    specs.update(extra or {})
    return parse_request(
        {"uuid": uuid, "vcpus": 1, "memory_mb": memory_mb, "extra_specs": specs, "image_properties": {}}
    )


def placement_on(host, request):
    from agent.claims.hoststate import compute_host_state  # noqa: PLC0415
    from agent.config import ComputeConfig  # noqa: PLC0415
    from agent.libvirt_ops.domain_xml import parse_domain  # noqa: PLC0415
    from agent.numa.discovery import discover_sysfs  # noqa: PLC0415
    from agent.numa.fit import fit  # noqa: PLC0415

    conn = host.connect()
    try:
        domains = [parse_domain(d.XMLDesc(0)) for d in conn.listAllDomains(0)]
    finally:
        conn.close()
    result = fit(request, compute_host_state(discover_sysfs(), domains, [], ComputeConfig()).state)
    if not result.fits:
        raise RuntimeError(f"no fit on {host.name}: {result.reason}")
    return result


def uuid_of(host, name: str) -> str:
    conn = host.connect()
    try:
        return conn.lookupByName(name).UUIDString()
    finally:
        conn.close()


def runner_migrate(src, dst, name: str, request, cfg, on_progress=None):
    """(wall seconds of open-connection + run(), outcome). The placement is the destination's
    business (its claim) and is computed before the clock starts."""
    from agent.libvirt_ops.connection import open_connection  # noqa: PLC0415
    from agent.libvirt_ops.migration import MigrationRunner, MigrationTarget  # noqa: PLC0415

    placement = placement_on(dst, request)
    target = MigrationTarget(uri=dst.uri, migrate_uri=dst.migration_uri, host=dst.name)
    t0 = time.monotonic()
    conn = open_connection(src.uri)
    try:
        outcome = MigrationRunner(conn, cfg).run(name, target, placement, request, on_progress)
    finally:
        conn.close()
    wall = time.monotonic() - t0
    if outcome.status != "completed":
        raise RuntimeError(f"runner migration {src.name} -> {dst.name} {outcome.status}: {outcome.reason}")
    return wall, outcome


def virsh_migrate(src, dst, name: str) -> float:
    cmd = [
        "virsh",
        "-c",
        src.uri,
        "migrate",
        "--live",
        "--p2p",
        "--persistent",
        "--undefinesource",
        name,
        dst.uri,
        dst.migration_uri,
    ]
    t0 = time.monotonic()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"virsh migrate failed: {r.stderr.strip()}")
    return wall


def overhead(hosts, rounds: int, log) -> dict:
    from agent.config import LibvirtConfig  # noqa: PLC0415

    a, b = hosts
    remove(hosts, IDLE)
    tb.define_and_start(a, tb.guest_xml(IDLE, memory_mib=256, vcpu_pins={0: [1]}, tick_s=5))
    tb.wait_guest_ready(a, IDLE, timeout=90)
    request = request_for(uuid_of(a, IDLE), 256)
    cfg = LibvirtConfig()
    runner_s, virsh_s, ratios = [], [], []
    try:
        # warm-up: one migration each way, not counted (first-use costs on each daemon)
        src = where(hosts, IDLE)
        dst = b if src is a else a
        runner_migrate(src, dst, IDLE, request, cfg)
        virsh_migrate(dst, src, IDLE)
        for i in range(rounds):
            order = ("runner", "virsh") if i % 2 == 0 else ("virsh", "runner")
            times = {}
            for method in order:
                src = where(hosts, IDLE)
                dst = b if src is a else a
                if method == "runner":
                    times[method], _ = runner_migrate(src, dst, IDLE, request, cfg)
                else:
                    times[method] = virsh_migrate(src, dst, IDLE)
                log(f"round {i + 1}: {method:6s} {src.name} -> {dst.name}: {times[method]:.3f} s")
            runner_s.append(times["runner"])
            virsh_s.append(times["virsh"])
            ratios.append(times["runner"] / times["virsh"])
    finally:
        remove(hosts, IDLE)
    return {
        "rounds": rounds,
        "runner_s": [round(x, 3) for x in runner_s],
        "virsh_s": [round(x, 3) for x in virsh_s],
        "ratios": [round(x, 3) for x in ratios],
        "ratio_median": round(statistics.median(ratios), 3),
        "runner_median_s": round(statistics.median(runner_s), 3),
        "virsh_median_s": round(statistics.median(virsh_s), 3),
    }


def hot(hosts, feature: str, log) -> dict:
    from agent.config import LibvirtConfig  # noqa: PLC0415

    a, b = hosts
    remove(hosts, HOT)
    tb.define_and_start(a, tb.guest_xml(HOT, **HOT_GUEST))
    tb.wait_guest_ready(a, HOT, timeout=90)
    key = {"postcopy": "compute:live_migration_post_copy", "autoconverge": "compute:live_migration_auto_converge"}
    request = request_for(uuid_of(a, HOT), 256, {key[feature]: "true"})
    throttles = []
    try:
        wall, outcome = runner_migrate(
            a, b, HOT, request, LibvirtConfig(**HOT_CFG), lambda p: throttles.append(p.throttle_pct)
        )
    finally:
        remove(hosts, HOT)
    log(
        f"{feature}: {outcome.status} in {outcome.elapsed_s:.1f} s (wall {wall:.1f} s), downtime "
        f"{outcome.downtime_ms} ms, post-copy {outcome.switched_to_postcopy}, max throttle {outcome.max_throttle_pct}%"
    )
    return {
        f"{feature}_total_s": round(outcome.elapsed_s, 2),
        f"{feature}_downtime_ms": outcome.downtime_ms,
        f"{feature}_switched_to_postcopy": outcome.switched_to_postcopy,
        f"{feature}_max_throttle_pct": max([outcome.max_throttle_pct, *throttles]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--rounds", type=int, default=5, help="overhead rounds (default 5)")
    ap.add_argument("--skip-hot", action="store_true", help="only the overhead comparison")
    args = ap.parse_args(argv)
    ok, why = tb.testbed_available()
    if not ok:
        print(f"testbed not available: {why}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    hosts = tb.ensure_testbed(2)
    result: dict = {}
    result.update(overhead(hosts, max(args.rounds, 1), log))
    if not args.skip_hot:
        result.update(hot(hosts, "postcopy", log))
        result.update(hot(hosts, "autoconverge", log))
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(
            f"runner/virsh wall-time ratio, median of {result['rounds']}: {result['ratio_median']:.3f} "
            f"(runner {result['runner_median_s']:.2f} s, virsh {result['virsh_median_s']:.2f} s; target <= 1.10)"
        )
        if not args.skip_hot:
            print(
                f"post-copy:     total {result['postcopy_total_s']:.1f} s, downtime {result['postcopy_downtime_ms']} ms"
            )
            print(
                f"auto-converge: total {result['autoconverge_total_s']:.1f} s, downtime "
                f"{result['autoconverge_downtime_ms']} ms, max throttle {result['autoconverge_max_throttle_pct']}%"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
