"""Unit tests of the migration runner + monitor, against a scripted fake domain (no libvirtd).

The fakes (domain, connections, errors, clock) are agent.testing's. Most tests replace the policy
and XML-rewrite functions with small fakes (the `fake_policy` fixture patches
`agent.libvirt_ops.migration.<name>`) so that they pin down the runner alone;
`test_real_policy_flags_params_and_rewritten_xml_reach_migrate_to_uri3` runs the real ones.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

import libvirt
import pytest

from agent.config import LibvirtConfig
from agent.errors import InvalidRequest
from agent.libvirt_ops import migration as mig
from agent.libvirt_ops.connection import lookup_domain, open_connection
from agent.libvirt_ops.errors import (
    DomainNotFound,
    LibvirtConnectionError,
    MigrationAbortRefused,
    MigrationError,
    NoMigrationInProgress,
)
from agent.numa.placement import CellPlacement, Placement
from agent.numa.request import InstanceRequest, MigrationWishes
from agent.testing import builders
from agent.testing.clock import FakeClock
from agent.testing.fake_libvirt import (
    DOMAIN_UUID,
    DestConn,
    DestDomain,
    FakeConn,
    FakeDomain,
    FakeError,
    MiB,
    job_stats,
)

pytestmark = pytest.mark.timeout(60)

TARGET = mig.MigrationTarget(uri="qemu+tcp://dest/system", migrate_uri="tcp://dest", host="dest")
PLACEMENT = Placement(
    cells=(
        CellPlacement(
            guest_cell=0,
            host_cell=0,
            vcpus=(0,),
            cpu_pins={0: (0,)},
            memory_mb=512,
            pagesize_kb=4,
            dedicated_vcpus=frozenset({0}),
        ),
    )
)


def make_request(post_copy=None, auto_converge=None) -> InstanceRequest:
    wishes = MigrationWishes(auto_converge=auto_converge, post_copy=post_copy)
    return builders.request(1, 512, page_kb=None, uuid=DOMAIN_UUID, numa_implicit=False, migration=wishes)


# --- fake policy module -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakePolicy:
    auto_converge: bool
    post_copy: bool
    reason: str


@pytest.fixture
def fake_policy(monkeypatch):
    """Replace the policy functions and the XML rewriter as the migration module sees them."""
    seen = {}

    def decide_policy(wishes, cfg, *, domain_paused):
        seen["paused"] = domain_paused
        if wishes.auto_converge and wishes.post_copy:
            raise InvalidRequest("both migration features asked", ["compute:live_migration_post_copy"])
        return FakePolicy(bool(wishes.auto_converge), bool(wishes.post_copy), "metadata")

    def migration_flags(policy):
        flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
        if policy.post_copy:
            flags |= libvirt.VIR_MIGRATE_POSTCOPY
        if policy.auto_converge:
            flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
        return flags

    def migration_params(policy, *, dest_xml, persistent_xml, migrate_uri, cfg):
        return {"destination_xml": dest_xml, "persistent_xml": persistent_xml, "migrate_uri": migrate_uri}

    monkeypatch.setattr(mig, "decide_policy", decide_policy)
    monkeypatch.setattr(mig, "migration_flags", migration_flags)
    monkeypatch.setattr(mig, "migration_params", migration_params)
    monkeypatch.setattr(mig, "rewrite_for_placement", lambda xml, placement: xml + "<!--rewritten-->")
    return seen


def cfg(**kw) -> LibvirtConfig:
    base = dict(
        live_migration_poll_interval_s=0.5,
        live_migration_downtime_ms=400,
        live_migration_downtime_steps=4,
        live_migration_downtime_delay_s=1,
        live_migration_completion_timeout_s=0,
    )
    base.update(kw)
    return LibvirtConfig(**base)


def connector(source, dest=None):
    """connect(uri): the source FakeConn for its URI (the runner's job connection), else `dest`."""
    dest = dest if dest is not None else FakeConn(uri=TARGET.uri)

    def connect(uri):
        return source if uri == source.getURI() else dest

    return connect


def runner_for(dom, config, dest_conn=None, clock=None):
    clock = clock or dom.clock or FakeClock(0.0)
    src = FakeConn(dom)
    return mig.MigrationRunner(src, config, clock=clock, sleep=clock.sleep, connect=connector(src, dest_conn))


# --- schedules ----------------------------------------------------------------------------------------


def test_downtime_steps_matches_novas_linear_schedule():
    c = LibvirtConfig(
        live_migration_downtime_ms=400, live_migration_downtime_steps=10, live_migration_downtime_delay_s=30
    )
    steps = mig.downtime_steps(c, 3 * 1024)
    assert steps == [(90.0 * i, ms) for i, ms in enumerate([40, 76, 112, 148, 184, 220, 256, 292, 328, 364, 400])]


def test_downtime_steps_count_at_least_one_gib():
    c = LibvirtConfig(
        live_migration_downtime_ms=500, live_migration_downtime_steps=2, live_migration_downtime_delay_s=75
    )
    assert mig.downtime_steps(c, 256) == [(0.0, 250), (75.0, 375), (150.0, 500)]
    assert mig.downtime_for(mig.downtime_steps(c, 256), 74.9) == 250
    assert mig.downtime_for(mig.downtime_steps(c, 256), 75.0) == 375
    assert mig.downtime_for(mig.downtime_steps(c, 256), 1e9) == 500


def test_completion_timeout_per_gib_min_one():
    assert mig.completion_timeout_s(LibvirtConfig(live_migration_completion_timeout_s=800), 256) == 800
    assert mig.completion_timeout_s(LibvirtConfig(live_migration_completion_timeout_s=800), 4096) == 3200
    assert mig.completion_timeout_s(LibvirtConfig(live_migration_completion_timeout_s=0), 4096) is None


def test_progress_from_stats():
    p = mig.progress_from_stats(
        job_stats(128, iteration=3, throttle=30, dirty=2500), phase="precopy", max_downtime_ms=100, elapsed_s=1.23456
    )
    assert p.percent == 75.0
    assert (p.memory_total, p.memory_remaining, p.memory_processed) == (512 * MiB, 128 * MiB, 384 * MiB)
    assert (p.iteration, p.throttle_pct, p.dirty_rate_pps, p.max_downtime_ms) == (3, 30, 2500, 100)
    assert p.elapsed_s == 1.235
    # processed only (no remaining key), clamped to 100
    assert (
        mig.progress_from_stats(
            {"memory_total": 100, "memory_processed": 250}, phase="precopy", max_downtime_ms=0, elapsed_s=0
        ).percent
        == 100.0
    )
    assert mig.progress_from_stats({}, phase="postcopy", max_downtime_ms=0, elapsed_s=0).percent == 0.0


def test_convergence_tracker():
    t = mig.ConvergenceTracker()
    # first pass: never judged
    assert not any(t.observe(1, r * MiB) for r in (500, 400, 300, 200, 100))
    # iteration 2 and 3 with the same dirty set -> stalled when iteration 4 begins
    assert not t.observe(2, 64 * MiB)
    assert not t.observe(2, 30 * MiB)
    assert not t.observe(3, 63 * MiB)
    assert t.observe(4, 64 * MiB)
    assert "not converging" in t.why
    # converging: the dirty set halves every iteration
    t = mig.ConvergenceTracker()
    assert not any(t.observe(i, (256 >> i) * MiB) for i in range(2, 9))


# --- runs -------------------------------------------------------------------------------------------


def test_completed_run_reports_progress_and_steps_downtime(fake_policy):
    clock = FakeClock(0.0)
    script = [job_stats(512 - 40 * i, iteration=1) for i in range(12)]  # 12 polls = 6 s
    dom = FakeDomain(script, "complete", clock=clock)
    dest = DestDomain(active=True)
    seen = []
    outcome = runner_for(dom, cfg(), DestConn(lambda: dom.finished, dest), clock).run(
        "vm1", TARGET, PLACEMENT, make_request(), seen.append
    )
    assert outcome.status == "completed", outcome.reason
    assert outcome.downtime_ms == 42  # completed stats from the destination
    assert outcome.final_stats["downtime"] == 42
    assert not outcome.switched_to_postcopy
    # 400 ms in 4 steps, 1 s x 1 GiB apart: 100, 175, 250, 325, 400
    assert dom.downtimes == [(0.0, 100), (1.0, 175), (2.0, 250), (3.0, 325), (4.0, 400)]
    assert [p.percent for p in seen[:3]] == [0.0, pytest.approx(7.81), pytest.approx(15.62)]
    assert all(p.phase == "precopy" for p in seen)
    assert seen[-1].max_downtime_ms == 400
    uri, params, flags = dom.migrate_args
    assert uri == TARGET.uri and params["migrate_uri"] == "tcp://dest"
    assert params["destination_xml"].endswith("<!--rewritten-->")
    assert "<!--inactive-->" in params["persistent_xml"]  # persistent XML from the inactive definition
    assert "abortJob" not in dom.names() and "suspend" not in dom.names()


def test_completion_timeout_action_abort(fake_policy, caplog):
    clock = FakeClock(0.0)
    dom = FakeDomain([job_stats(64, iteration=2 + i) for i in range(4)], "hang", clock=clock)
    caplog.set_level("INFO", logger="compute_agent.migration")
    outcome = runner_for(dom, cfg(live_migration_completion_timeout_s=3), clock=clock).run(
        "vm1", TARGET, PLACEMENT, make_request()
    )
    assert outcome.status == "aborted"
    assert "completion timeout" in outcome.reason
    assert dom.names().count("abortJob") == 1
    assert "suspend" not in dom.names() and "migrateStartPostCopy" not in dom.names()
    assert 3.0 < outcome.elapsed_s < 4.5
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert outcome.downtime_ms is None
    text = caplog.text
    assert "policy auto_converge=False post_copy=False" in text
    assert "action abort" in text and "aborting the job" in text and "aborted" in text


def test_completion_timeout_force_complete_without_postcopy_pauses(fake_policy):
    clock = FakeClock(0.0)
    dom = FakeDomain([job_stats(64, iteration=2)] * 10, "hang", paused_script=[job_stats(10, iteration=9)], clock=clock)
    seen = []
    outcome = runner_for(
        dom, cfg(live_migration_completion_timeout_s=2, live_migration_timeout_action="force_complete"), clock=clock
    ).run("vm1", TARGET, PLACEMENT, make_request(), seen.append)
    assert outcome.status == "completed"
    assert dom.names().count("suspend") == 1
    assert "migrateStartPostCopy" not in dom.names() and "resume" not in dom.names()
    assert not outcome.switched_to_postcopy
    assert seen[-1].phase == "paused-precopy"


def test_force_complete_pause_is_undone_when_the_migration_fails(fake_policy):
    clock = FakeClock(0.0)
    dom = FakeDomain(
        [job_stats(64, iteration=2)] * 10,
        "hang",
        paused_script=[job_stats(30, iteration=9)],
        paused_end="fail",
        clock=clock,
    )
    outcome = runner_for(
        dom, cfg(live_migration_completion_timeout_s=2, live_migration_timeout_action="force_complete"), clock=clock
    ).run("vm1", TARGET, PLACEMENT, make_request())
    assert outcome.status == "failed"
    assert (
        "qemu unexpectedly closed" in outcome.reason
        and f"libvirt error {libvirt.VIR_ERR_OPERATION_FAILED}" in outcome.reason
    )
    assert dom.names().index("suspend") < dom.names().index("resume")
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING


def test_completion_timeout_force_complete_with_postcopy_switches(fake_policy):
    clock = FakeClock(0.0)
    # remaining keeps shrinking a little (so the stall trigger does not fire first)
    script = [job_stats(500 - 30 * i, iteration=1) for i in range(10)]
    dom = FakeDomain(
        script, "hang", postcopy_script=[job_stats(100, iteration=3), job_stats(20, iteration=3)], clock=clock
    )
    seen = []
    outcome = runner_for(
        dom, cfg(live_migration_completion_timeout_s=2, live_migration_timeout_action="force_complete"), clock=clock
    ).run("vm1", TARGET, PLACEMENT, make_request(post_copy=True), seen.append)
    assert outcome.status == "completed"
    assert outcome.switched_to_postcopy
    assert dom.names().count("migrateStartPostCopy") == 1 and "suspend" not in dom.names()
    assert seen[-1].phase == "postcopy"
    assert dom.migrate_args[2] & libvirt.VIR_MIGRATE_POSTCOPY


def test_postcopy_armed_switches_when_not_converging(fake_policy, caplog):
    clock = FakeClock(0.0)
    caplog.set_level("INFO", logger="compute_agent.migration")
    script = [job_stats(r, iteration=1) for r in (400, 300, 200, 100)]
    script += [
        job_stats(64, iteration=2),
        job_stats(40, iteration=2),
        job_stats(64, iteration=3),
        job_stats(30, iteration=3),
        job_stats(64, iteration=4),
    ]
    dom = FakeDomain(script, "hang", postcopy_script=[job_stats(30, iteration=4)], clock=clock)
    config = cfg(live_migration_postcopy_switch="on_stall")
    outcome = runner_for(dom, config, clock=clock).run("vm1", TARGET, PLACEMENT, make_request(post_copy=True))
    assert outcome.status == "completed" and outcome.switched_to_postcopy
    # the dirty set stopped shrinking on the first poll of iteration 4 (the 9th poll), and the last low of
    # remaining memory (30 MiB, 8th poll) is 5 polls old on the 13th poll: switched then, not on one sample
    assert [n for n in dom.names() if n in ("jobStats", "migrateStartPostCopy")].index("migrateStartPostCopy") == 13
    assert "not converging" in caplog.text and "switching to post-copy" in caplog.text


def test_postcopy_armed_but_converging_stays_precopy(fake_policy):
    clock = FakeClock(0.0)
    script = [job_stats(r, iteration=1) for r in (400, 200)] + [job_stats(64 >> i, iteration=2 + i) for i in range(6)]
    dom = FakeDomain(script, "complete", clock=clock)
    outcome = runner_for(dom, cfg(), clock=clock).run("vm1", TARGET, PLACEMENT, make_request(post_copy=True))
    assert outcome.status == "completed" and not outcome.switched_to_postcopy
    assert "migrateStartPostCopy" not in dom.names()


def test_no_postcopy_policy_never_switches(fake_policy):
    clock = FakeClock(0.0)
    dom = FakeDomain([job_stats(64, iteration=2 + i) for i in range(8)], "complete", clock=clock)
    outcome = runner_for(dom, cfg(), clock=clock).run("vm1", TARGET, PLACEMENT, make_request(auto_converge=True))
    assert outcome.status == "completed" and "migrateStartPostCopy" not in dom.names()
    assert dom.migrate_args[2] & libvirt.VIR_MIGRATE_AUTO_CONVERGE


def test_abort_is_refused_in_postcopy(fake_policy):
    clock = FakeClock(0.0)
    dom = FakeDomain(
        [job_stats(300, iteration=1)] * 3, "hang", postcopy_script=[job_stats(100, iteration=3)] * 3, clock=clock
    )
    runner = runner_for(dom, cfg(), clock=clock)
    errors, actions = [], []

    def on_progress(p):
        if p.elapsed_s >= 1.0 and not actions:
            actions.append(runner.force_complete())
        elif p.phase == "postcopy":
            try:
                runner.abort()
            except MigrationAbortRefused as exc:
                errors.append(exc)

    outcome = runner.run("vm1", TARGET, PLACEMENT, make_request(post_copy=True), on_progress)
    assert actions == ["postcopy"]
    assert errors and "post-copy" in str(errors[0]) and errors[0].code == "migration_abort_refused"
    assert "abortJob" not in dom.names()
    assert outcome.status == "completed" and outcome.switched_to_postcopy


def test_abort_from_another_thread(fake_policy):
    dom = FakeDomain([job_stats(300, iteration=1)], "hang")
    gate = threading.Event()
    real_clock = FakeClock(0.0)

    def sleep(dt):
        real_clock.sleep(dt)
        gate.set()
        threading.Event().wait(0.01)

    src = FakeConn(dom)
    runner = mig.MigrationRunner(src, cfg(), clock=real_clock, sleep=sleep, connect=connector(src))
    result = {}
    t = threading.Thread(target=lambda: result.update(o=runner.run("vm1", TARGET, PLACEMENT, make_request())))
    t.start()
    assert gate.wait(10)
    runner.abort()
    t.join(10)
    assert result["o"].status == "aborted" and "aborted on request" in result["o"].reason
    with pytest.raises(NoMigrationInProgress):
        runner.abort()
    with pytest.raises(NoMigrationInProgress):
        runner.force_complete()


def test_force_complete_on_request_without_postcopy_pauses_then_resumes_on_failure(fake_policy):
    clock = FakeClock(0.0)
    dom = FakeDomain(
        [job_stats(300, iteration=1)] * 5,
        "hang",
        paused_script=[job_stats(50, iteration=2)],
        paused_end="fail",
        clock=clock,
    )
    runner = runner_for(dom, cfg(), clock=clock)
    actions = []
    phases = []

    def on_progress(p):
        phases.append(p.phase)
        if p.elapsed_s >= 1.0 and not actions:
            actions.append(runner.force_complete())

    outcome = runner.run("vm1", TARGET, PLACEMENT, make_request(auto_converge=True), on_progress)
    assert actions == ["paused"]
    assert "paused-precopy" in phases
    assert outcome.status == "failed"
    assert dom.names().count("resume") == 1
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING


def test_policy_conflict_refused_before_any_migration_call(fake_policy):
    dom = FakeDomain([job_stats(10)], "complete")
    with pytest.raises(InvalidRequest):
        runner_for(dom, cfg()).run("vm1", TARGET, PLACEMENT, make_request(post_copy=True, auto_converge=True))
    assert dom.calls == []  # not even the XML was read, no job


def test_domain_not_found_is_typed(fake_policy):
    dom = FakeDomain([], "complete")
    with pytest.raises(DomainNotFound) as ei:
        runner_for(dom, cfg()).run("nope", TARGET, PLACEMENT, make_request())
    assert ei.value.libvirt_code == libvirt.VIR_ERR_NO_DOMAIN and ei.value.code == "domain_not_found"
    with pytest.raises(DomainNotFound):
        lookup_domain(FakeConn(dom), "00000000-0000-0000-0000-000000000000")
    assert lookup_domain(FakeConn(dom), DOMAIN_UUID) is dom


def test_xml_read_failure_is_wrapped(fake_policy):
    dom = FakeDomain([], "complete")

    def boom(flags=0):
        raise FakeError("internal error: cannot format", libvirt.VIR_ERR_INTERNAL_ERROR)

    dom.XMLDesc = boom
    with pytest.raises(MigrationError) as ei:
        runner_for(dom, cfg()).run("vm1", TARGET, PLACEMENT, make_request())
    assert ei.value.libvirt_code == libvirt.VIR_ERR_INTERNAL_ERROR
    assert "cannot format" in str(ei.value)
    assert not isinstance(ei.value, libvirt.libvirtError)


def test_running_copy_on_destination_refused(fake_policy):
    dom = FakeDomain([], "complete")
    with pytest.raises(MigrationError, match="already running on dest"):
        runner_for(dom, cfg(), FakeConn(DestDomain(active=True))).run("vm1", TARGET, PLACEMENT, make_request())
    assert "migrateToURI3" not in dom.names()


def test_failure_cleans_leftover_inactive_definition(fake_policy):
    clock = FakeClock(0.0)
    dest = DestDomain(active=False)
    dest_conn = FakeConn()  # empty at start: the leftover appears during the migration
    dom = FakeDomain([job_stats(300)] * 2, "fail", clock=clock)
    real_js = dom.jobStats

    def js(flags=0):
        if len(dom.script) == 0 and dest not in dest_conn.domains:
            dest_conn.domains.append(dest)
        return real_js(flags)

    dom.jobStats = js
    outcome = runner_for(dom, cfg(), dest_conn, clock).run("vm1", TARGET, PLACEMENT, make_request())
    assert outcome.status == "failed"
    assert dest.undefined


def test_failure_keeps_preexisting_and_running_destination_domains(fake_policy):
    clock = FakeClock(0.0)
    dest = DestDomain(active=False)  # defined before the migration started: not ours to remove
    dom = FakeDomain([job_stats(300)] * 2, "fail", clock=clock)
    outcome = runner_for(dom, cfg(), FakeConn(dest), clock).run("vm1", TARGET, PLACEMENT, make_request())
    assert outcome.status == "failed" and not dest.undefined

    dest2 = DestDomain(active=False)
    conn2 = FakeConn()
    dom2 = FakeDomain([job_stats(300)] * 2, "fail", clock=FakeClock(0.0))
    real_js = dom2.jobStats

    def js(flags=0):
        if not dom2.script and dest2 not in conn2.domains:
            dest2.active = True
            conn2.domains.append(dest2)
        return real_js(flags)

    dom2.jobStats = js
    outcome = runner_for(dom2, cfg(), conn2).run("vm1", TARGET, PLACEMENT, make_request())
    assert outcome.status == "failed" and not dest2.undefined
    assert "running copy" in outcome.reason


def test_progress_callback_errors_do_not_break_the_migration(fake_policy):
    clock = FakeClock(0.0)
    dom = FakeDomain([job_stats(100)] * 3, "complete", clock=clock)

    def bad(_p):
        raise RuntimeError("listener bug")

    assert runner_for(dom, cfg(), clock=clock).run("vm1", TARGET, PLACEMENT, make_request(), bad).status == "completed"


def test_unreachable_destination_is_a_typed_connection_error(fake_policy):
    dom = FakeDomain([], "complete")
    runner = mig.MigrationRunner(FakeConn(dom), cfg(), clock=FakeClock(0.0), sleep=FakeClock(0.0).sleep)
    bad = replace(TARGET, uri="qemu+tcp://127.0.0.1:1/system")
    with pytest.raises(LibvirtConnectionError) as ei:
        runner.run("vm1", bad, PLACEMENT, make_request())
    assert ei.value.uri == bad.uri and ei.value.libvirt_code is not None
    assert "migrateToURI3" not in dom.names()


def test_open_connection_wraps_errors():
    with pytest.raises(LibvirtConnectionError) as ei:
        open_connection("bogus+nothing:///x")
    assert ei.value.libvirt_code is not None and "bogus" in str(ei.value)
    conn = open_connection("test:///default")
    try:
        assert conn.lookupByName("test").name() == "test"
    finally:
        conn.close()


def test_real_libvirt_error_from_test_driver_becomes_a_failed_outcome(fake_policy):
    """The test:///default driver cannot migrate: the libvirtError must come back as an outcome."""
    conn = open_connection("test:///default")
    try:
        runner = mig.MigrationRunner(
            conn,
            cfg(),
            clock=FakeClock(0.0),
            sleep=lambda s: threading.Event().wait(0.01),
            connect=lambda uri: open_connection(uri) if uri == conn.getURI() else FakeConn(),
        )
        request = replace(make_request(), uuid=conn.lookupByName("test").UUIDString())  # the instance's own
        outcome = runner.run("test", TARGET, PLACEMENT, request)
    finally:
        conn.close()
    assert outcome.status == "failed"
    assert "libvirt error" in outcome.reason


def test_one_run_at_a_time(fake_policy):
    dom = FakeDomain([job_stats(300)], "hang")
    gate = threading.Event()
    clock = FakeClock(0.0)

    def sleep(dt):
        clock.sleep(dt)
        gate.set()
        threading.Event().wait(0.01)

    src = FakeConn(dom)
    runner = mig.MigrationRunner(src, cfg(), clock=clock, sleep=sleep, connect=connector(src))
    t = threading.Thread(target=runner.run, args=("vm1", TARGET, PLACEMENT, make_request()))
    t.start()
    assert gate.wait(10)
    with pytest.raises(MigrationError, match="already running"):
        runner.run("vm1", TARGET, PLACEMENT, make_request())
    runner.abort()
    t.join(10)


def test_final_stats_from_the_job_completed_event(fake_policy):
    """With events, the JOB_COMPLETED statistics of the source job (real downtime) win."""
    clock = FakeClock(0.0)
    dom = FakeDomain([job_stats(100)] * 2, "complete", clock=clock)

    class EventConn(FakeConn):
        deregistered: list

        def domainEventRegisterAny(self, d, event_id, cb, opaque):
            if event_id == libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE:
                return 18
            assert event_id == libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED
            real_finish = dom._finish

            def finish(error=None):
                if error is None:
                    cb(
                        self,
                        d,
                        {
                            "downtime": 7,
                            "memory_total": 512 * MiB,
                            "time_elapsed": 1234,
                            "type": libvirt.VIR_DOMAIN_JOB_COMPLETED,
                        },
                        opaque,
                    )
                real_finish(error)

            dom._finish = finish
            return 17

        def domainEventDeregisterAny(self, cb_id):
            self.deregistered = getattr(self, "deregistered", []) + [cb_id]

    src = EventConn(dom)
    runner = mig.MigrationRunner(src, cfg(), clock=clock, sleep=clock.sleep, connect=connector(src))
    outcome = runner.run("vm1", TARGET, PLACEMENT, make_request())
    assert outcome.status == "completed"
    assert outcome.downtime_ms == 7 and outcome.final_stats["time_elapsed"] == 1234
    assert "type" not in outcome.final_stats
    assert sorted(src.deregistered) == [17, 18] and src.closed >= 1


def test_short_postcopy_phase_seen_through_the_lifecycle_event(fake_policy):
    """The switch happened and the job completed before any poll saw the post-copy state: the
    source's SUSPENDED/POSTCOPY lifecycle event is the observation (switched_to_postcopy=True)."""
    clock = FakeClock(0.0)

    class D(FakeDomain):
        def migrateStartPostCopy(self, flags=0):
            self.calls.append(("migrateStartPostCopy",))
            src.cbs[libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE](
                src, self, libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY, src.opaque
            )
            src.cbs[libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED](src, self, {"downtime": 5}, src.opaque)
            self._finish()
            return 0

    class EventConn(FakeConn):
        cbs: dict = {}

        def domainEventRegisterAny(self, d, event_id, cb, opaque):
            self.cbs[event_id], self.opaque = cb, opaque
            return 100 + event_id

        def domainEventDeregisterAny(self, cb_id):
            pass

    dom = D([job_stats(300, iteration=1)] * 3, "hang", clock=clock)
    src = EventConn(dom)
    runner = mig.MigrationRunner(src, cfg(), clock=clock, sleep=clock.sleep, connect=connector(src))
    actions = []
    outcome = runner.run(
        "vm1",
        TARGET,
        PLACEMENT,
        make_request(post_copy=True),
        lambda p: actions or actions.append(runner.force_complete()),
    )
    assert actions == ["postcopy"]
    assert outcome.status == "completed" and outcome.switched_to_postcopy
    assert outcome.reason.endswith("(post-copy)") and outcome.downtime_ms == 5


def test_postcopy_page_requests_in_final_stats_count_as_observed(fake_policy):
    clock = FakeClock(0.0)

    class D(FakeDomain):
        def migrateStartPostCopy(self, flags=0):
            self.calls.append(("migrateStartPostCopy",))
            self._finish()
            return 0

    dom = D(
        [job_stats(300, iteration=1)] * 3,
        "hang",
        clock=clock,
        completed_stats={
            "type": libvirt.VIR_DOMAIN_JOB_COMPLETED,
            "downtime": 3,
            libvirt.VIR_DOMAIN_JOB_MEMORY_POSTCOPY_REQS: 12,
        },
    )
    runner = runner_for(dom, cfg(), clock=clock)
    actions = []
    outcome = runner.run(
        "vm1",
        TARGET,
        PLACEMENT,
        make_request(post_copy=True),
        lambda p: actions or actions.append(runner.force_complete()),
    )
    assert outcome.status == "completed" and outcome.switched_to_postcopy


# --- regressions: post-copy request vs. switch, failed abort/switch, state reads, real policy ------------

NO_JOB = "Requested operation is not valid: no job is active on the domain"


class CountingDomain(FakeDomain):
    """Records every dom.state() call (FakeDomain does not, so that `calls` stays readable)."""

    def state(self, flags=0):
        self.calls.append(("state",))
        return super().state(flags)


def test_postcopy_requested_but_failed_before_the_switch_recovers_normally(fake_policy):
    """libvirt accepted migrateStartPostCopy but the job failed before switching: the guest still
    runs on the source, so this is a normal failure (leftover cleaned, not "split")."""
    clock = FakeClock(0.0)

    class D(FakeDomain):
        def migrateStartPostCopy(self, flags=0):
            self.calls.append(("migrateStartPostCopy",))
            # request accepted; the switch never happens: the job fails in pre-copy, source keeps running
            self._finish(FakeError("migration failed", libvirt.VIR_ERR_OPERATION_FAILED))
            return 0

    dom = D([job_stats(300, iteration=1)] * 3, "hang", clock=clock)
    dest = DestDomain(active=False, persistent=True)
    runner = runner_for(dom, cfg(), dest_conn=DestConn(lambda: dom.finished, dest), clock=clock)
    actions = []

    def on_progress(p):
        if not actions:
            actions.append(runner.force_complete())

    outcome = runner.run("vm1", TARGET, PLACEMENT, make_request(post_copy=True), on_progress)
    assert actions == ["postcopy"]  # the request itself was accepted
    assert outcome.status == "failed"
    assert not outcome.switched_to_postcopy
    assert "split" not in outcome.reason and "operator" not in outcome.reason
    assert dest.undefined  # the leftover inactive definition was cleaned up
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING and "resume" not in dom.names()


def test_failure_with_postcopy_failed_source_state_is_split_even_if_never_observed(fake_policy):
    """Post-copy was started by someone else (virsh migrate-postcopy) and failed between two polls:
    the source state after the failure (paused/postcopy-failed) says the memory is split: do not
    resume the source, do not touch the destination."""
    clock = FakeClock(0.0)
    dom = FakeDomain([job_stats(300, iteration=1)] * 2, "fail", clock=clock)
    real_finish = dom._finish

    def finish(error=None):
        dom.state_ = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED)
        real_finish(error)

    dom._finish = finish
    dest = DestDomain(active=False, persistent=True)
    outcome = runner_for(dom, cfg(), DestConn(lambda: dom.finished, dest), clock).run(
        "vm1", TARGET, PLACEMENT, make_request(post_copy=True)
    )
    assert outcome.status == "failed" and outcome.switched_to_postcopy
    assert "split" in outcome.reason and "operator action needed" in outcome.reason
    assert "resume" not in dom.names() and not dest.undefined


