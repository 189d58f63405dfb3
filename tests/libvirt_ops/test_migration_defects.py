"""Regression tests for the runner defects of issue 11 (1, 2, 3, 4, 5, 8), and the honest progress
and pre-flight of the same issue. The fakes are agent.testing's; the runner helpers (cfg, connector,
make_request, runner_for, the fake_policy fixture) are test_migration_unit's."""

from __future__ import annotations

import threading
from dataclasses import replace

import libvirt
import pytest

from agent.errors import InvalidRequest
from agent.libvirt_ops import migration as mig
from agent.libvirt_ops.errors import MigrationError
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
from tests.libvirt_ops.test_migration_unit import (  # noqa: F401 - fake_policy is a fixture
    PLACEMENT,
    TARGET,
    cfg,
    connector,
    fake_policy,
    make_request,
    runner_for,
)

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("fake_policy")]


# --- defect 1: an abort while the migration is being prepared is not lost -------------------------------


def test_abort_during_xml_rewrite_cancels_the_migration():
    clock = FakeClock(0.0)

    class D(FakeDomain):
        def XMLDesc(self, flags=0):
            if not self.calls:
                runner.abort()  # from another thread in real life: the runner is in step 1
            return super().XMLDesc(flags)

    dom = D([job_stats(300)] * 3, "complete", clock=clock)
    runner = runner_for(dom, cfg(), clock=clock)
    outcome = runner.run("vm1", TARGET, PLACEMENT, make_request())
    assert outcome.status == "aborted" and "aborted on request" in outcome.reason and "not started" in outcome.reason
    assert "migrateToURI3" not in dom.names()


def test_abort_during_destination_check_cancels_the_migration():
    clock = FakeClock(0.0)
    dom = FakeDomain([job_stats(300)] * 3, "complete", clock=clock)
    src = FakeConn(dom)
    dest = FakeConn(uri=TARGET.uri)

    def connect(uri):
        if uri == TARGET.uri:
            runner.abort()
            return dest
        return src

    runner = mig.MigrationRunner(src, cfg(), clock=clock, sleep=clock.sleep, connect=connect)
    outcome = runner.run("vm1", TARGET, PLACEMENT, make_request())
    assert outcome.status == "aborted" and "migrateToURI3" not in dom.names()


# --- defect 2: never undefine the destination's definition when the source cannot be read ---------------


def test_failure_with_unreadable_source_keeps_the_destination_definition():
    clock = FakeClock(0.0)
    dom = FakeDomain([job_stats(300)] * 2, "fail", clock=clock)
    real_finish = dom._finish

    def finish(error=None):
        dom.gone = True  # the source domain cannot be read any more
        real_finish(error)

    dom._finish = finish
    dest = DestDomain(active=False, persistent=True)
    outcome = runner_for(dom, cfg(), DestConn(lambda: dom.finished, dest), clock).run(
        "vm1", TARGET, PLACEMENT, make_request()
    )
    assert outcome.status == "failed"
    assert not dest.undefined
    assert "kept the inactive definition" in outcome.reason and "cannot check the source" in outcome.reason


def test_failure_with_readable_source_still_cleans_the_leftover():
    clock = FakeClock(0.0)
    dom = FakeDomain([job_stats(300)] * 2, "fail", clock=clock)
    dest = DestDomain(active=False, persistent=True)
    outcome = runner_for(dom, cfg(), DestConn(lambda: dom.finished, dest), clock).run(
        "vm1", TARGET, PLACEMENT, make_request()
    )
    assert outcome.status == "failed" and dest.undefined


# --- defect 3: a deadline after the timeout action ------------------------------------------------------


