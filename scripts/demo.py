#!/usr/bin/env python3
"""The main job, end to end on real libvirt + QEMU: a NUMA-aware live migration between two local
hosts (scripts/testbed), with the destination choosing a new pinning and holding it in its ledger.

    scripts/demo [--policy post_copy|auto_converge|none] [--dirty-mb N] [--rate MBPS] [--down]

1. host1 runs `demo-vm` (1 dedicated vCPU pinned to CPU 1; its flavor asks for post-copy);
   host2 runs `demo-blocker`, which already holds CPU 1.
2. host2 (destination) reads its topology and its domains, fits the VM and claims the placement
   in its durable ledger: the vCPU must go to CPU 0.
3. host1 (source) rewrites the domain XML for that placement and runs the live migration with the
   per-VM policy, reporting progress.
4. On success host2's claim is confirmed; the VM runs on host2 pinned to CPU 0 (live and
   persistent XML) and is gone from host1. On failure the claim is released and the VM keeps
   running on host1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent.claims.hoststate import host_state_fn
from agent.claims.ledger import Ledger
from agent.config import ComputeConfig, LibvirtConfig
from agent.cpuset import format_cpu_set
from agent.libvirt_ops.domain_xml import parse_domain
from agent.libvirt_ops.host import topology_from_libvirt
from agent.libvirt_ops.inventory import read_domains
from agent.libvirt_ops.migration import MigrationProgress, MigrationRunner, MigrationTarget
from agent.log import setup_logging
from agent.numa.request import parse_request
from agent.testing.testbed import (
    SCRIPT,
    TICK_LINE,
    define_and_start,
    destroy_domain,
    ensure_testbed,
    guest_xml,
    live_xml,
    persistent_xml,
    wait_console_line,
    wait_guest_ready,
)

console = Console(soft_wrap=True)


def pins_of(xml: str) -> str:
    d = parse_domain(xml)
    return ", ".join(f"vCPU {v} -> CPU {format_cpu_set(c)}" for v, c in sorted(d.vcpu_pins.items())) or "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", choices=("post_copy", "auto_converge", "none"), default="post_copy")
    ap.add_argument("--dirty-mb", type=int, default=64, help="guest memory the VM keeps dirtying (MiB)")
    ap.add_argument("--rate", type=int, default=20, help="dirtying rate MB/s (-1 = as fast as it can)")
    ap.add_argument("--bandwidth", type=int, default=16, help="migration bandwidth cap, MiB/s")
    ap.add_argument("--down", action="store_true", help="take the testbed down at the end")
    args = ap.parse_args()
    setup_logging("INFO")

    console.rule("[bold]compute-agent demo: NUMA-aware live migration on real libvirt + QEMU")
    with console.status("bringing up the two-host testbed (scripts/testbed up 2)..."):
        h1, h2 = ensure_testbed(2)
    console.print(f"source      {h1.name}  {h1.uri}\ndestination {h2.name}  {h2.uri}")
    for host, name in ((h1, "demo-vm"), (h2, "demo-blocker"), (h2, "demo-vm")):
        destroy_domain(host, name)

    vm_uuid = str(uuid.uuid4())
    define_and_start(h2, guest_xml("demo-blocker", vcpu_pins={0: [1]}))
    define_and_start(
        h1,
        guest_xml(
            "demo-vm",
            uuid=vm_uuid,
            vcpu_pins={0: [1]},
            emulator_pins=[1],
            dirty_mb=args.dirty_mb,
            dirty_rate_mbps=args.rate,
        ),
    )
    with console.status("booting both guests (TCG)..."):
        wait_guest_ready(h2, "demo-blocker")
        wait_guest_ready(h1, "demo-vm")
    console.print(
        f"[cyan]{h1.name}[/] demo-vm       {pins_of(live_xml(h1, 'demo-vm'))}  (dirtying {args.dirty_mb} MiB)"
    )
    console.print(f"[cyan]{h2.name}[/] demo-blocker  {pins_of(live_xml(h2, 'demo-blocker'))}")

    extra_specs = {"hw:cpu_policy": "dedicated"}
    if args.policy != "none":
        extra_specs[f"compute:live_migration_{args.policy}"] = "true"
    request = parse_request(
        {"uuid": vm_uuid, "vcpus": 1, "memory_mb": 256, "extra_specs": extra_specs, "image_properties": {}}
    )
    console.print(f"flavor extra specs: {extra_specs}")

    # --- destination: fit on its own free resources and hold the claim durably ----------------
    console.rule(f"destination {h2.name}: claim")
    state_dir = Path(os.environ.get("COMPUTE_AGENT_DEMO_STATE", tempfile.mkdtemp(prefix="compute-agent-demo-")))
    dest_conn = h2.connect()
    src_conn = h1.connect()
    migration_id = f"demo-{int(time.time())}"
    compute_cfg = ComputeConfig(reserved_host_memory_mb=256)
    ledger = Ledger.open(state_dir)
    try:
        claim = ledger.claim(
            migration_id,
            request,
            h1.name,
            300,
            # the whole inventory: host_state_fn refuses an incomplete one (require_complete) and
            # uses its active_uuids to refuse an instance that already runs on the destination
            host_state_fn(lambda: topology_from_libvirt(dest_conn), lambda: read_domains(dest_conn), compute_cfg),
        )
        cell = claim.placement.cells[0]
        console.print(
            f"claim {migration_id} [green]{claim.state}[/]: guest cell 0 -> host cell {cell.host_cell}, "
            + ", ".join(f"vCPU {v} -> CPU {format_cpu_set(cell.cpu_pins[v])}" for v in cell.vcpus)
            + f", emulator -> CPU {format_cpu_set(claim.placement.emulator_pins)}"
            + f"  (ledger {state_dir / 'ledger.db'})"
        )

        # --- source: rewrite the XML for that placement and migrate with the per-VM policy ----
        console.rule(f"source {h1.name}: live migration")
        cfg = LibvirtConfig(
            live_migration_bandwidth_mib=args.bandwidth,
            live_migration_completion_timeout_s=60,
            live_migration_timeout_action="abort",
        )
        ledger.start(migration_id)
        last = [0.0]

        def on_progress(p: MigrationProgress) -> None:
            if p.elapsed_s - last[0] < 1.0 and p.phase != "postcopy":
                return
            last[0] = p.elapsed_s
            console.print(
                f"  {p.elapsed_s:5.1f}s {p.phase:<8} {p.percent:5.1f}%  left {p.memory_remaining / 2**20:6.1f} MiB"
                f"  iter {p.iteration:<3} dirty {p.dirty_rate_pps:>5} p/s  throttle {p.throttle_pct:>2}%"
                f"  downtime {p.max_downtime_ms} ms",
                soft_wrap=True,
            )

        dest_log = Path(h2.console_log("demo-vm"))
        dest_log_before = dest_log.stat().st_size if dest_log.exists() else 0
        runner = MigrationRunner(src_conn, cfg)
        outcome = runner.run(
            "demo-vm", MigrationTarget(h2.uri, h2.migration_uri, h2.name), claim.placement, request, on_progress
        )
        console.print(f"policy: {escape(outcome.policy.reason)}")
        colour = "green" if outcome.status == "completed" else "red"
        console.print(
            f"outcome: [{colour}]{outcome.status}[/] in {outcome.elapsed_s:.1f}s, "
            f"downtime {outcome.downtime_ms} ms, post-copy {'yes' if outcome.switched_to_postcopy else 'no'}, "
            f"max throttle {outcome.max_throttle_pct}%  {escape(outcome.reason)}"
        )
        if outcome.status == "completed":
            ledger.confirm(migration_id, "domain runs on the destination")
            try:  # the guest itself must be alive over there, not only libvirt's record of it
                wait_console_line(h2, "demo-vm", TICK_LINE, timeout=20, after=dest_log_before)
                console.print(f"guest alive on {h2.name}: its console keeps ticking")
            except Exception as exc:  # noqa: BLE001 - report, the table below still shows where it is
                console.print(f"[red]guest not ticking on {h2.name}:[/] {escape(str(exc))}")
        else:
            ledger.release(migration_id, f"migration {outcome.status}: {outcome.reason}")

        # --- what is true now -----------------------------------------------------------------
        console.rule("result")
        table = Table()
        for col in ("host", "domains", "demo-vm live pinning", "demo-vm persistent pinning"):
            table.add_column(col)
        for host, conn in ((h1, src_conn), (h2, dest_conn)):
            names = sorted(d.name() for d in conn.listAllDomains(0))
            has_vm = "demo-vm" in names
            table.add_row(
                host.name,
                ", ".join(names),
                pins_of(live_xml(host, "demo-vm")) if has_vm else "-",
                pins_of(persistent_xml(host, "demo-vm")) if has_vm else "-",
            )
        console.print(table)
        final = ledger.get(migration_id)
        console.print(f"claim {migration_id}: {final.state} ({escape(final.reason or '')})")
        ok = outcome.status == "completed"
    finally:
        ledger.close()
        for host, name in ((h1, "demo-vm"), (h2, "demo-vm"), (h2, "demo-blocker")):
            destroy_domain(host, name)
        src_conn.close()
        dest_conn.close()
        if args.down:
            os.system(f"{SCRIPT} down")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
