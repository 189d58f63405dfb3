"""Restart recovery of the source side: the verdict table, and taking records up against
test:///default (the destination probed through a fake); a running job is followed by the real
runner (MigrationRunner.attach, whose own rules are tests/libvirt_ops/test_migration_runner_api.py)
on the shared fakes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest

from agent.bus.schemas import MigrationIdBody
from agent.daemon import source_recovery as rec
from agent.daemon.migrations import MigrationRecord
from agent.daemon.source import Source
from agent.daemon.source_recovery import Probe, recover, verdict
from agent.libvirt_ops.migration import MigrationRunner
from agent.testing.clock import FakeClock
from agent.testing.fake_libvirt import DestConn, DestDomain, FakeConn, FakeDomain, job_stats
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


def attachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vm: tuple[str, str], dom: FakeDomain, **record: Any
) -> tuple[Source, Any]:
    """A source whose record says `vm` was migrating, and whose libvirt has `dom` (the shared fake)
    with its job still running: the test driver has no migration jobs, so probe and domain are fakes;
    the runner is the real MigrationRunner on them (its destination has the guest once the job ended)."""
    clock = FakeClock(0.0)

    def sleep(dt: float) -> None:  # fake time, but a real pause so that the test can act in between
        clock.sleep(dt)
        time.sleep(0.005)

    conn = FakeConn(dom)
    dest = DestConn(lambda: dom.finished and dom._error is None, DestDomain(active=True, uuid=vm[1]))

    def runner_factory(c: Any, cfg: Any) -> MigrationRunner:
        return MigrationRunner(c, cfg, clock=clock, sleep=sleep, connect=lambda uri: c if uri == c.getURI() else dest)

    monkeypatch.setattr(rec, "probe", lambda conn, record, connect=None: Probe(here=True, job_active=True, there=None))
    h = make_harness(tmp_path, [])
    src = Source(h.ctx, runner_factory=runner_factory, sleep=lambda s: None, recover=False, connect=lambda uri: conn)
    src.store.add(for_vm(vm, status="running", **record))
    return src, h


def test_a_running_job_is_attached_and_followed_to_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vm: tuple[str, str]
) -> None:
    stats = job_stats(600, total_mib=1000, elapsed_ms=1000)
    dom = FakeDomain([stats] * 400, "hang", postcopy_script=[job_stats(50)] * 3, uuid=vm[1])
    src, h = attachable(tmp_path, monkeypatch, vm, dom, percent=30.0, post_copy=True, auto_converge=False)
    assert recover(src, sleep=lambda s: None) == {"m-1": "attach"}
    wait_for(lambda: len(h.events.bodies(".progress")) >= 1)
    assert h.events.bodies(".progress")[0]["percent"] == 40.0  # 30 before the restart, 40 now
    src.force_complete(MigrationIdBody("m-1"))
    assert "migrateStartPostCopy" in dom.names()  # the recorded policy armed post-copy
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
    dom = FakeDomain([job_stats(300, elapsed_ms=1000)] * 3, "hang", uuid=vm[1])
    src, h = attachable(tmp_path, monkeypatch, vm, dom, abort_requested=True)
    assert recover(src, sleep=lambda s: None) == {"m-1": "attach"}
    wait_for(lambda: "abortJob" in dom.names())
    wait_for(lambda: src.store.get("m-1").status == "aborted")  # type: ignore[union-attr]
    wait_for(lambda: src.store.get("m-1").claim_action == "released")  # type: ignore[union-attr]
