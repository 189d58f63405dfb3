#!/usr/bin/env python3
"""Fleet simulation: the orchestrator library driving N simulated agents on the real broker.

    .venv/bin/python bench/fleet_bench.py [--json] [--agents 50,100,200] [--migrations 1000] [--seed 1]

Real: RabbitMQ (the machine's), the bus code (RpcServer per agent, RpcClient, events, signatures),
the fitter and a claim ledger (agent.claims.ledger.Ledger, SQLite in a temp dir) per agent.
Simulated (agent.testing.fleet): the libvirt side; each migration takes a modelled time
(MODEL_BASE_S + memory / MODEL_BANDWIDTH_MB_S) and then moves the domain with the claimed pinning.

Per N: topologies and instances are generated from the seed (hosts filled to about half), then the
orchestrator, in a process of its own (so its memory is its own), does M migrations, CONCURRENCY at a
time, of instances chosen at random (each lane of the pool owns its instances and moves them in
turn, so an instance may move several times but never twice at once), each from where it runs to
wherever the library chooses (alternates on NoFit / Busy; when every candidate is Busy, the wait for
`retry_after` is not counted as overhead). Reported per run:

- overhead per migration: the orchestrator's decision path, from describe_instance to the source's
  `live_migrate` accepted (candidates, every claim tried, the start), p50 / p99; the modelled
  migration time is not in it. `follow_ms`: from `live_migrate` accepted to the done event seen,
  minus the modelled time (it includes waiting behind the source's outbound limit).
- decisions per second (decision paths completed per second of the run), migrations done, claims
  refused and retried (NoFit, Busy), refused migrations, capability events per second on the broker,
  the orchestrator's peak RSS;
- checks on the agents' ledgers and domains at the end: double-booked CPUs or pages, claims left
  live, instances not on exactly one host.

A last run has 20 % of the agents advertising only RPC 1.0 (the cap pinned at 1.1: NUMA instances on
a 1.0 source are refused, 1.0 destinations skipped as alternates).
The agents and the orchestrator share the machine's 2 cores: every figure includes that contention.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

from agent.bus.keys import Keyring
from agent.config import AgentConfig, BusConfig, OrchestratorConfig, UpgradeLevelsConfig
from agent.errors import AgentError
from agent.orchestrator.drain import Drainer
from agent.orchestrator.errors import NoDestination
from agent.orchestrator.session import Session
from agent.testing.builders import topology
from agent.testing.fleet import SimInstance, SimWorld

sys.path.insert(0, str(Path(__file__).resolve().parent))

from broker_objects import delete_bus_objects  # noqa: E402

CONCURRENCY = int(os.environ.get("FLEET_BENCH_CONCURRENCY", "8"))  # migrations decided at once
MODEL_BASE_S = 0.05  # setup + switch-over of a modelled migration
MODEL_BANDWIDTH_MB_S = 20_000.0  # 2 GiB of guest memory in 0.1 s: keeps the run short
FILL = 0.5  # instances booted until hosts are about half full (room to move into)
PINNED = {"hw:cpu_policy": "dedicated", "hw:mem_page_size": "2048"}


def modelled_s(memory_mb: int) -> float:
    return MODEL_BASE_S + memory_mb / MODEL_BANDWIDTH_MB_S


# --- the fleet (this process) -------------------------------------------------------------------


def make_instance(rng: random.Random, i: int) -> SimInstance:
    if rng.random() < 0.8:
        return SimInstance(str(uuid.UUID(int=rng.getrandbits(128), version=4)), f"vm{i}", rng.choice([2, 4]),
                           rng.choice([1024, 2048]), dict(PINNED))  # fmt: skip
    return SimInstance(str(uuid.UUID(int=rng.getrandbits(128), version=4)), f"vm{i}", 2, 1024, {})


def build_world(cfg: BusConfig, keyring: Keyring, state: Path, n: int, rng: random.Random, old: float) -> SimWorld:
    world = SimWorld(cfg, keyring, state, model=lambda inst: modelled_s(inst.memory_mb))
    for h in range(n):
        name = f"hv-{h:04d}"
        topo = topology(cells=2, cores_per_cell=rng.choice([4, 6, 8]), threads=2, huge_2m=rng.choice([1536, 2048]),
                        small_pool=True, hostname=name)  # fmt: skip
        world.add(name, topo, rpc_max="1.0" if h < n * old else "1.1")
    return world


def boot_instances(world: SimWorld, rng: random.Random) -> int:
    """Fill each host to about FILL of its pCPUs (the fitter places each instance)."""
    count = 0
    for agent in world.agents.values():
        pcpus = sum(len(c.cpus) for c in agent.topology.cells)
        used = 0
        while used < pcpus * FILL:
            inst = make_instance(rng, count)
            try:
                agent.boot(inst, publish=False)
            except ValueError:
                break
            used += inst.vcpus
            count += 1
    return count


def checks(world: SimWorld, instances: list[str]) -> dict[str, int]:
    double, left = 0, 0
    for agent in world.agents.values():
        report = agent.report()
        double += len(report.overlaps)
        for res in report.state.all_resources():
            double += sum(1 for n in res.free_pages.values() if n < 0) + (res.small_free_mb < 0)
        left += len(agent.ledger.live_claims())
    misplaced = sum(1 for u in instances if len(world.where(u)) != 1)
    return {"double_booked": double, "claims_left": left, "misplaced_instances": misplaced}


def run_one(n: int, m: int, seed: int, old: float, base_cfg: BusConfig, key_file: Path) -> dict[str, Any]:
    rng = random.Random(seed * 1000 + n)
    cfg = replace(base_cfg, exchange_prefix=f"fleetbench-{uuid.uuid4().hex[:8]}", key_file=key_file)
    with tempfile.TemporaryDirectory(prefix="fleet-bench-", dir="/var/tmp") as tmp:
        world = build_world(cfg, Keyring.from_file(key_file), Path(tmp), n, rng, old)
        try:
            total = boot_instances(world, rng)
            t0 = time.monotonic()
            world.start()
            start_s = time.monotonic() - t0
            caps_before, t1 = world.capability_events, time.monotonic()
            chosen = rng.sample(sorted(u for a in world.agents.values() for u in a.instances), min(m, total))
            result = drive(cfg, key_file, n, chosen, m, old)
            wall = time.monotonic() - t1
            time.sleep(0.5)  # the last confirmations
            result.update(checks(world, [u for a in world.agents.values() for u in a.instances] + chosen))
            result["capability_events_per_s"] = round((world.capability_events - caps_before) / wall, 1)
            result["agents_start_s"] = round(start_s, 2)
            result["instances"] = total
            result["old_agents"] = int(n * old)
            return result
        finally:
            world.stop()
            delete_bus_objects(cfg.transport_url, cfg.exchange_prefix, world.agents)  # n durable host queues


def drive(cfg: BusConfig, key_file: Path, n: int, chosen: list[str], m: int, old: float) -> dict[str, Any]:
    """Run the orchestrator in its own process; its JSON result."""
    job = {"prefix": cfg.exchange_prefix, "url": cfg.transport_url, "key_file": str(key_file), "agents": n,
           "instances": chosen, "migrations": m, "cap": "1.1" if old else "auto"}  # fmt: skip
    out = subprocess.run(
        [sys.executable, __file__, "--orchestrator"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the orchestrator process failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the orchestrator (its own process) ---------------------------------------------------------


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.decision_s: list[float] = []
        self.follow_s: list[float] = []
        self.refusals: dict[str, int] = {}
        self.outcomes: dict[str, int] = {}

    def add(
        self, outcome: str, decision: float | None = None, follow: float | None = None, rejections: Iterable[Any] = ()
    ) -> None:
        with self.lock:
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            if decision is not None:
                self.decision_s.append(decision)
            if follow is not None:
                self.follow_s.append(follow)
            for r in rejections:
                if r.kind != "filtered":
                    self.refusals[r.kind] = self.refusals.get(r.kind, 0) + 1


def migrate_one(session: Session, where: dict[str, str], uuid_: str, stats: Stats) -> None:
    slept = [0.0]  # waits for retry_after when every destination was Busy: not orchestration work

    def sleep(seconds: float) -> None:
        slept[0] += seconds
        time.sleep(seconds)

    t0 = time.monotonic()
    try:
        started = Drainer(session.orchestrator, session.tracker, sleep=sleep).start(where[uuid_], uuid_)
    except NoDestination as exc:
        stats.add("no_destination", rejections=exc.rejections)
        return
    except AgentError as exc:
        stats.add(type(exc).__name__)
        return
    t1 = time.monotonic()
    decision = t1 - t0 - slept[0]
    src, mid = started.plan.source.name, started.migration_id
    outcome = session.tracker.wait(mid, timeout=600, poll=lambda: session.api.migration_status(src, mid), poll_s=10)
    session.tracker.forget(mid)
    follow = time.monotonic() - t1 - modelled_s(started.plan.instance.info.memory_mb)
    stats.add(outcome.status, decision, follow, started.rejections)
    if outcome.status == "completed":
        where[uuid_] = started.destination.name


def lane(session: Session, where: dict[str, str], instances: list[str], quota: int, stats: Stats) -> None:
    """`quota` migrations of this lane's instances, round-robin (an instance may move several times)."""
    for i in range(quota if instances else 0):
        migrate_one(session, where, instances[i % len(instances)], stats)


