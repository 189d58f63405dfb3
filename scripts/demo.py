#!/usr/bin/env python3
"""The main job, end to end: three libvirt hosts (scripts/testbed), a `compute-agent daemon` on each,
and ONE orchestrator command that live-migrates a pinned VM to the host that can really take it.

    scripts/demo            (sets everything up; run as root)

1. tb-host1 (A) runs `demo-vm`: 1 dedicated vCPU pinned to CPU 1, its emulator thread isolated on
   CPU 0 (`hw:emulator_threads_policy=isolate`), a flavor asking for post-copy, and a guest that
   keeps dirtying 64 MiB (it never converges by pre-copy alone over the capped link).
   tb-host2 (B) runs `demo-blocker`, which holds CPU 1: B has one free dedicated CPU, not two.
   tb-host3 (C) is empty.
2. A daemon per host (its own config and state directory; all on the local RabbitMQ under a demo
   exchange prefix, with a generated key file).
3. `compute-agent migrate demo-vm --from tb-host1`, with `[compute] placement_preference = pack`:
   B is the tightest host whose published numbers fit the VM, so it is asked first; its claim says
   NoFit (the isolated emulator thread needs a second CPU), and C, the alternate, takes it. The
   live view shows the policy and where it came from, then phase, percent, ETA and rates.
4. What the agents recorded (`compute-agent migration list`) and what libvirt says on C; then the
   daemons are stopped, the domains and the demo's files and bus queues removed, and the testbed
   left as it was found.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import libvirt
from rich.console import Console

from agent.cpuset import format_cpu_set
from agent.libvirt_ops.domain_model import PLACEMENT_NS
from agent.libvirt_ops.domain_read import parse_domain
from agent.libvirt_ops.domain_rewrite import placement_json_text
from agent.libvirt_ops.instance_metadata import InstanceMetadata, store_instance_metadata
from agent.numa.placement import Placement
from agent.testing.daemons import AgentFleet, hot_migration
from agent.testing.testbed import (
    HOT_GUEST,
    SCRIPT,
    TestbedHost,
    define_and_start,
    destroy_domain,
    ensure_testbed,
    guest_xml,
    live_xml,
    wait_guest_ready,
)

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "agent.cli"]
HOSTS = 3
VM, BLOCKER = "demo-vm", "demo-blocker"
FLAVOR = {
    "hw:cpu_policy": "dedicated",
    "hw:emulator_threads_policy": "isolate",
    "compute:live_migration_post_copy": "true",
}

#: demo-vm's placement on A as the agent records it in the domain's <metadata> when it places a VM
#: (describe_instance reads it: the "pinning before" of the result)
PLACEMENT_ON_A = {
    "fits": True,
    "cells": [
        {"guest_cell": 0, "host_cell": 0, "vcpus": [0], "cpu_pins": {"0": [1]}, "memory_mb": 256, "pagesize_kb": 4}
    ],
    "emulator_pins": [0],
    "reason": None,
}

console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 120)
# a pipe is 80 columns to rich: give the commands' tables and progress lines room
CHILD_ENV = {**os.environ, "COLUMNS": os.environ.get("COLUMNS", "120")}


def pins_of(xml: str) -> str:
    d = parse_domain(xml)
    vcpus = ", ".join(f"vCPU {v} -> CPU {format_cpu_set(c)}" for v, c in sorted(d.vcpu_pins.items()))
    emulator = f", emulator -> CPU {format_cpu_set(d.emulator_pins)}" if d.emulator_pins else ""
    return (vcpus or "not pinned") + emulator


def testbed_was_up() -> bool:
    """All of hosts 1..3 alive before the demo (then it leaves them running)."""
    status = subprocess.run([SCRIPT, "status"], capture_output=True, text=True, check=False).stdout
    return sum(f"tb-host{i} " in line and "state=alive" in line for line in status.splitlines() for i in (1, 2, 3)) == 3


def start_guest(host: TestbedHost, name: str, flavor: dict[str, str], placement: dict | None, **xml: Any) -> None:
    destroy_domain(host, name)
    define_and_start(host, guest_xml(name, vcpus=1, memory_mib=256, uuid=str(uuid.uuid4()), **xml))
    conn = host.connect()
    try:  # the flavor lives with the domain, as `compute-agent instance set-metadata` writes it
        store_instance_metadata(conn, name, InstanceMetadata(flavor))
        if placement is not None:
            record = placement_json_text(Placement.from_json(placement)).replace("&", "&amp;").replace("<", "&lt;")
            flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
            element = f"<placement>{record}</placement>"
            conn.lookupByName(name).setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, element, "ca", PLACEMENT_NS, flags)
    finally:
        conn.close()


def boot(a: TestbedHost, b: TestbedHost) -> None:
    dirt = {k: v for k, v in HOT_GUEST.items() if k != "memory_mib"}
    start_guest(a, VM, FLAVOR, PLACEMENT_ON_A, vcpu_pins={0: [1]}, emulator_pins=[0], **dirt)
    start_guest(b, BLOCKER, {"hw:cpu_policy": "dedicated"}, None, vcpu_pins={0: [1]})
    wait_guest_ready(a, VM, timeout=90)
    wait_guest_ready(b, BLOCKER, timeout=90)


def show_hosts(hosts: list[TestbedHost]) -> None:
    for h, label in zip(hosts, "ABC", strict=True):
        doms = {VM: h is hosts[0], BLOCKER: h is hosts[1]}
        here = [f"{name} ({pins_of(live_xml(h, name))})" for name, there in doms.items() if there]
        console.print(f"  {label} [cyan]{h.name}[/] {h.uri:<28} {'; '.join(here) or 'empty'}")
    console.print(f"  {VM} flavor: {FLAVOR}")


def run_cli(conf: Path, *args: str) -> int:
    """A `compute-agent` command with its output on this terminal (the rich live view)."""
    console.print(f"[bold]$ compute-agent {' '.join(args)}[/]")
    return subprocess.run([*CLI, "--config", str(conf), *args], cwd=REPO, env=CHILD_ENV, check=False).returncode


def where_now(hosts: list[TestbedHost]) -> None:
    for h in hosts:
        try:
            console.print(f"  libvirt on {h.name}: {VM} runs there, {pins_of(live_xml(h, VM))}")
        except Exception:  # noqa: BLE001 - not on this host
            continue


def cleanup(hosts: list[TestbedHost], fleet: AgentFleet | None, base: Path, was_up: bool) -> None:
    with console.status("cleaning up: daemons, domains, bus queues, files..."):
        codes = fleet.stop() if fleet is not None else {}
        for h in hosts:
            for name in (VM, BLOCKER):
                destroy_domain(h, name)
        if fleet is not None:
            fleet.forget_bus()
        shutil.rmtree(base, ignore_errors=True)
        if not was_up:
            subprocess.run([SCRIPT, "down"], capture_output=True, check=False)
    stopped = ", ".join(f"{h} exit {c}" for h, c in codes.items())
    console.print(f"daemons stopped ({stopped}); demo domains and files removed; testbed left as found")


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    t0 = time.monotonic()
    console.rule("[bold]compute-agent demo: one command, three hosts, a NUMA-aware live migration with an alternate")
    was_up = testbed_was_up()
    with console.status("bringing up the three-host testbed (scripts/testbed up 3)..."):
        hosts = ensure_testbed(HOSTS)
    a, b, c = hosts
    base = Path(tempfile.mkdtemp(prefix="compute-agent-demo-"))
    prefix = f"demo-{uuid.uuid4().hex[:8]}"
    fleet: AgentFleet | None = None
    try:
        fleet = AgentFleet(hosts, base, prefix=prefix, common={"libvirt": hot_migration()})
        with console.status("starting a daemon per host and booting the guests (TCG)..."):
            fleet.launch()  # the daemons start while the guests boot
            boot(a, b)
            fleet.wait_all()
        console.print(f"daemons serving on exchange prefix {prefix} (state and logs in {base})")
        show_hosts(hosts)
        conf = fleet.orchestrator_config({"compute": {"placement_preference": "pack"}})
        console.rule("the migration")
        code = run_cli(conf, "migrate", VM, "--from", a.name)
        console.rule("what the agents and libvirt say")
        run_cli(conf, "migration", "list")
        where_now(hosts)
    finally:
        cleanup(hosts, fleet, base, was_up)
    console.print(f"demo {'done' if code == 0 else 'FAILED (exit %d)' % code} in {time.monotonic() - t0:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
