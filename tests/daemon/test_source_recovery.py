"""Restart recovery of the source side: the verdict table, the attached job's rules against a fake
domain, and taking records up against test:///default (the destination probed through a fake)."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import libvirt
import pytest

from agent.bus.schemas import MigrationIdBody
from agent.config import LibvirtConfig
from agent.daemon import source_recovery as rec
from agent.daemon.migrations import MigrationRecord
from agent.daemon.source import Source
from agent.daemon.source_recovery import AttachedJob, Probe, recover, verdict
from agent.libvirt_ops.errors import MigrationAbortRefused, NoMigrationInProgress
from agent.libvirt_ops.policy import MigrationPolicy
from tests.daemon.test_migrations import record as make_record
from tests.daemon.test_source_fakes import FakeRunner, define_domain, drop_domain, make_harness, placement_for, wait_for

ACTIVE = libvirt.VIR_DOMAIN_JOB_UNBOUNDED
OUT = libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT


# --- the verdict table ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "abort", "probe", "want"),
    [
        ("completed", False, None, "settle"),
        ("running", False, Probe(here=True, job_active=True, there=None), "attach"),
        ("preparing", False, Probe(here=True, job_active=True, there=None), "attach"),
        ("running", False, Probe(here=False, job_active=False, there=True), "completed"),
        ("queued", False, Probe(here=True, job_active=False, there=False), "requeue"),
        ("preparing", False, Probe(here=True, job_active=False, there=False), "failed"),
        ("running", False, Probe(here=True, job_active=False, there=None), "failed"),
        ("running", True, Probe(here=True, job_active=False, there=False), "aborted"),
        ("running", False, Probe(here=False, job_active=False, there=False), "lost"),
    ],
)
def test_verdict(status: str, abort: bool, probe: Probe | None, want: str) -> None:
    assert verdict(make_record(status=status, abort_requested=abort), probe) == want


# --- the attached job -----------------------------------------------------------------------------


class FakeDomain:
    """A source domain with an outgoing job whose stats the test sets."""

    def __init__(self, elapsed_ms: int = 0, state: tuple[int, int] = (libvirt.VIR_DOMAIN_RUNNING, 0)) -> None:
        self.stats: dict[str, Any] = {
            "type": ACTIVE,
            "operation": OUT,
            "time_elapsed": elapsed_ms,
            "memory_total": 1000,
            "memory_remaining": 600,
            "memory_processed": 400,
        }
        self.state_value = state
        self.calls: list[tuple[Any, ...]] = []

    def jobStats(self, flags: int = 0) -> dict[str, Any]:  # noqa: N802 - libvirt's name
        return dict(self.stats)

    def state(self) -> list[int]:
        return list(self.state_value)

    def abortJob(self) -> None:  # noqa: N802
        self.calls.append(("abortJob",))
        if self.stats["type"] not in (libvirt.VIR_DOMAIN_JOB_BOUNDED, ACTIVE):
            raise libvirt.libvirtError("no job")
        self.stats["type"] = libvirt.VIR_DOMAIN_JOB_NONE

    def migrateSetMaxDowntime(self, ms: int, flags: int) -> None:  # noqa: N802
        self.calls.append(("downtime", ms))

    def migrateStartPostCopy(self, flags: int) -> None:  # noqa: N802
        self.calls.append(("postcopy",))
        self.state_value = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY)

    def suspend(self) -> None:
        self.calls.append(("suspend",))

    def maxMemory(self) -> int:  # noqa: N802
        return 1 << 20


CFG = LibvirtConfig(live_migration_completion_timeout_s=10, live_migration_downtime_delay_s=5)
OFF = MigrationPolicy(False, False, "x")
PC = MigrationPolicy(False, True, "y")


def test_attached_abort_and_refusal_in_postcopy() -> None:
    dom = FakeDomain()
    job = AttachedJob(dom, CFG, PC, 1024)
    assert job.force_complete() == "postcopy"
    with pytest.raises(MigrationAbortRefused):
        job.abort()
    other = AttachedJob(FakeDomain(), CFG, OFF, 1024)
    other.abort()
    assert other.aborted
    with pytest.raises(NoMigrationInProgress):
        other.abort()  # the job is gone


def test_attached_force_complete_pauses_without_postcopy() -> None:
    dom = FakeDomain()
    assert AttachedJob(dom, CFG, OFF, 1024).force_complete() == "paused"
    assert dom.calls == [("suspend",)]


def test_attached_monitor_follows_the_jobs_own_clock() -> None:
    """Downtime steps and the completion timeout count from the job's start, not from the attach."""
    dom = FakeDomain(elapsed_ms=12_000)  # 12 s into a job with a 10 s/GiB timeout on a 1 GiB guest
    job = AttachedJob(dom, CFG, OFF, 1024)
    seen: list[float] = []

    def progress(p: Any) -> None:
        seen.append(p.percent)
        if len(seen) == 3:
            dom.stats["type"] = libvirt.VIR_DOMAIN_JOB_NONE

    job.follow(progress, lambda s: None)
    assert seen == [40.0]  # the timeout's abort ended the job at once
    assert ("abortJob",) in dom.calls and job.aborted
    assert dom.calls[0][0] == "downtime"


