"""Fakes for the source role's tests (a scripted runner, an event sink, peers) and a context on
test:///default; plus checks of the fakes themselves."""

from __future__ import annotations

import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import libvirt

from agent.bus.errors import RemoteError
from agent.config import AgentConfig, BusConfig, ClaimsConfig
from agent.daemon.context import AgentContext, LibvirtConnections, LiveConfig, TopologyHolder
from agent.daemon.metrics import AgentMetrics
from agent.libvirt_ops.errors import MigrationAbortRefused, MigrationError, NoMigrationInProgress
from agent.libvirt_ops.migration import ForceCompleteAction, MigrationOutcome, MigrationProgress, MigrationTarget
from agent.libvirt_ops.policy import MigrationPolicy
from agent.numa.placement import Placement
from agent.numa.request import InstanceRequest

URI = "test:///default"
# test:///default's state lives while a connection to it is open: keep one for the whole session
_KEEPER = libvirt.open(URI)
POLICY = MigrationPolicy(False, False, "auto-converge off (x); post-copy off (y)")


def progress(
    percent: float,
    phase: str = "precopy",
    elapsed: float = 1.0,
    processed: int = 0,
    *,
    transfer: int = 0,
    memory_bps: int = 0,
    eta: float | None = None,
) -> MigrationProgress:
    """A runner's progress; `transfer` its smoothed rate, `memory_bps` libvirt's, `eta` its ETA."""
    total = 1 << 30
    return MigrationProgress(
        phase=phase,  # type: ignore[arg-type]
        percent=percent,
        memory_total=total,
        memory_processed=processed,
        memory_remaining=int(total * (100 - percent) / 100),
        dirty_rate_pps=10,
        iteration=1,
        max_downtime_ms=50,
        throttle_pct=0,
        elapsed_s=elapsed,
        dirty_rate_bps=10 * 4096,
        transfer_rate_bps=transfer,
        memory_bps=memory_bps,
        eta_s=eta,
    )


class FakeRunner:
    """Plays `script` through on_progress, then waits until `finish()` or an abort; post-copy after
    force_complete (the guest paused instead without `post_copy`). Never touches libvirt."""

    def __init__(
        self, script: list[MigrationProgress] | None = None, *, status: str = "completed", post_copy: bool = True
    ) -> None:
        self.script = list(script or [])
        self.status = status
        self.post_copy = post_copy
        self.policy = POLICY  # what it tells on_policy and puts in the outcome
        self.paused = False
        self.calls: list[tuple[str, MigrationTarget, Placement | None, InstanceRequest]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.job = False
        self.aborted = False
        self.postcopy = False
        self.abort_error: Exception | None = None
        self.on_progress: Callable[[MigrationProgress], None] | None = None

    def run(
        self,
        domain_name_or_uuid: str,
        target: MigrationTarget,
        placement: Placement | None,
        request: InstanceRequest | Mapping[str, Any],
        on_progress: Callable[[MigrationProgress], None] | None = None,
        on_policy: Callable[[MigrationPolicy], None] | None = None,
    ) -> MigrationOutcome:
        assert isinstance(request, InstanceRequest)
        if on_policy is not None:
            on_policy(self.policy)
        self.calls.append((domain_name_or_uuid, target, placement, request))
        self.on_progress = on_progress
        self.job = True
        self.started.set()
        for p in self.script:
            if on_progress:
                on_progress(p)
        self.release.wait(10.0)
        self.job = False
        status = "aborted" if self.aborted else self.status
        return MigrationOutcome(
            status=status,  # type: ignore[arg-type]
            reason=f"fake {status}",
            final_stats={},
            policy=self.policy,
            elapsed_s=1.5,
            downtime_ms=42 if status == "completed" else None,
            switched_to_postcopy=self.postcopy,
            max_throttle_pct=0,
        )

    def emit(self, p: MigrationProgress) -> None:
        assert self.on_progress is not None
        self.on_progress(p)

    def finish(self) -> None:
        self.release.set()

    def abort(self) -> None:
        if self.abort_error is not None:
            raise self.abort_error
        if self.postcopy:
            raise MigrationAbortRefused("in post-copy")
        if not self.job:
            raise NoMigrationInProgress("no job")
        self.aborted = True
        self.release.set()

    def force_complete(self) -> ForceCompleteAction:
        if not self.job:
            raise NoMigrationInProgress("no job")
        if self.postcopy:
            return ForceCompleteAction.ALREADY_POSTCOPY
        if self.paused:
            return ForceCompleteAction.ALREADY_PAUSED
        if not self.post_copy:
            self.paused = True
            return ForceCompleteAction.PAUSED
        self.postcopy = True
        return ForceCompleteAction.POSTCOPY


class FailingRunner(FakeRunner):
    def run(self, *args: Any, **kwargs: Any) -> MigrationOutcome:
        raise MigrationError("destination refused")


@dataclass
class Events:
    published: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, routing_key: str, body: Any, *, wait: bool = True) -> None:
        with self.lock:
            self.published.append((routing_key, body))

    def keys(self) -> list[str]:
        with self.lock:
            return [k for k, _ in self.published]

    def bodies(self, suffix: str) -> list[dict[str, Any]]:
        with self.lock:
            return [b for k, b in self.published if k.endswith(suffix)]