def test_completed_after_unobserved_postcopy_request_reports_no_switch(fake_policy):
    """The job completed right after the request, before any poll saw post-copy: not reported as
    switched (only observed post-copy counts), but the reason says it was requested."""
    clock = FakeClock(0.0)

    class D(FakeDomain):
        def migrateStartPostCopy(self, flags=0):
            self.calls.append(("migrateStartPostCopy",))
            self._finish()
            return 0

    dom = D([job_stats(300, iteration=1)] * 3, "hang", clock=clock)
    runner = runner_for(dom, cfg(), clock=clock)
    actions = []
    outcome = runner.run(
        "vm1",
        TARGET,
        PLACEMENT,
        make_request(post_copy=True),
        lambda p: actions or actions.append(runner.force_complete()),
    )
    assert outcome.status == "completed" and not outcome.switched_to_postcopy
    assert "post-copy requested" in outcome.reason


def test_failed_abort_does_not_disable_downtime_steps_and_timeout(fake_policy):
    """abortJob fails while the job is still active: abort() raises, nothing is marked aborted,
    downtime steps go on and the completion timeout still aborts the job."""
    clock = FakeClock(0.0)

    class D(FakeDomain):
        n = 0

        def abortJob(self):
            D.n += 1
            if D.n == 1:
                self.calls.append(("abortJob",))
                raise FakeError("internal error: transient", libvirt.VIR_ERR_INTERNAL_ERROR)
            return super().abortJob()

    dom = D([job_stats(300, iteration=1)] * 3, "hang", clock=clock)
    runner = runner_for(dom, cfg(live_migration_completion_timeout_s=5), clock=clock)
    errors = []

    def on_progress(p):
        if not errors:
            try:
                runner.abort()
            except MigrationError as exc:
                errors.append(exc)

    outcome = runner.run("vm1", TARGET, PLACEMENT, make_request(), on_progress)
    assert len(errors) == 1 and "transient" in str(errors[0])
    assert outcome.status == "aborted" and "completion timeout" in outcome.reason
    assert dom.names().count("abortJob") == 2
    assert [ms for _t, ms in dom.downtimes] == [100, 175, 250, 325, 400]  # steps went on after the failed abort
    assert 5.0 < outcome.elapsed_s < 6.5