def test_paused_precopy_that_never_completes_is_aborted_after_a_deadline():
    clock = FakeClock(0.0)
    dom = FakeDomain(
        [job_stats(64, iteration=2)] * 10,
        "hang",
        paused_script=[job_stats(60, iteration=3)],
        paused_end="hang",
        clock=clock,
    )
    config = cfg(live_migration_completion_timeout_s=2, live_migration_timeout_action="force_complete")
    outcome = runner_for(dom, config, clock=clock).run("vm1", TARGET, PLACEMENT, make_request())
    assert outcome.status == "aborted" and "deadline" in outcome.reason
    assert dom.names().count("suspend") == 1 and dom.names().count("abortJob") == 1
    assert 4.0 < outcome.elapsed_s < 6.0  # timeout 2 s (fired at 2.5 s) + as long again
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING  # paused by us: resumed


def test_guest_paused_at_start_gets_a_deadline_too():
    clock = FakeClock(0.0)
    dom = FakeDomain([job_stats(64, iteration=2)] * 3, "hang", clock=clock)
    dom.state_ = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER)
    config = cfg(live_migration_completion_timeout_s=2, live_migration_timeout_action="force_complete")
    outcome = runner_for(dom, config, clock=clock).run("vm1", TARGET, PLACEMENT, make_request())
    assert outcome.status == "aborted" and "deadline" in outcome.reason
    assert "suspend" not in dom.names() and "resume" not in dom.names()  # it was paused by its owner
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED


# --- defect 4: force_complete() after an accepted abort -------------------------------------------------


def test_force_complete_after_an_accepted_abort_is_refused():
    clock = FakeClock(0.0)

    class D(FakeDomain):
        def abortJob(self):  # accepted; the job ends on the next poll
            self.calls.append(("abortJob",))
            self.script = []
            self.end = "fail"
            return 0

    dom = D([job_stats(300)] * 5, "hang", clock=clock)
    runner = runner_for(dom, cfg(), clock=clock)
    results = []

    def on_progress(p):
        if not results:
            runner.abort()
            try:
                results.append(runner.force_complete())
            except MigrationError as exc:
                results.append(exc)

    outcome = runner.run("vm1", TARGET, PLACEMENT, make_request(), on_progress)
    assert isinstance(results[0], MigrationError) and "abort was already accepted" in str(results[0])
    assert "suspend" not in dom.names() and "migrateStartPostCopy" not in dom.names()
    assert outcome.status == "aborted"


# --- defect 5: the request must be for this instance ----------------------------------------------------


def test_request_for_another_instance_is_refused():
    dom = FakeDomain([job_stats(10)], "complete")
    other = replace(make_request(), uuid="11111111-2222-3333-4444-555555555555")
    with pytest.raises(InvalidRequest) as ei:
        runner_for(dom, cfg()).run("vm1", TARGET, PLACEMENT, other)
    assert "11111111-2222-3333-4444-555555555555" in str(ei.value) and DOMAIN_UUID in str(ei.value)
    assert "migrateToURI3" not in dom.names() and "XMLDesc" not in dom.names()


def test_request_uuid_compared_as_uuid_not_text():
    clock = FakeClock(0.0)
    dom = FakeDomain([job_stats(10)], "complete", clock=clock)
    same = replace(make_request(), uuid=DOMAIN_UUID.upper())
    assert runner_for(dom, cfg(), clock=clock).run("vm1", TARGET, PLACEMENT, same).status == "completed"


# --- defect 8: a transient jobStats failure does not stall steps and timeout ----------------------------


def test_transient_job_stats_failures_keep_steps_and_timeout_on_time():
    clock = FakeClock(0.0)

    class D(FakeDomain):
        polls = 0

        def jobStats(self, flags=0):
            if flags == 0 and not self.finished:
                D.polls += 1
                if 3 <= D.polls <= 12:  # 5 s without statistics
                    self.calls.append(("jobStats", flags))
                    raise FakeError("internal error: transient", libvirt.VIR_ERR_INTERNAL_ERROR)
            return super().jobStats(flags)

    dom = D([job_stats(300)] * 3, "hang", clock=clock)
    outcome = runner_for(dom, cfg(live_migration_completion_timeout_s=5), clock=clock).run(
        "vm1", TARGET, PLACEMENT, make_request()
    )
    assert dom.downtimes == [(0.0, 100), (1.0, 175), (2.0, 250), (3.0, 325), (4.0, 400)]
    assert outcome.status == "aborted" and "completion timeout" in outcome.reason
    assert 5.0 < outcome.elapsed_s < 6.5