def orchestrate(job: dict[str, Any]) -> dict[str, Any]:
    logging.basicConfig(level=logging.ERROR)
    bus = replace(BusConfig(), transport_url=job["url"], exchange_prefix=job["prefix"], key_file=Path(job["key_file"]))
    orch_cfg = replace(OrchestratorConfig(), discovery_timeout_s=min(2.0 + job["agents"] / 100, 10.0))
    cfg = AgentConfig(bus=bus, orchestrator=orch_cfg, upgrade_levels=UpgradeLevelsConfig(agent=job["cap"]))
    stats = Stats()
    with Session.open(cfg, sender="orchestrator@fleet-bench") as session:
        where = {u: h.name for h in session.fleet.all() for u in h.instances}
        if len(session.fleet.all()) != job["agents"]:
            raise RuntimeError(f"{len(session.fleet.all())} of {job['agents']} agents answered describe_host")
        rss_discovered = peak_rss_mb()
        t0 = time.monotonic()
        lanes = [job["instances"][i::CONCURRENCY] for i in range(CONCURRENCY)]  # an instance moves in one lane
        quota = [job["migrations"] // CONCURRENCY + (i < job["migrations"] % CONCURRENCY) for i in range(CONCURRENCY)]
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(lambda i: lane(session, where, lanes[i], quota[i], stats), range(CONCURRENCY)))
        wall = time.monotonic() - t0
        events = session.fleet.events_seen
    out = summary(job, stats, wall, events)
    out["orchestrator_rss_after_discovery_mb"] = round(rss_discovered, 1)
    return out


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: getrusage's ru_maxrss would carry the parent's peak over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _pct(values: list[float], q: int) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return round(values[0] * 1000, 2)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000, 2)