def test_abort_before_libvirt_started_the_job_is_carried_out_once_it_runs(fake_policy):
    """abortJob fails with "no job" and jobStats says NONE before the job was ever seen active:
    the abort is kept pending and done on the first active poll (no exception, no lost abort)."""
    clock = FakeClock(0.0)

    class D(FakeDomain):
        def abortJob(self):
            if self.script and self.script[0]["type"] == libvirt.VIR_DOMAIN_JOB_NONE:  # not started yet
                self.calls.append(("abortJob",))
                raise FakeError(NO_JOB, libvirt.VIR_ERR_OPERATION_INVALID)
            return super().abortJob()

    none = {"type": libvirt.VIR_DOMAIN_JOB_NONE}
    dom = D([none, none, job_stats(300, iteration=1)], "hang", clock=clock)
    src = FakeConn(dom)
    calls = []

    def sleep(dt):
        clock.sleep(dt)
        if not calls:
            calls.append(runner.abort())

    runner = mig.MigrationRunner(src, cfg(), clock=clock, sleep=sleep, connect=connector(src))
    outcome = runner.run("vm1", TARGET, PLACEMENT, make_request())
    assert calls == [None]
    assert outcome.status == "aborted" and "aborted on request" in outcome.reason
    assert dom.names().count("abortJob") == 2