def test_attached_monitor_steps_the_downtime_and_publishes() -> None:
    dom = FakeDomain(elapsed_ms=0)
    job = AttachedJob(dom, replace(CFG, live_migration_completion_timeout_s=0), OFF, 1024)
    seen: list[int] = []

    def progress(p: Any) -> None:
        seen.append(p.max_downtime_ms)
        dom.stats["time_elapsed"] += 6_000
        if len(seen) == 4:
            dom.stats["type"] = libvirt.VIR_DOMAIN_JOB_NONE

    job.follow(progress, lambda s: None)
    assert seen == sorted(seen) and seen[0] < seen[-1]
    assert job.timeout is None and not job.aborted


# --- taking records up ----------------------------------------------------------------------------


@pytest.fixture
def vm() -> Any:
    name, uuid = define_domain()
    yield name, uuid
    drop_domain(name)


def seeded(tmp_path: Path, record: MigrationRecord, runners: list[FakeRunner] | None = None) -> tuple[Source, Any]:
    h = make_harness(tmp_path, runners or [])
    src = Source(h.ctx, runner_factory=h.runner_factory, sleep=lambda s: None, recover=False)
    src.store.add(record)
    return src, h


def for_vm(vm: tuple[str, str], **changes: Any) -> MigrationRecord:
    fields: dict[str, Any] = {
        "instance": vm[0],
        "instance_name": vm[0],
        "instance_uuid": vm[1],
        "placement_json": json.dumps(placement_for().to_json()),
    }
    return make_record(**{**fields, **changes})


def test_a_migration_that_completed_while_down_is_confirmed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vm: tuple[str, str]
) -> None:
    drop_domain(vm[0])  # gone from here: undefined by the migration
    monkeypatch.setattr(rec, "destination_running", lambda uri, uuid, connect=None: True)
    src, h = seeded(tmp_path, for_vm(vm, status="running", percent=40.0))
    assert recover(src) == {"m-1": "completed"}
    record = src.store.get("m-1")
    assert record is not None and record.status == "completed" and record.host_now == "hv-02"
    assert record.claim_action == "confirmed"
    assert [c[1] for c in h.peers.calls] == ["confirm_claim"]
    assert h.events.bodies(".done")[0]["status"] == "completed"


def test_a_job_that_ended_while_down_with_the_vm_here_is_failed_and_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vm: tuple[str, str]
) -> None:
    monkeypatch.setattr(rec, "destination_running", lambda uri, uuid, connect=None: False)
    src, h = seeded(tmp_path, for_vm(vm, status="running"))
    assert recover(src) == {"m-1": "failed"}
    assert src.store.get("m-1").claim_action == "released"  # type: ignore[union-attr]
    assert h.events.bodies(".done")[0]["host_now"] == "hv-01"


def test_an_aborted_one_stays_aborted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vm: tuple[str, str]) -> None:
    monkeypatch.setattr(rec, "destination_running", lambda uri, uuid, connect=None: False)
    src, _ = seeded(tmp_path, for_vm(vm, status="running", abort_requested=True))
    assert recover(src) == {"m-1": "aborted"}
    assert src.store.get("m-1").status == "aborted"  # type: ignore[union-attr]


def test_a_queued_one_is_started_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vm: tuple[str, str]) -> None:
    monkeypatch.setattr(rec, "destination_running", lambda uri, uuid, connect=None: False)
    runner = FakeRunner()
    src, _ = seeded(tmp_path, for_vm(vm, status="queued"), [runner])
    assert recover(src) == {"m-1": "requeue"}
    assert runner.started.wait(2) and runner.calls[0][2] == placement_for()
    runner.finish()
    wait_for(lambda: src.store.get("m-1").status == "completed")  # type: ignore[union-attr]