def summary(job: dict[str, Any], stats: Stats, wall: float, events: int) -> dict[str, Any]:
    return {
        "agents": job["agents"],
        "migrations": stats.outcomes.get("completed", 0),
        "asked": job["migrations"],
        "instances_moved": len(job["instances"]),
        "outcomes": stats.outcomes,
        "overhead_p50_ms": _pct(stats.decision_s, 50),
        "overhead_p99_ms": _pct(stats.decision_s, 99),
        "follow_p50_ms": _pct(stats.follow_s, 50),
        "decisions_per_s": round(len(stats.decision_s) / wall, 1) if wall else 0.0,
        "claims_refused": stats.refusals,
        "claims_retried": sum(stats.refusals.values()),
        "capability_events_seen": events,
        "orchestrator_rss_mb": round(peak_rss_mb(), 1),
        "wall_s": round(wall, 2),
        "cap": job["cap"],
    }


# --- main ---------------------------------------------------------------------------------------


def print_table(runs: list[dict[str, Any]]) -> None:
    head = "agents old migr  p50ms  p99ms  dec/s  retried  caps/s  rss_MB  dbl left mis  outcomes"
    print(head)
    for r in runs:
        print(
            f"{r['agents']:>6} {r['old_agents']:>3} {r['migrations']:>4} {r['overhead_p50_ms']:>6} "
            f"{r['overhead_p99_ms']:>6} {r['decisions_per_s']:>6} {r['claims_retried']:>8} "
            f"{r['capability_events_per_s']:>7} {r['orchestrator_rss_mb']:>7} {r['double_booked']:>4} "
            f"{r['claims_left']:>4} {r['misplaced_instances']:>3}  {r['outcomes']}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", default="50,100,200", help="comma-separated N (default 50,100,200)")
    ap.add_argument("--migrations", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--old-run", type=int, default=100, help="N of the run with 20%% 1.0 agents (0: none)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--orchestrator", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.orchestrator:
        print(json.dumps(orchestrate(json.loads(sys.stdin.read()))))
        return 0
    logging.basicConfig(level=logging.ERROR)
    sizes = [(int(n), 0.0) for n in args.agents.split(",") if n] + ([(args.old_run, 0.2)] if args.old_run else [])
    with tempfile.TemporaryDirectory(prefix="fleet-bench-keys-") as keys:
        key_file = Path(keys) / "bus.keys"
        key_file.write_text(f"bench {os.urandom(32).hex()}\n")
        runs = [run_one(n, args.migrations, args.seed, old, BusConfig(), key_file) for n, old in sizes]
    if args.json:
        print(json.dumps({"runs": runs}))
    else:
        print_table(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
