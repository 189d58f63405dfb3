"""FleetView (ages, liveness, overtaken events) and MigrationTracker (percent never goes down,
done, polling when events are missing) without a broker."""

from __future__ import annotations

import threading

import msgspec

from agent.bus import schemas as s
from agent.bus.errors import RemoteNotFound
from agent.orchestrator.fleet import FleetView
from agent.orchestrator.tracker import MigrationTracker
from tests.orchestrator.helpers import host


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_fleet_ages_and_liveness() -> None:
    clock = Clock()
    fleet = FleetView(clock)
    fleet.on_capabilities("capabilities.a", host("a").caps)
    clock.now += 50
    fleet.on_capabilities("capabilities.b", host("b").caps)
    clock.now += 20
    assert [(h.name, h.age(clock.now)) for h in fleet.all()] == [("a", 70.0), ("b", 20.0)]
    assert [h.name for h in fleet.live(60)] == ["b"]
    assert fleet.peer_versions("a") == (1, 1) and fleet.peer_versions("zz") is None


def test_an_overtaken_event_is_ignored() -> None:
    fleet = FleetView(Clock())
    newer = msgspec.structs.replace(host("a", pcpus=(1, 1)).caps, seq=5, ts=10.0)
    older = msgspec.structs.replace(host("a", pcpus=(8, 8)).caps, seq=4, ts=9.0)
    fleet.on_capabilities("", newer)
    fleet.on_capabilities("", older)
    assert fleet.get("a").caps.cells[0].free_pcpus == 1
    restarted = msgspec.structs.replace(host("a", pcpus=(3, 3)).caps, seq=1, ts=11.0)
    fleet.on_capabilities("", restarted)  # the agent restarted: seq begins again, but it is newer
    assert fleet.get("a").caps.cells[0].free_pcpus == 3


def progress(pct: float) -> s.MigrationProgressEvent:
    return s.MigrationProgressEvent(
        migration_id="m1", instance="vm", source="a", destination="b", phase="precopy", percent=pct, eta_s=None,
        memory_total=100, memory_remaining=10, dirty_rate_bps=0, bandwidth_bps=0, iteration=1, throttle_pct=0,
        max_downtime_ms=500, ts=1.0,
    )  # fmt: skip


def done(status: str = "completed") -> s.MigrationDoneEvent:
    policy = s.PolicyView(auto_converge=False, post_copy=False, decided_by="host config")
    return s.MigrationDoneEvent(
        migration_id="m1", status=status, reason=None, downtime_ms=5, total_s=1.0, policy=policy, host_now="b"
    )


def test_percent_never_goes_down_and_done_ends_the_wait() -> None:
    tracker = MigrationTracker()
    (_, on_progress, _), (_, on_done, _) = tracker.handlers()
    shown: list[float] = []

    def feed() -> None:
        for pct in (10.0, 40.0, 30.0, 80.0):
            on_progress("", progress(pct))
        on_done("", done())

    threading.Timer(0.05, feed).start()
    outcome = tracker.wait("m1", timeout=5, on_progress=lambda p: shown.append(p.percent))
    assert outcome.status == "completed" and outcome.done is not None and outcome.done.host_now == "b"
    assert shown == sorted(shown) and shown[-1] == 80.0
    assert len(shown) <= 4  # each event shown at most once (the done event does not repeat the last)


def test_polling_finds_an_end_without_events() -> None:
    tracker = MigrationTracker()
    answers = iter([RemoteNotFound("restarting"), None])

    def poll() -> s.MigrationStateResult:
        if next(answers, None) is not None:
            raise RemoteNotFound("not yet")
        return s.MigrationStateResult(
            migration_id="m1", instance="vm", status="failed", phase="done", percent=3, reason="x"
        )

    outcome = tracker.wait("m1", timeout=5, poll=poll, poll_s=0.01)
    assert (outcome.status, outcome.reason, outcome.done) == ("failed", "x", None)


def test_wait_gives_up_but_the_migration_goes_on() -> None:
    outcome = MigrationTracker().wait("m1", timeout=0.05, poll_s=0.01)
    assert outcome.status == "running"


def test_the_last_progress_is_not_repeated_by_the_done_event() -> None:
    tracker = MigrationTracker()
    (_, on_progress, _), (_, on_done, _) = tracker.handlers()
    shown: list[float] = []
    on_progress("", progress(50.0))

    def finish() -> None:
        on_done("", done())

    threading.Timer(0.05, finish).start()
    assert tracker.wait("m1", timeout=5, on_progress=lambda p: shown.append(p.percent)).status == "completed"
    assert shown == [50.0]