def test_abort_too_late_is_not_an_error(fake_policy):
    """abortJob fails because the job just finished (jobStats: NONE) while migrateToURI3 has not
    returned yet: abort() returns quietly and the outcome is the job's own (completed)."""
    clock = FakeClock(0.0)

    class D(FakeDomain):
        def abortJob(self):
            self.calls.append(("abortJob",))
            self.finished = True  # the job completed on its own just now
            threading.Timer(0.05, self._release.set).start()
            raise FakeError(NO_JOB, libvirt.VIR_ERR_OPERATION_INVALID)

    dom = D([job_stats(300, iteration=1)] * 3, "hang", clock=clock)
    runner = runner_for(dom, cfg(), clock=clock)
    results = []

    def on_progress(p):
        if not results:
            try:
                results.append(runner.abort())
            except MigrationError as exc:
                results.append(exc)

    outcome = runner.run("vm1", TARGET, PLACEMENT, make_request(), on_progress)
    assert results == [None]
    assert outcome.status == "completed"


@pytest.mark.parametrize("abort_failures", [0, 1])
def test_timeout_force_complete_retries_a_failed_switch_then_aborts(fake_policy, abort_failures):
    """With timeout action force_complete, a failing migrateStartPostCopy is retried on the next
    polls and after _MAX_FORCE_COMPLETE_FAILURES attempts the job is aborted (never unbounded);
    a failed abortJob then is retried too, without further switch attempts."""
    clock = FakeClock(0.0)

    class D(FakeDomain):
        aborts = 0

        def migrateStartPostCopy(self, flags=0):
            self.calls.append(("migrateStartPostCopy",))
            raise FakeError("internal error: unable to execute QEMU command 'migrate-start-postcopy'")

        def abortJob(self):
            D.aborts += 1
            if D.aborts <= abort_failures:
                self.calls.append(("abortJob",))
                raise FakeError("internal error: transient", libvirt.VIR_ERR_INTERNAL_ERROR)
            return super().abortJob()

    dom = D([job_stats(300, iteration=1)] * 3, "hang", clock=clock)
    runner = runner_for(
        dom, cfg(live_migration_completion_timeout_s=5, live_migration_timeout_action="force_complete"), clock=clock
    )
    outcome = runner.run("vm1", TARGET, PLACEMENT, make_request(post_copy=True))
    assert dom.names().count("migrateStartPostCopy") == mig._MAX_FORCE_COMPLETE_FAILURES
    assert dom.names().count("abortJob") == 1 + abort_failures
    assert outcome.status == "aborted" and not outcome.switched_to_postcopy
    assert "force-complete failed" in outcome.reason and "migrate-start-postcopy" in outcome.reason


