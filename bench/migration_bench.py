#!/usr/bin/env python3
"""Migration benchmark on the testbed (scripts/testbed): the agent's runner vs bare virsh.

    .venv/bin/python bench/migration_bench.py [--json] [--rounds N]

1. Overhead: the same idle guest (1 dedicated vCPU, 256 MiB) is migrated back and forth between
   host A and host B, alternately by the agent's MigrationRunner (placement from the destination's
   HostState + fit, XML rewritten, monitored) and by

       virsh -c <src> migrate --live --p2p --persistent --undefinesource DOMAIN <dest> <dest migration uri>

   (the same flags the runner uses with no auto-converge/post-copy). Each round does one migration
   with each method, the method that goes first alternating, so each method sees both directions.
   Reported: the median over rounds of runner wall time / virsh wall time (target <= 1.10).
2. The non-converging guest of tests/libvirt_ops/test_migration_testbed.py (64 MiB re-dirtied at
   20 MB/s, bandwidth capped at 16 MiB/s): total time and downtime with post-copy
   (scenario 3) and with auto-converge (scenario 4), and the pre-flight prediction (dirty rate
   measured before starting) against what happened (pre-copy alone did not converge: post-copy
   switched on the stall / auto-converge had to throttle).
3. Post-copy recovery: the same guest (verifying its writes), post-copy forced after 3 s, and 1 s
   into post-copy the stream into the destination is broken for 5 s (agent.testing.testbed.StreamBreaker:
   packets to/from its migration ports dropped, the stream's sockets killed). Reported: seconds from
   the break to post-copy running again, from the break to the migration's end, and lost pages.

A scenario that does not complete (a loaded machine can push auto-converge past its completion
timeout) is reported as a figure (status, elapsed) instead of crashing the bench.
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
BROKEN = "mbench-broken"
BREAK_S = 5.0
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


def runner_migrate(src, dst, name: str, request, cfg, on_progress=None, hook=None, check=True):
    """(wall seconds of open-connection + run(), outcome). The placement is the destination's
    business (its claim) and is computed before the clock starts. `hook(runner)` sees the runner
    before it runs; `check=False` returns an outcome that is not "completed" instead of raising."""
    from agent.libvirt_ops.connection import open_connection  # noqa: PLC0415
    from agent.libvirt_ops.migration import MigrationRunner, MigrationTarget  # noqa: PLC0415

    placement = placement_on(dst, request)
    target = MigrationTarget(uri=dst.uri, migrate_uri=dst.migration_uri, host=dst.name)
    t0 = time.monotonic()
    conn = open_connection(src.uri)
    try:
        runner = MigrationRunner(conn, cfg)
        if hook is not None:
            hook(runner)
        outcome = runner.run(name, target, placement, request, on_progress)
    finally:
        conn.close()
    wall = time.monotonic() - t0
    if check and outcome.status != "completed":
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
    # like for like with virsh: no pre-flight dirty-rate measurement (it adds its length, 1 s by
    # default, to every migration; reported with the hot scenarios instead)
    cfg = LibvirtConfig(live_migration_preflight_dirty_rate_s=0)
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
            a, b, HOT, request, LibvirtConfig(**HOT_CFG), lambda p: throttles.append(p.throttle_pct), check=False
        )
    finally:
        remove(hosts, HOT)
    log(
        f"{feature}: {outcome.status} in {outcome.elapsed_s:.1f} s (wall {wall:.1f} s), downtime "
        f"{outcome.downtime_ms} ms, post-copy {outcome.switched_to_postcopy}, max throttle {outcome.max_throttle_pct}%"
        + ("" if outcome.status == "completed" else f" ({outcome.reason})")
    )
    prediction = outcome.preflight.prediction if outcome.preflight else None
    return {
        f"{feature}_status": outcome.status,  # not "completed": e.g. the completion timeout on a loaded machine
        f"{feature}_total_s": round(outcome.elapsed_s, 2),
        f"{feature}_downtime_ms": outcome.downtime_ms,
        f"{feature}_switched_to_postcopy": outcome.switched_to_postcopy,
        f"{feature}_max_throttle_pct": max([outcome.max_throttle_pct, *throttles]),
        f"{feature}_preflight_dirty_mib_s": (
            round(outcome.preflight.dirty_rate_bps / (1 << 20), 1) if outcome.preflight else None
        ),
        f"{feature}_preflight_predicted_converges": prediction.converges if prediction else None,
        # what happened: pre-copy alone did not converge when it needed the switch or the throttle
        f"{feature}_precopy_alone_converged": not (outcome.switched_to_postcopy or outcome.max_throttle_pct > 0),
    }


def recovery(hosts, log) -> dict:
    """Scenario 3 of the module docstring."""
    from agent.config import LibvirtConfig  # noqa: PLC0415

    a, b = hosts
    remove(hosts, BROKEN)
    tb.define_and_start(a, tb.guest_xml(BROKEN, extra_cmdline="dirty_verify=1", **HOT_GUEST))
    tb.wait_guest_ready(a, BROKEN, timeout=90)
    request = request_for(uuid_of(a, BROKEN), 256, {"compute:live_migration_post_copy": "true"})
    cfg = LibvirtConfig(
        **dict(HOT_CFG, live_migration_post_copy_bandwidth_mib=4, live_migration_postcopy_switch="never")
    )
    breaker = tb.StreamBreaker(b, BREAK_S)
    seen: dict = {}

    def on_progress(p):
        now = time.monotonic()
        if p.elapsed_s > 3 and "forced" not in seen:
            seen["forced"] = seen["runner"].force_complete()
        if p.phase == "postcopy" and breaker.started_at is None:
            seen.setdefault("postcopy_at", now)
            if now >= seen["postcopy_at"] + 1.0:
                breaker.start()
        broken = p.verdict_why.startswith("post-copy stream broken")
        if broken:
            seen.setdefault("broken_seen_at", now)
        elif "broken_seen_at" in seen and p.phase == "postcopy":
            seen.setdefault("resumed_seen_at", now)

    try:
        wall, outcome = runner_migrate(
            a, b, BROKEN, request, cfg, on_progress, hook=lambda r: seen.update(runner=r), check=False
        )
        ended = time.monotonic()
        breaker.join(30)
        time.sleep(6)  # a few verified passes on the destination
        verified, bad = tb.dirtier_verdict(b, BROKEN)[:2] if outcome.status == "completed" else (None, None)
    finally:
        breaker.stop()
        breaker.join(30)
        remove(hosts, BROKEN)
    rec = outcome.postcopy_recoveries[0] if outcome.postcopy_recoveries else None
    broke = breaker.started_at
    resumed = seen.get("resumed_seen_at")
    result = {
        "postcopy_recovery_status": outcome.status,
        "postcopy_recovery_break_s": BREAK_S,
        # from the break (sockets killed, link down) to post-copy running again / to the end of the migration
        "postcopy_recovery_resume_s": round(resumed - broke, 2) if broke and resumed else None,
        "postcopy_recovery_total_s": round(ended - broke, 2) if broke else None,
        "postcopy_recovery_attempts": rec.attempts if rec else 0,
        "postcopy_recovery_runner_resume_s": rec.resume_s if rec else None,  # from the failure libvirt reported
        "postcopy_recovery_verified_pages": verified,
        "postcopy_recovery_lost_pages": bad,
    }
    log(
        f"post-copy recovery: {outcome.status} (wall {wall:.1f} s); break {BREAK_S:.0f} s, resumed "
        f"{result['postcopy_recovery_resume_s']} s after it, migration done {result['postcopy_recovery_total_s']} s "
        f"after it ({result['postcopy_recovery_attempts']} attempts); {verified} pages verified, {bad} lost"
        + ("" if outcome.status == "completed" else f" ({outcome.reason})")
    )
    return result


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
        result["preflight_predicted_converges"] = result["postcopy_preflight_predicted_converges"]
        result.update(recovery(hosts, log))
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(
            f"runner/virsh wall-time ratio, median of {result['rounds']}: {result['ratio_median']:.3f} "
            f"(runner {result['runner_median_s']:.2f} s, virsh {result['virsh_median_s']:.2f} s; target <= 1.10)"
        )
        if not args.skip_hot:
            print(
                f"post-copy:     {result['postcopy_status']}, total {result['postcopy_total_s']:.1f} s, "
                f"downtime {result['postcopy_downtime_ms']} ms"
            )
            print(
                f"auto-converge: {result['autoconverge_status']}, total {result['autoconverge_total_s']:.1f} s, "
                f"downtime {result['autoconverge_downtime_ms']} ms, "
                f"max throttle {result['autoconverge_max_throttle_pct']}%"
            )
            print(
                f"pre-flight:    predicted pre-copy converges: {result['preflight_predicted_converges']} "
                f"(dirty {result['postcopy_preflight_dirty_mib_s']} MiB/s at 16 MiB/s); pre-copy alone converged: "
                f"{result['postcopy_precopy_alone_converged']}"
            )
            print(
                f"recovery:      {result['postcopy_recovery_status']}, break {BREAK_S:.0f} s, resumed "
                f"{result['postcopy_recovery_resume_s']} s after the break, done "
                f"{result['postcopy_recovery_total_s']} s after it, lost pages {result['postcopy_recovery_lost_pages']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