# --- honest progress ------------------------------------------------------------------------------------


def test_progress_percent_never_goes_down_and_carries_a_verdict():
    clock = FakeClock(0.0)
    script = [job_stats(r, iteration=1, dirty=256) for r in (400, 200, 100)]
    script += [job_stats(r, iteration=it, dirty=256) for it, r in ((2, 150), (2, 60), (3, 120), (3, 50))]
    dom = FakeDomain(script, "complete", clock=clock)
    seen = []
    runner_for(dom, cfg(live_migration_completion_timeout_s=60), clock=clock).run(
        "vm1", TARGET, PLACEMENT, make_request(), seen.append
    )
    percents = [p.percent for p in seen]
    assert percents == sorted(percents) and percents[-1] == pytest.approx(100 * (512 - 50) / 512, abs=0.01)
    assert seen[3].memory_remaining == 150 * MiB  # the raw figure is still there
    assert all(p.dirty_rate_bps == 256 * 4096 for p in seen)
    last = seen[-1]
    assert last.transfer_rate_bps > 0 and last.verdict == "converging" and last.eta_s is not None
    assert seen[0].next_action == "downtime step to 175 ms" and seen[0].next_action_in_s == 1.0
    assert (seen[-1].next_action, seen[-1].next_action_in_s) == ("downtime step to 400 ms", 1.0)


# --- pre-flight -----------------------------------------------------------------------------------------


class DirtyRateDomain(FakeDomain):
    def startDirtyRateCalc(self, seconds, flags=0):
        self.calls.append(("startDirtyRateCalc", seconds))
        return 0


class DirtyRateConn(FakeConn):
    def __init__(self, dom, mib_s, polls_until_done=1):
        super().__init__(dom)
        self.mib_s, self.left = mib_s, polls_until_done

    def domainListGetStats(self, doms, stats_flags, flags=0):
        assert stats_flags == libvirt.VIR_DOMAIN_STATS_DIRTYRATE
        self.left -= 1
        status = libvirt.VIR_DOMAIN_DIRTYRATE_MEASURED if self.left <= 0 else libvirt.VIR_DOMAIN_DIRTYRATE_MEASURING
        return [(doms[0], {"dirtyrate.calc_status": status, "dirtyrate.megabytes_per_second": self.mib_s})]


@pytest.mark.parametrize(("bandwidth", "converges"), [(16, False), (0, True), (200, True)])
def test_preflight_measures_and_predicts(bandwidth, converges):
    clock = FakeClock(0.0)
    dom = DirtyRateDomain([job_stats(100)] * 2, "complete", clock=clock)
    src = DirtyRateConn(dom, 20, polls_until_done=3)
    config = cfg(live_migration_bandwidth_mib=bandwidth, live_migration_preflight_dirty_rate_s=2)
    runner = mig.MigrationRunner(src, config, clock=clock, sleep=clock.sleep, connect=connector(src))
    outcome = runner.run("vm1", TARGET, PLACEMENT, make_request())
    assert outcome.status == "completed"
    assert ("startDirtyRateCalc", 2) in dom.calls
    assert outcome.preflight is not None and outcome.preflight.dirty_rate_bps == 20 * MiB
    assert outcome.preflight.prediction.converges is converges
    assert dom.names().index("startDirtyRateCalc") < dom.names().index("migrateToURI3")