def test_timeout_force_complete_switch_succeeds_on_retry(fake_policy):
    clock = FakeClock(0.0)

    class D(FakeDomain):
        n = 0

        def migrateStartPostCopy(self, flags=0):
            D.n += 1
            if D.n == 1:
                self.calls.append(("migrateStartPostCopy",))
                raise FakeError("internal error: busy")
            return super().migrateStartPostCopy(flags)

    dom = D([job_stats(300, iteration=1)] * 20, "hang", postcopy_script=[job_stats(50, iteration=3)], clock=clock)
    runner = runner_for(
        dom, cfg(live_migration_completion_timeout_s=2, live_migration_timeout_action="force_complete"), clock=clock
    )
    outcome = runner.run("vm1", TARGET, PLACEMENT, make_request(post_copy=True))
    assert dom.names().count("migrateStartPostCopy") == 2 and "abortJob" not in dom.names()
    assert outcome.status == "completed" and outcome.switched_to_postcopy


def test_force_complete_reports_a_failed_switch(fake_policy):
    """force_complete() must not claim "postcopy" when migrateStartPostCopy failed."""
    clock = FakeClock(0.0)

    class D(FakeDomain):
        def migrateStartPostCopy(self, flags=0):
            self.calls.append(("migrateStartPostCopy",))
            raise FakeError("internal error: unable to execute QEMU command 'migrate-start-postcopy'")

    dom = D([job_stats(300, iteration=1)] * 2, "complete", clock=clock)
    runner = runner_for(dom, cfg(), clock=clock)
    results = []

    def on_progress(p):
        if not results:
            try:
                results.append(runner.force_complete())
            except MigrationError as exc:
                results.append(exc)

    outcome = runner.run("vm1", TARGET, PLACEMENT, make_request(post_copy=True), on_progress)
    assert len(results) == 1 and isinstance(results[0], MigrationError)
    assert "post-copy failed" in str(results[0]) and "migrate-start-postcopy" in str(results[0])
    assert outcome.status == "completed" and not outcome.switched_to_postcopy