@dataclass
class Peers:
    calls: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    failures: list[Exception] = field(default_factory=list)  # raised by the next calls, in order

    def call(
        self, host: str, method: str, body: Any, *, timeout: float | None = None, version: str | None = None
    ) -> dict[str, Any]:
        self.calls.append((host, method, body))
        if self.failures:
            raise self.failures.pop(0)
        return {"migration_id": body["migration_id"], "state": "confirmed"}


@dataclass
class Harness:
    ctx: AgentContext
    events: Events
    peers: Peers
    runners: list[FakeRunner]
    changes: list[str]

    def runner_factory(self, conn: Any, cfg: Any) -> FakeRunner:
        return self.runners.pop(0)


def make_harness(
    tmp_path: Path,
    runners: list[FakeRunner],
    *,
    limit: int = 1,
    progress_interval_s: float = 0.0,
    bus: BusConfig | None = None,
    host: str = "hv-01",
) -> Harness:
    cfg = AgentConfig(
        claims=ClaimsConfig(state_dir=tmp_path),
        bus=replace(bus or BusConfig(), progress_interval_s=progress_interval_s),
        max_concurrent_live_migrations=limit,
    )
    events, peers, changes = Events(), Peers(), []  # type: ignore[var-annotated]
    ctx = AgentContext(
        host=host,
        config=LiveConfig(cfg),
        ledger=None,  # type: ignore[arg-type]  # the source side never touches the claim ledger
        libvirt=LibvirtConnections(URI),
        events=events,
        peers=lambda: peers,
        metrics=AgentMetrics(),
        topology=TopologyHolder(None),  # type: ignore[arg-type]
        changed=changes.append,
        clock=time.time,
    )
    return Harness(ctx, events, peers, runners, changes)


def define_domain(metadata: str = "", *, vcpus: int = 2, memory_mb: int = 512, pins: bool = False) -> tuple[str, str]:
    """A running domain of its own on the test driver; (name, uuid). Undefine with `drop_domain`."""
    conn = libvirt.open(URI)
    name = f"src-{uuidlib.uuid4().hex[:8]}"
    uuid = str(uuidlib.uuid4())
    cputune = "<cputune>" + "".join(f"<vcpupin vcpu='{v}' cpuset='{v}'/>" for v in range(vcpus)) + "</cputune>"
    xml = (
        f"<domain type='test'><name>{name}</name><uuid>{uuid}</uuid>{metadata}"
        f"<memory unit='MiB'>{memory_mb}</memory><vcpu>{vcpus}</vcpu>{cputune if pins else ''}"
        "<os><type>hvm</type></os></domain>"
    )
    conn.defineXML(xml).create()
    conn.close()
    return name, uuid


def drop_domain(name: str) -> None:
    conn = libvirt.open(URI)
    try:
        dom = conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    except libvirt.libvirtError:
        pass
    finally:
        conn.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def placement_for(vcpus: int = 2, memory_mb: int = 512, first_cpu: int = 4) -> Placement:
    pins = {str(v): [first_cpu + v] for v in range(vcpus)}
    return Placement.from_json(
        {
            "fits": True,
            "cells": [
                {
                    "guest_cell": 0,
                    "host_cell": 1,
                    "vcpus": list(range(vcpus)),
                    "cpu_pins": pins,
                    "memory_mb": memory_mb,
                    "pagesize_kb": 4,
                    "dedicated_vcpus": list(range(vcpus)),
                }
            ],
            "emulator_pins": [first_cpu],
        }
    )


# --- the fakes behave -------------------------------------------------------------------------------


def test_fake_runner_plays_its_script_and_ends_on_release() -> None:
    runner = FakeRunner([progress(10), progress(20)])
    seen: list[float] = []
    t = threading.Thread(
        target=lambda: runner.run(
            "d", MigrationTarget("u", "m", "h"), None, _request(), lambda p: seen.append(p.percent)
        )
    )
    t.start()
    runner.started.wait(1)
    runner.finish()
    t.join(2)
    assert seen == [10, 20]


def test_fake_runner_refuses_abort_in_postcopy() -> None:
    runner = FakeRunner()
    runner.job = True
    assert runner.force_complete() == "postcopy"
    try:
        runner.abort()
    except MigrationAbortRefused:
        pass
    else:
        raise AssertionError("abort in post-copy must be refused")


def test_fake_peers_raise_in_order() -> None:
    peers = Peers(failures=[RemoteError("x")])
    try:
        peers.call("h", "confirm_claim", {"migration_id": "m"})
    except RemoteError:
        pass
    assert peers.call("h", "confirm_claim", {"migration_id": "m"})["state"] == "confirmed"


def _request() -> InstanceRequest:
    from agent.numa.request import parse_request

    return parse_request({"uuid": str(uuidlib.uuid4()), "vcpus": 1, "memory_mb": 64})
