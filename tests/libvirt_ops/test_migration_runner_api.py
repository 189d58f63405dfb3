"""The runner's API for the daemon: the legacy move without a placement, attaching to a job after a
restart, the bandwidth and page size in the progress, force-complete's answer, the decided policy."""

from __future__ import annotations

from typing import Any

import libvirt
import pytest

from agent.libvirt_ops import migration as mig
from agent.libvirt_ops.domain_xml import parse_domain
from agent.libvirt_ops.errors import MigrationAbortRefused, NoMigrationInProgress
from agent.libvirt_ops.migration_job import MigrationJob
from agent.libvirt_ops.policy import MigrationPolicy
from agent.testing.clock import FakeClock
from agent.testing.fake_libvirt import DestConn, DestDomain, FakeDomain, MiB, job_stats
from tests.libvirt_ops.test_migration_unit import SMALL_DOMAIN_XML, TARGET, cfg, make_request, runner_for

pytestmark = pytest.mark.timeout(60)

PINNED_XML = SMALL_DOMAIN_XML.replace("</domain>", "<cputune><vcpupin vcpu='0' cpuset='3'/></cputune></domain>", 1)


class XmlDomain(FakeDomain):
    """A domain whose live and persistent XML differ (the persistent one has a title)."""

    def XMLDesc(self, flags: int = 0) -> str:
        self.calls.append(("XMLDesc", flags))
        if flags & libvirt.VIR_DOMAIN_XML_INACTIVE:
            return PINNED_XML.replace("<name>vm1</name>", "<name>vm1</name>\n  <title>inactive</title>")
        return PINNED_XML


# --- the legacy move (placement None) ---------------------------------------------------------------


def test_legacy_move_sends_the_live_and_persistent_xml_unchanged() -> None:
    clock = FakeClock(0.0)
    dom = XmlDomain([job_stats(100)] * 2, "complete", clock=clock)
    outcome = runner_for(dom, cfg(), clock=clock).run("vm1", TARGET, None, make_request())
    assert outcome.status == "completed"
    assert dom.migrate_args is not None
    _uri, params, _flags = dom.migrate_args
    live, persistent = params[libvirt.VIR_MIGRATE_PARAM_DEST_XML], params[libvirt.VIR_MIGRATE_PARAM_PERSIST_XML]
    assert live == PINNED_XML
    assert "<title>inactive</title>" in persistent
    for xml in (live, persistent):
        assert parse_domain(xml).vcpu_pins == {0: frozenset({3})}  # the pinning copied as it is


def test_legacy_move_of_a_transient_domain_persists_its_live_xml() -> None:
    class Transient(XmlDomain):
        def isPersistent(self) -> bool:
            return False

    clock = FakeClock(0.0)
    dom = Transient([job_stats(100)], "complete", clock=clock)
    assert runner_for(dom, cfg(), clock=clock).run("vm1", TARGET, None, make_request()).status == "completed"
    assert dom.migrate_args is not None
    params = dom.migrate_args[1]
    assert params[libvirt.VIR_MIGRATE_PARAM_PERSIST_XML] == params[libvirt.VIR_MIGRATE_PARAM_DEST_XML] == PINNED_XML


# --- attach: following a job started before a restart ------------------------------------------------

OFF = MigrationPolicy(False, False, "x")
PC = MigrationPolicy(False, True, "y")
TIMEOUT_CFG = dict(live_migration_completion_timeout_s=10, live_migration_downtime_delay_s=5)


def attached(
    script: list, end: str = "complete", config: Any = None, **kw: Any
) -> tuple[FakeDomain, mig.MigrationRunner, FakeClock]:
    """A domain with a running job, a runner whose destination has the guest once the job ended."""
    clock = FakeClock(0.0)
    dom = FakeDomain(script, end, clock=clock, **kw)
    dest = DestConn(lambda: dom.finished and dom._error is None, DestDomain(active=True))
    return dom, runner_for(dom, config or cfg(), dest_conn=dest, clock=clock), clock