@pytest.mark.parametrize("post_copy", [None, True])
def test_one_state_read_per_poll(fake_policy, post_copy):
    clock = FakeClock(0.0)
    script = [job_stats(512 - 40 * i, iteration=1) for i in range(8)]
    dom = CountingDomain(script, "hang", postcopy_script=[job_stats(30, iteration=3)] * 3, clock=clock)
    runner = runner_for(dom, cfg(), clock=clock)
    actions = []

    def on_progress(p):
        if post_copy and p.elapsed_s >= 2.0 and not actions:
            actions.append(runner.force_complete())  # outside the poll: its own state read

    real_js = dom.jobStats

    def js(flags=0):  # end the job after 8 pre-copy (+3 post-copy) polls
        if not dom.script and (dom.mode == "precopy" or not dom.postcopy_script):
            dom._finish()
        return real_js(flags)

    dom.jobStats = js
    outcome = runner.run("vm1", TARGET, PLACEMENT, make_request(post_copy=post_copy), on_progress)
    assert outcome.status == "completed"
    active_polls = sum(1 for c in dom.calls if c == ("jobStats", 0)) - 1  # the last poll saw no job
    extra = 1 + (1 if post_copy else 0)  # run()'s initial read (+ force_complete()'s)
    assert dom.names().count("state") == active_polls + extra
    if post_copy:
        assert actions == ["postcopy"] and outcome.switched_to_postcopy