def test_an_unsettled_claim_is_settled(tmp_path: Path, vm: tuple[str, str]) -> None:
    src, h = seeded(tmp_path, for_vm(vm, status="failed", reason="x", claim_action="pending"))
    assert recover(src) == {"m-1": "settle"}
    assert [c[1] for c in h.peers.calls] == ["release_claim"]
    assert src.store.get("m-1").claim_action == "released"  # type: ignore[union-attr]


def test_one_bad_record_does_not_stop_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vm: tuple[str, str]
) -> None:
    monkeypatch.setattr(rec, "destination_running", lambda uri, uuid, connect=None: False)
    src, _ = seeded(tmp_path, for_vm(vm, migration_id="bad", status="queued", placement_json="{not json"))
    src.store.add(for_vm(vm, migration_id="good", status="running", created_at=200.0))
    assert recover(src) == {"good": "failed"}


def test_a_running_job_is_attached_and_followed_to_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vm: tuple[str, str]
) -> None:
    """The job is simulated: the test driver has no migration jobs, so probe and domain are fakes."""
    dom = FakeDomain(elapsed_ms=1000)
    ended = threading.Event()
    monkeypatch.setattr(rec, "probe", lambda conn, record, connect=None: Probe(here=True, job_active=True, there=None))
    monkeypatch.setattr(rec, "destination_running", lambda uri, uuid, connect=None: ended.is_set())

    class Conn:
        def lookupByUUIDString(self, uuid: str) -> Any:  # noqa: N802
            return dom

        def isAlive(self) -> bool:  # noqa: N802
            return True

        def close(self) -> None:
            pass

    src, h = seeded(tmp_path, for_vm(vm, status="running", percent=30.0, post_copy=True, auto_converge=False))
    src._connect = lambda uri: Conn()
    monkeypatch.setattr(rec, "_source_side", lambda conn, uuid: (False, False, False))
    assert recover(src, sleep=lambda s: None) == {"m-1": "attach"}
    wait_for(lambda: len(h.events.bodies(".progress")) >= 1)
    assert h.events.bodies(".progress")[0]["percent"] == 40.0  # 30 before the restart, 40 now
    src.force_complete(MigrationIdBody("m-1"))
    assert ("postcopy",) in dom.calls  # the recorded policy armed post-copy
    dom.stats["type"] = libvirt.VIR_DOMAIN_JOB_NONE
    ended.set()
    wait_for(lambda: src.store.get("m-1").status == "completed")  # type: ignore[union-attr]
    wait_for(lambda: src.store.get("m-1").claim_action == "confirmed")  # type: ignore[union-attr]
    percents = [b["percent"] for b in h.events.bodies(".progress")]
    assert percents == sorted(percents)


def test_start_recovers_in_the_background(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vm: tuple[str, str]) -> None:
    monkeypatch.setattr(rec, "destination_running", lambda uri, uuid, connect=None: False)
    h = make_harness(tmp_path, [])
    src = Source(h.ctx, runner_factory=h.runner_factory, sleep=lambda s: None)
    src.store.add(for_vm(vm, status="running"))
    src.start()
    assert src.recovered.wait(5)
    assert src.store.get("m-1").status == "failed"  # type: ignore[union-attr]


def test_an_abort_asked_before_the_restart_is_applied_on_attach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vm: tuple[str, str]
) -> None:
    dom = FakeDomain(elapsed_ms=1000)

    class Conn:
        def lookupByUUIDString(self, uuid: str) -> Any:  # noqa: N802
            return dom

        def close(self) -> None:
            pass

    monkeypatch.setattr(rec, "probe", lambda conn, record, connect=None: Probe(here=True, job_active=True, there=None))
    monkeypatch.setattr(rec, "destination_running", lambda uri, uuid, connect=None: False)
    monkeypatch.setattr(rec, "_source_side", lambda conn, uuid: (True, False, False))
    src, h = seeded(tmp_path, for_vm(vm, status="running", abort_requested=True))
    src._connect = lambda uri: Conn()
    assert recover(src, sleep=lambda s: None) == {"m-1": "attach"}
    assert ("abortJob",) in dom.calls
    wait_for(lambda: src.store.get("m-1").status == "aborted")  # type: ignore[union-attr]
    wait_for(lambda: src.store.get("m-1").claim_action == "released")  # type: ignore[union-attr]