def test_attach_follows_a_running_job_to_its_completion() -> None:
    dom, runner, _clock = attached([job_stats(300, elapsed_ms=5000), job_stats(100, elapsed_ms=5500)])
    seen: list[mig.MigrationProgress] = []
    outcome = runner.attach("vm1", TARGET, OFF, seen.append)
    assert outcome.status == "completed" and "followed after a restart" in outcome.reason
    assert outcome.policy is OFF
    assert [p.percent for p in seen] == sorted(p.percent for p in seen) and seen[-1].percent > 75
    assert seen[0].elapsed_s == 5.0  # on the job's own clock
    assert outcome.elapsed_s >= 5.0
    assert dom.downtimes[0][1] == 400  # 5 s in: the last step of 1 s/GiB x 4 is in force at once
    assert "migrateToURI3" not in dom.names()
    with pytest.raises(NoMigrationInProgress):
        runner.abort()


def test_attach_refuses_a_domain_without_an_outgoing_job() -> None:
    dom, runner, _clock = attached([{"type": libvirt.VIR_DOMAIN_JOB_NONE}])
    with pytest.raises(NoMigrationInProgress):
        runner.attach("vm1", TARGET, OFF)
    incoming = job_stats(100, operation=libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN)
    _dom, runner, _clock = attached([incoming])
    with pytest.raises(NoMigrationInProgress):
        runner.attach("vm1", TARGET, OFF)


def test_attached_monitor_follows_the_jobs_own_clock() -> None:
    """The completion timeout counts from the job's start, not from the attach: 12 s into a job with
    a 10 s/GiB timeout on a 1 GiB guest, the timeout's abort comes at the first poll."""
    script = [job_stats(600, total_mib=1000, elapsed_ms=12_000)]
    dom, runner, _clock = attached(script, "hang", cfg(**TIMEOUT_CFG))
    seen: list[float] = []
    outcome = runner.attach("vm1", TARGET, OFF, lambda p: seen.append(p.percent))
    assert seen == [40.0]  # the timeout's abort ended the job at once
    assert "abortJob" in dom.names() and outcome.status == "aborted"
    assert "completion timeout" in outcome.reason
    assert dom.names().index("migrateSetMaxDowntime") < dom.names().index("abortJob")


def test_attached_monitor_steps_the_downtime_and_reports_it() -> None:
    dom, runner, _clock = attached([job_stats(300, elapsed_ms=0)] * 12)
    seen: list[int] = []
    outcome = runner.attach("vm1", TARGET, OFF, lambda p: seen.append(p.max_downtime_ms))
    assert seen == sorted(seen) and seen[0] < seen[-1]
    assert outcome.status == "completed" and "abortJob" not in dom.names()


def test_attached_abort_and_its_refusal_in_postcopy() -> None:
    dom, runner, _clock = attached([job_stats(300, elapsed_ms=1000)] * 3, "hang", postcopy_script=[job_stats(50)])
    actions: list[str] = []
    refused: list[Exception] = []

    def on_progress(p: mig.MigrationProgress) -> None:
        if not actions:
            actions.append(runner.force_complete())
        elif p.phase == "postcopy":
            try:
                runner.abort()
            except MigrationAbortRefused as exc:
                refused.append(exc)

    outcome = runner.attach("vm1", TARGET, PC, on_progress)
    assert actions == ["postcopy"] and refused
    assert outcome.status == "completed" and outcome.switched_to_postcopy
    assert "abortJob" not in dom.names()


def test_attached_abort_on_request_leaves_the_guest_here() -> None:
    dom, runner, _clock = attached([job_stats(300, elapsed_ms=1000)] * 3, "hang")
    outcome = runner.attach("vm1", TARGET, OFF, lambda p: runner.abort())
    assert outcome.status == "aborted" and "aborted on request" in outcome.reason
    assert dom.names().count("abortJob") == 1 and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING


def test_attached_force_complete_pauses_without_postcopy_and_resumes_after_a_failure() -> None:
    dom, runner, _clock = attached(
        [job_stats(300, elapsed_ms=1000)] * 3, "hang", paused_script=[job_stats(50)], paused_end="fail"
    )
    actions: list[str] = []
    outcome = runner.attach("vm1", TARGET, OFF, lambda p: actions or actions.append(runner.force_complete()))
    assert actions == ["paused"] and "suspend" in dom.names()
    assert outcome.status == "failed" and "still runs on the source" in outcome.reason
    assert dom.names().count("resume") == 1  # paused by us: resumed by the failure recovery