def test_policy_and_xml_functions_are_imported_at_module_level():
    from agent.libvirt_ops import domain_xml, policy
    from agent.numa import request

    assert mig.decide_policy is policy.decide_policy
    assert mig.migration_flags is policy.migration_flags
    assert mig.migration_params is policy.migration_params
    assert mig.rewrite_for_placement is domain_xml.rewrite_for_placement
    assert mig.parse_request is request.parse_request
    assert mig.MigrationPolicy is policy.MigrationPolicy


def test_outcome_final_stats_have_no_job_type(fake_policy):
    clock = FakeClock(0.0)
    ok = FakeDomain(
        [job_stats(100)] * 2,
        "complete",
        clock=clock,
        completed_stats={"type": libvirt.VIR_DOMAIN_JOB_COMPLETED, "downtime": 9},
    )
    out = runner_for(ok, cfg(), clock=clock).run("vm1", TARGET, PLACEMENT, make_request())
    assert out.status == "completed" and "type" not in out.final_stats and out.downtime_ms == 9
    bad = FakeDomain([dict(job_stats(100), downtime=30)] * 2, "fail", clock=FakeClock(0.0))
    out = runner_for(bad, cfg()).run("vm1", TARGET, PLACEMENT, make_request())
    assert out.status == "failed" and "type" not in out.final_stats
    assert out.final_stats["expected_downtime"] == 30 and "downtime" not in out.final_stats