def test_preflight_refused_or_off_is_no_report():
    clock = FakeClock(0.0)

    class Refusing(DirtyRateDomain):
        def startDirtyRateCalc(self, seconds, flags=0):
            raise FakeError("this function is not supported by the connection driver", libvirt.VIR_ERR_NO_SUPPORT)

    dom = Refusing([job_stats(100)] * 2, "complete", clock=clock)
    src = DirtyRateConn(dom, 20)
    runner = mig.MigrationRunner(src, cfg(), clock=clock, sleep=clock.sleep, connect=connector(src))
    assert runner.run("vm1", TARGET, PLACEMENT, make_request()).preflight is None
    dom = DirtyRateDomain([job_stats(100)] * 2, "complete", clock=clock)
    src = DirtyRateConn(dom, 20)
    config = cfg(live_migration_preflight_dirty_rate_s=0)
    runner = mig.MigrationRunner(src, config, clock=clock, sleep=clock.sleep, connect=connector(src))
    assert runner.run("vm1", TARGET, PLACEMENT, make_request()).preflight is None
    assert "startDirtyRateCalc" not in dom.names()


def test_abort_from_another_thread_during_preflight_measurement():
    """The measurement is part of the preparation: an abort during it cancels the migration."""
    dom = DirtyRateDomain([job_stats(100)] * 2, "complete")
    src = DirtyRateConn(dom, 20)
    started = threading.Event()

    def sleep(dt):
        started.set()
        threading.Event().wait(0.05)

    runner = mig.MigrationRunner(src, cfg(), clock=FakeClock(0.0), sleep=sleep, connect=connector(src))
    result = {}
    t = threading.Thread(target=lambda: result.update(o=runner.run("vm1", TARGET, PLACEMENT, make_request())))
    t.start()
    assert started.wait(10)
    runner.abort()
    t.join(10)
    assert result["o"].status == "aborted" and "migrateToURI3" not in dom.names()


# --- a refused switch on a stall: bounded retries, then the timeout action decides ----------------------


def test_refused_stall_switch_is_retried_a_bounded_number_of_times_then_the_timeout_decides():
    clock = FakeClock(0.0)

    class D(FakeDomain):
        def migrateStartPostCopy(self, flags=0):
            self.calls.append(("migrateStartPostCopy",))
            raise FakeError("internal error: unable to execute QEMU command 'migrate-start-postcopy'")

    script = [job_stats(r, iteration=1) for r in (400, 300)] + [job_stats(64, iteration=2 + i // 2) for i in range(200)]
    dom = D(script, "hang", clock=clock)
    config = cfg(live_migration_postcopy_switch="on_stall", live_migration_completion_timeout_s=30)
    outcome = runner_for(dom, config, clock=clock).run("vm1", TARGET, PLACEMENT, make_request(post_copy=True))
    assert dom.names().count("migrateStartPostCopy") == mig.MAX_STALL_SWITCH_FAILURES
    assert outcome.status == "aborted" and "completion timeout" in outcome.reason
    assert 30.0 < outcome.elapsed_s < 31.5


# --- live_migration_postcopy_switch ----------------------------------------------------------------------


@pytest.mark.parametrize(("switch", "switched"), [("on_timeout", True), ("never", False), ("on_stall", False)])
def test_postcopy_switch_modes_at_the_completion_timeout_with_action_abort(switch, switched):
    """Post-copy armed, timeout action abort, pre-copy still shrinking (no stall): on_timeout switches
    at the timeout (as Nova's force-complete), never and on_stall leave it to the timeout action."""
    clock = FakeClock(0.0)
    script = [job_stats(500 - 10 * i, iteration=1) for i in range(40)]
    dom = FakeDomain(script, "hang", postcopy_script=[job_stats(50, iteration=3)], clock=clock)
    config = cfg(live_migration_completion_timeout_s=3, live_migration_postcopy_switch=switch)
    outcome = runner_for(dom, config, clock=clock).run("vm1", TARGET, PLACEMENT, make_request(post_copy=True))
    if switched:
        assert outcome.status == "completed" and outcome.switched_to_postcopy
        assert "abortJob" not in dom.names()
    else:
        assert outcome.status == "aborted" and "completion timeout" in outcome.reason
        assert "migrateStartPostCopy" not in dom.names()