def test_attached_end_from_the_job_completed_event() -> None:
    job = MigrationJob(dom=None, name="vm1", uuid="u", policy=OFF, domain_paused_at_start=False, attached=True)
    mig._on_job_completed(None, None, {"downtime": 7}, job)
    assert job.done.is_set() and job.event_stats == {"downtime": 7}
    stopped = MigrationJob(dom=None, name="vm1", uuid="u", policy=OFF, domain_paused_at_start=False, attached=True)
    mig._on_lifecycle(None, None, libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED, stopped)
    assert stopped.done.is_set()
    ours = MigrationJob(dom=None, name="vm1", uuid="u", policy=OFF, domain_paused_at_start=False)
    mig._on_job_completed(None, None, {}, ours)
    assert not ours.done.is_set()  # run()'s worker sets done for a job of ours


# --- progress: libvirt's bandwidth and page size -----------------------------------------------------


def test_progress_carries_libvirts_bandwidth_and_page_size() -> None:
    stats = job_stats(100, dirty=10, memory_bps=50 * MiB, memory_page_size=16384)
    p = mig.progress_from_stats(stats, phase="precopy", max_downtime_ms=0, elapsed_s=1.0)
    assert (p.memory_bps, p.memory_page_size, p.dirty_rate_bps) == (50 * MiB, 16384, 10 * 16384)
    plain = mig.progress_from_stats(job_stats(100, dirty=10), phase="precopy", max_downtime_ms=0, elapsed_s=1.0)
    assert (plain.memory_bps, plain.memory_page_size, plain.dirty_rate_bps) == (0, 4096, 10 * 4096)


def test_the_runner_reports_them_in_every_progress() -> None:
    clock = FakeClock(0.0)
    dom = FakeDomain([job_stats(300, memory_bps=7 * MiB, memory_page_size=8192)] * 2, clock=clock)
    seen: list[mig.MigrationProgress] = []
    runner_for(dom, cfg(), clock=clock).run("vm1", TARGET, None, make_request(), seen.append)
    assert seen and all((p.memory_bps, p.memory_page_size) == (7 * MiB, 8192) for p in seen)


# --- force_complete: what it did, or why it did nothing ----------------------------------------------


def test_force_complete_tells_already_postcopy_from_already_paused() -> None:
    clock = FakeClock(0.0)
    dom = FakeDomain([job_stats(300)] * 4, "hang", postcopy_script=[job_stats(50)] * 2, clock=clock)
    runner = runner_for(dom, cfg(), clock=clock)
    actions: list[mig.ForceCompleteAction] = []
    runner.run("vm1", TARGET, None, make_request(post_copy=True), lambda p: actions.append(runner.force_complete()))
    assert actions[:2] == [mig.ForceCompleteAction.POSTCOPY, mig.ForceCompleteAction.ALREADY_POSTCOPY]
    assert actions[0] == "postcopy"  # a str enum: the words of the logs and the older callers

    clock = FakeClock(0.0)
    dom = FakeDomain([job_stats(300)] * 4, "hang", paused_script=[job_stats(50)] * 2, clock=clock)
    runner = runner_for(dom, cfg(), clock=clock)
    paused: list[mig.ForceCompleteAction] = []
    runner.run("vm1", TARGET, None, make_request(), lambda p: paused.append(runner.force_complete()))
    assert paused[:2] == [mig.ForceCompleteAction.PAUSED, mig.ForceCompleteAction.ALREADY_PAUSED]
    assert dom.names().count("suspend") == 1


# --- the decided policy, reported before the job starts ----------------------------------------------


def test_the_decided_policy_is_reported_before_the_job_starts_and_in_the_outcome() -> None:
    clock = FakeClock(0.0)
    dom = FakeDomain([job_stats(100)], clock=clock)
    heard: list[tuple[MigrationPolicy, list[str]]] = []
    outcome = runner_for(dom, cfg(), clock=clock).run(
        "vm1", TARGET, None, make_request(post_copy=True), on_policy=lambda p: heard.append((p, dom.names()))
    )
    ((policy, calls_then),) = heard
    assert "migrateToURI3" not in calls_then  # heard before the job started
    assert policy == outcome.policy and policy.post_copy and not policy.auto_converge
    assert "compute:live_migration_post_copy=true" in policy.reason  # where the part came from


def test_a_broken_policy_listener_does_not_stop_the_migration() -> None:
    clock = FakeClock(0.0)
    dom = FakeDomain([job_stats(100)], clock=clock)

    def broken(_policy: MigrationPolicy) -> None:
        raise RuntimeError("listener bug")

    assert runner_for(dom, cfg(), clock=clock).run("vm1", TARGET, None, make_request(), on_policy=broken).status == (
        "completed"
    )