SMALL_DOMAIN_XML = f"""<domain type='kvm'>
  <name>vm1</name>
  <uuid>{DOMAIN_UUID}</uuid>
  <memory unit='KiB'>524288</memory>
  <currentMemory unit='KiB'>524288</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
  </os>
</domain>
"""


@pytest.mark.parametrize("post_copy", [True, False])
def test_real_policy_flags_params_and_rewritten_xml_reach_migrate_to_uri3(post_copy):
    """No fakes for the policy or the rewriter: what reaches migrateToURI3 is what the real
    decide_policy / migration_flags / migration_params / rewrite_for_placement produce."""
    from agent.libvirt_ops import policy
    from agent.libvirt_ops.domain_xml import parse_domain, rewrite_for_placement

    class D(FakeDomain):
        def XMLDesc(self, flags=0):
            self.calls.append(("XMLDesc", flags))
            if flags & libvirt.VIR_DOMAIN_XML_INACTIVE:
                return SMALL_DOMAIN_XML.replace("<name>vm1</name>", "<name>vm1</name>\n  <title>inactive</title>")
            return SMALL_DOMAIN_XML

    clock = FakeClock(0.0)
    dom = D([job_stats(100)] * 2, "complete", clock=clock)
    config = cfg(
        live_migration_bandwidth_mib=250,
        live_migration_auto_converge_initial=30,
        live_migration_auto_converge_increment=5,
    )
    outcome = runner_for(dom, config, clock=clock).run(
        "vm1", TARGET, PLACEMENT, make_request(post_copy=post_copy, auto_converge=not post_copy)
    )
    assert outcome.status == "completed"
    assert isinstance(outcome.policy, policy.MigrationPolicy)
    assert (outcome.policy.post_copy, outcome.policy.auto_converge) == (post_copy, not post_copy)
    uri, params, flags = dom.migrate_args
    assert uri == TARGET.uri
    base = (
        libvirt.VIR_MIGRATE_LIVE
        | libvirt.VIR_MIGRATE_PEER2PEER
        | libvirt.VIR_MIGRATE_PERSIST_DEST
        | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    )
    extra = libvirt.VIR_MIGRATE_POSTCOPY if post_copy else libvirt.VIR_MIGRATE_AUTO_CONVERGE
    assert flags == base | extra
    live_xml = rewrite_for_placement(SMALL_DOMAIN_XML, PLACEMENT)
    assert params[libvirt.VIR_MIGRATE_PARAM_DEST_XML] == live_xml
    assert params[libvirt.VIR_MIGRATE_PARAM_PERSIST_XML] != live_xml
    assert "<title>inactive</title>" in params[libvirt.VIR_MIGRATE_PARAM_PERSIST_XML]
    for key in (libvirt.VIR_MIGRATE_PARAM_DEST_XML, libvirt.VIR_MIGRATE_PARAM_PERSIST_XML):
        assert parse_domain(params[key]).vcpu_pins == {0: frozenset({0})}  # pinned to PLACEMENT
    assert params[libvirt.VIR_MIGRATE_PARAM_URI] == TARGET.migrate_uri
    assert params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] == 250
    if post_copy:
        assert libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL not in params
    else:
        assert params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] == 30
        assert params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT] == 5


def test_ensure_event_loop_remembers_an_unavailable_loop(monkeypatch):
    from agent.libvirt_ops import connection

    calls = []

    def register():
        calls.append(1)
        raise libvirt.libvirtError("another event loop implementation is registered")

    monkeypatch.setattr(connection, "_event_loop_state", None)
    monkeypatch.setattr(libvirt, "virEventRegisterDefaultImpl", register)
    assert connection.ensure_event_loop() is False
    assert connection.ensure_event_loop() is False
    assert calls == [1]
