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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent.claims.hoststate import host_state_fn
from agent.claims.ledger import Ledger
from agent.claims.model import Claim
from agent.config import ComputeConfig, LibvirtConfig
from agent.cpuset import format_cpu_set
from agent.libvirt_ops.domain_xml import parse_domain
from agent.libvirt_ops.host import topology_from_libvirt
from agent.libvirt_ops.inventory import read_domains
from agent.libvirt_ops.migration import MigrationOutcome, MigrationProgress, MigrationRunner, MigrationTarget
from agent.log import setup_logging
from agent.numa.request import InstanceRequest, parse_request
from agent.testing.testbed import (
    SCRIPT,
    TICK_LINE,
    TestbedHost,
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


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", choices=("post_copy", "auto_converge", "none"), default="post_copy")
    ap.add_argument("--dirty-mb", type=int, default=64, help="guest memory the VM keeps dirtying (MiB)")
    ap.add_argument("--rate", type=int, default=20, help="dirtying rate MB/s (-1 = as fast as it can)")
    ap.add_argument("--bandwidth", type=int, default=16, help="migration bandwidth cap, MiB/s")
    ap.add_argument("--down", action="store_true", help="take the testbed down at the end")
    return ap.parse_args()


def boot_guests(h1: TestbedHost, h2: TestbedHost, args: argparse.Namespace) -> str:
    """Step 1: demo-vm on the source pinned to CPU 1, demo-blocker holding CPU 1 on the destination.
    Returns demo-vm's UUID."""
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
    return vm_uuid


def demo_request(vm_uuid: str, policy: str) -> InstanceRequest:
    """The VM's flavor: one dedicated vCPU, asking for `policy` unless "none"."""
    extra_specs = {"hw:cpu_policy": "dedicated"}
    if policy != "none":
        extra_specs[f"compute:live_migration_{policy}"] = "true"
    request = parse_request(
        {"uuid": vm_uuid, "vcpus": 1, "memory_mb": 256, "extra_specs": extra_specs, "image_properties": {}}
    )
    console.print(f"flavor extra specs: {extra_specs}")
    return request


@dataclass(frozen=True)
class DemoRun:
    """What steps 2-4 share: both hosts and their connections, the destination's ledger, the VM."""

    source: TestbedHost
    dest: TestbedHost
    src_conn: Any
    dest_conn: Any
    ledger: Ledger
    state_dir: Path
    migration_id: str
    request: InstanceRequest


def claim_on_destination(run: DemoRun) -> Claim:
    """Step 2: the destination fits the VM on its own free resources and holds the claim durably."""
    compute_cfg = ComputeConfig(reserved_host_memory_mb=256)
    dest_conn = run.dest_conn
    claim = run.ledger.claim(
        run.migration_id,
        run.request,
        run.source.name,
        300,
        # the whole inventory: host_state_fn refuses an incomplete one (require_complete) and
        # uses its active_uuids to refuse an instance that already runs on the destination
        host_state_fn(lambda: topology_from_libvirt(dest_conn), lambda: read_domains(dest_conn), compute_cfg),
    )
    cell = claim.placement.cells[0]
    console.print(
        f"claim {run.migration_id} [green]{claim.state}[/]: guest cell 0 -> host cell {cell.host_cell}, "
        + ", ".join(f"vCPU {v} -> CPU {format_cpu_set(cell.cpu_pins[v])}" for v in cell.vcpus)
        + f", emulator -> CPU {format_cpu_set(claim.placement.emulator_pins)}"
        + f"  (ledger {run.state_dir / 'ledger.db'})"
    )
    return claim


def print_progress() -> Callable[[MigrationProgress], None]:
    """A progress callback that prints at most one line a second (every poll in post-copy)."""
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

    return on_progress


def migrate(run: DemoRun, claim: Claim, bandwidth: int) -> MigrationOutcome:
    """Step 3: the source rewrites the XML for the claimed placement and migrates with the per-VM policy."""
    cfg = LibvirtConfig(
        live_migration_bandwidth_mib=bandwidth,
        live_migration_completion_timeout_s=60,
        live_migration_timeout_action="abort",
    )
    dest = run.dest
    runner = MigrationRunner(run.src_conn, cfg)
    outcome = runner.run(
        "demo-vm",
        MigrationTarget(dest.uri, dest.migration_uri, dest.name),
        claim.placement,
        run.request,
        print_progress(),
    )
    console.print(f"policy: {escape(outcome.policy.reason)}")
    colour = "green" if outcome.status == "completed" else "red"
    console.print(
        f"outcome: [{colour}]{outcome.status}[/] in {outcome.elapsed_s:.1f}s, "
        f"downtime {outcome.downtime_ms} ms, post-copy {'yes' if outcome.switched_to_postcopy else 'no'}, "
        f"max throttle {outcome.max_throttle_pct}%  {escape(outcome.reason)}"
    )
    return outcome


def settle_claim(run: DemoRun, outcome: MigrationOutcome, dest_log_before: int) -> None:
    """Step 4: confirm the claim (and look for the guest's ticks on the destination), or release it."""
    if outcome.status != "completed":
        run.ledger.release(run.migration_id, f"migration {outcome.status}: {outcome.reason}")
        return
    run.ledger.confirm(run.migration_id, "domain runs on the destination")
    try:  # the guest itself must be alive over there, not only libvirt's record of it
        wait_console_line(run.dest, "demo-vm", TICK_LINE, timeout=20, after=dest_log_before)
        console.print(f"guest alive on {run.dest.name}: its console keeps ticking")
    except Exception as exc:  # noqa: BLE001 - report, the table below still shows where it is
        console.print(f"[red]guest not ticking on {run.dest.name}:[/] {escape(str(exc))}")


def result_table(run: DemoRun) -> Table:
    """What is true now: each host's domains and demo-vm's live and persistent pinning there."""
    table = Table()
    for col in ("host", "domains", "demo-vm live pinning", "demo-vm persistent pinning"):
        table.add_column(col)
    for host, conn in ((run.source, run.src_conn), (run.dest, run.dest_conn)):
        names = sorted(d.name() for d in conn.listAllDomains(0))
        has_vm = "demo-vm" in names
        table.add_row(
            host.name,
            ", ".join(names),
            pins_of(live_xml(host, "demo-vm")) if has_vm else "-",
            pins_of(persistent_xml(host, "demo-vm")) if has_vm else "-",
        )
    return table


def run_demo(run: DemoRun, bandwidth: int) -> bool:
    """Steps 2-4 and the result; True when the VM migrated."""
    console.rule(f"destination {run.dest.name}: claim")
    claim = claim_on_destination(run)
    console.rule(f"source {run.source.name}: live migration")
    run.ledger.start(run.migration_id)
    dest_log = Path(run.dest.console_log("demo-vm"))
    dest_log_before = dest_log.stat().st_size if dest_log.exists() else 0
    outcome = migrate(run, claim, bandwidth)
    settle_claim(run, outcome, dest_log_before)
    console.rule("result")
    console.print(result_table(run))
    final = run.ledger.get(run.migration_id)
    console.print(f"claim {run.migration_id}: {final.state} ({escape(final.reason or '')})")
    return outcome.status == "completed"


def main() -> int:
    args = parse_args()
    setup_logging("INFO")
    console.rule("[bold]compute-agent demo: NUMA-aware live migration on real libvirt + QEMU")
    with console.status("bringing up the two-host testbed (scripts/testbed up 2)..."):
        h1, h2 = ensure_testbed(2)
    console.print(f"source      {h1.name}  {h1.uri}\ndestination {h2.name}  {h2.uri}")
    request = demo_request(boot_guests(h1, h2, args), args.policy)
    state_dir = Path(os.environ.get("COMPUTE_AGENT_DEMO_STATE", tempfile.mkdtemp(prefix="compute-agent-demo-")))
    dest_conn = h2.connect()
    src_conn = h1.connect()
    migration_id = f"demo-{int(time.time())}"
    ledger = Ledger.open(state_dir)
    try:
        run = DemoRun(h1, h2, src_conn, dest_conn, ledger, state_dir, migration_id, request)
        return 0 if run_demo(run, args.bandwidth) else 1
    finally:
        ledger.close()
        for host, name in ((h1, "demo-vm"), (h2, "demo-vm"), (h2, "demo-blocker")):
            destroy_domain(host, name)
        src_conn.close()
        dest_conn.close()
        if args.down:
            os.system(f"{SCRIPT} down")


if __name__ == "__main__":
    sys.exit(main())
