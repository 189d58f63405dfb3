#!/usr/bin/env python3
"""Calibrate / demonstrate non-converging live migrations on the testbed.

    .venv/bin/python scripts/testbed.d/migration_demo.py \
        [--mb 64] [--rate 256] [--bw 32] [--timeout 25] [MODE ...]

MODE: plain | postcopy | autoconverge | autoconverge-tuned (default: all four).
Boots a guest on host1 with the dirtier (dirty_mb/dirty_rate_mbps), migrates
it to host2 with migrateToURI3(LIVE|PEER2PEER|PERSIST_DEST|UNDEFINE_SOURCE,
bandwidth cap --bw MiB/s) and reports whether/when it converged.  `plain` is
aborted after --timeout s (expected: does not converge); `postcopy` switches to
post-copy after 3 s; `autoconverge-tuned` sets auto_converge.initial /
auto_converge.increment (--ac-initial 99 --ac-increment 1 by default).  Needs the libvirt binding; run as root.
"""

import argparse
import sys
import threading
import time
import uuid

from agent.testing.testbed import (
    _libvirt,
    define_and_start,
    destroy_domain,
    ensure_testbed,
    guest_xml,
    wait_console_line,
    wait_guest_ready,
)


def migration_flags_params(mode, h2, args):
    """migrateToURI3 flags and params for `mode`, bandwidth capped at --bw MiB/s."""
    libvirt = _libvirt()
    flags = (
        libvirt.VIR_MIGRATE_LIVE
        | libvirt.VIR_MIGRATE_PEER2PEER
        | libvirt.VIR_MIGRATE_PERSIST_DEST
        | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    )
    params = {libvirt.VIR_MIGRATE_PARAM_URI: h2.migration_uri, libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: args.bw}
    if mode.startswith("autoconverge"):
        flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
    if mode == "autoconverge-tuned":
        params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] = args.ac_initial
        params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT] = args.ac_increment
    if mode == "postcopy":
        flags |= libvirt.VIR_MIGRATE_POSTCOPY
    return flags, params


def start_migration(dom, h2, flags, params):
    """migrateToURI3 in a thread; returns (thread, result dict: "ok" or "err")."""
    libvirt = _libvirt()
    res = {}

    def mig():
        try:
            dom.migrateToURI3(h2.uri, params, flags)
            res["ok"] = True
        except libvirt.libvirtError as e:
            res["err"] = str(e)

    th = threading.Thread(target=mig)
    th.start()
    return th, res


def watch(dom, th, t0, mode, args):
    """Poll the job until it ends or the time limit; post-copy after 3 s in mode postcopy.
    Returns (post-copy switch time or None, -1 if it failed; max auto-converge throttle %)."""
    libvirt = _libvirt()
    switched = None
    max_thr = 0
    limit = args.timeout if mode == "plain" else max(args.timeout, 90)
    while th.is_alive() and time.monotonic() - t0 < limit:
        th.join(0.5)
        try:
            st = dom.jobStats()
            max_thr = max(max_thr, st.get("auto_converge_throttle", 0) or 0)
        except libvirt.libvirtError:
            pass
        if mode == "postcopy" and switched is None and time.monotonic() - t0 > 3:
            switched = switch_to_postcopy(dom, t0)
    return switched, max_thr


def switch_to_postcopy(dom, t0):
    try:
        dom.migrateStartPostCopy(0)
        return time.monotonic() - t0
    except _libvirt().libvirtError as e:
        print("  migrateStartPostCopy failed: %s" % e)
        return -1


def report(mode, args, converged, el, switched, max_thr, err):
    extra = ""
    if switched:
        extra += " postcopy-switch@%.1fs" % switched
    if mode.startswith("autoconverge"):
        extra += " max-throttle=%d%%" % max_thr
    if mode == "autoconverge-tuned":
        extra += " (initial=%d increment=%d)" % (args.ac_initial, args.ac_increment)
    print(
        "%-19s %s in %5.1fs (mb=%d rate=%d MiB/s bw=%d MiB/s)%s %s"
        % (
            mode,
            "CONVERGED    " if converged else "NOT CONVERGED",
            el,
            args.mb,
            args.rate,
            args.bw,
            extra,
            "" if converged else err,
        ),
        flush=True,
    )


def run(mode, h1, h2, args):
    name = "migdemo-%s-%s" % (mode, uuid.uuid4().hex[:6])
    define_and_start(
        h1,
        guest_xml(
            name,
            vcpu_pins={0: [1]},
            emulator_pins=[0],
            dirty_mb=args.mb,
            dirty_rate_mbps=args.rate,
            tick_s=2,
        ),
    )
    try:
        wait_guest_ready(h1, name, 120)
        wait_console_line(h1, name, "TESTBED-GUEST-TICK", 60)
        c1 = h1.connect()
        dom = c1.lookupByName(name)
        flags, params = migration_flags_params(mode, h2, args)
        t0 = time.monotonic()
        th, res = start_migration(dom, h2, flags, params)
        switched, max_thr = watch(dom, th, t0, mode, args)
        converged = not th.is_alive() and res.get("ok")
        if th.is_alive():
            dom.abortJob()
            th.join()
        el = time.monotonic() - t0
        c1.close()
        report(mode, args, converged, el, switched, max_thr, res.get("err", ""))
        return converged
    finally:
        destroy_domain(h1, name)
        destroy_domain(h2, name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--rate", type=int, default=256)
    ap.add_argument("--bw", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=25)
    ap.add_argument("--ac-initial", type=int, default=99)
    ap.add_argument("--ac-increment", type=int, default=1)
    ap.add_argument("modes", nargs="*", default=["plain", "postcopy", "autoconverge", "autoconverge-tuned"])
    args = ap.parse_args()
    h1, h2 = ensure_testbed(2)
    ok = True
    for m in args.modes:
        conv = run(m, h1, h2, args)
        ok &= conv == (m != "plain")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
