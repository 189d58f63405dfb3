"""Post-copy recovery (agent.libvirt_ops.postcopy_resume) against a fake domain whose post-copy
stream breaks: resume with VIR_MIGRATE_POSTCOPY_RESUME, retries with backoff, the window, and a
failed outcome that destroys nothing. The fakes are agent.testing's; the runner helpers (cfg,
connector, make_request, the fake_policy fixture) are test_migration_unit's."""

from __future__ import annotations

import threading

import libvirt
import pytest

from agent.libvirt_ops import migration as mig
from agent.libvirt_ops.postcopy_resume import backoff_s
from agent.testing.clock import FakeClock
from agent.testing.fake_libvirt import (
    DestConn,
    DestDomain,
    FakeConn,
    FakeDomain,
    FakeError,
    job_stats,
)
from tests.libvirt_ops.test_migration_unit import (  # noqa: F401 - fake_policy is a fixture
    PLACEMENT,
    TARGET,
    cfg,
    connector,
    fake_policy,
    make_request,
)

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("fake_policy")]

BROKEN = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED)


class BreakingDomain(FakeDomain):
    """Switches to post-copy on request; the post-copy stream then breaks (state paused /
    postcopy-failed, migrateToURI3 fails). Resume calls (VIR_MIGRATE_POSTCOPY_RESUME) fail
    `resume_failures` times (the link is still down), then the job runs post-copy again and completes."""

    def __init__(self, *a, resume_failures=0, breaks=1, **kw) -> None:
        super().__init__(*a, postcopy_script=[job_stats(100, iteration=3)] * 2, postcopy_end="fail", **kw)
        self.resume_failures, self.breaks = resume_failures, breaks
        self.resume_calls = 0
        self.resume_flags: list[int] = []

    def _finish(self, error=None):
        if error is not None and self.mode == "postcopy":
            self.breaks -= 1
            self.state_ = BROKEN
            error = FakeError("operation failed: job 'migration out' failed: migration stream broken")
        super()._finish(error)

    def migrateToURI3(self, uri, params, flags):
        if not flags & libvirt.VIR_MIGRATE_POSTCOPY_RESUME:
            return super().migrateToURI3(uri, params, flags)
        self.calls.append(("resume-migrate",))
        self.resume_flags.append(flags)
        self.resume_calls += 1
        if self.resume_calls <= self.resume_failures:
            raise FakeError("unable to connect to server at '127.0.0.3:49252': Connection refused")
        self.finished, self._error = False, None
        self._release = threading.Event()
        self.state_ = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY)
        self.postcopy_script = [job_stats(40, iteration=3), job_stats(10, iteration=3)]
        self.postcopy_end = "fail" if self.breaks > 0 else "complete"
        return super().migrateToURI3(uri, params, flags & ~libvirt.VIR_MIGRATE_POSTCOPY_RESUME)


def run_breaking(dom, clock, **kw):
    src = FakeConn(dom)
    dest = DestDomain(active=True)
    dest_conn = DestConn(lambda: dom.mode != "precopy", dest)
    config = cfg(live_migration_completion_timeout_s=2, live_migration_timeout_action="force_complete", **kw)
    runner = mig.MigrationRunner(src, config, clock=clock, sleep=clock.sleep, connect=connector(src, dest_conn))
    seen = []
    outcome = runner.run("vm1", TARGET, PLACEMENT, make_request(post_copy=True), seen.append)
    return outcome, dest, seen


def test_backoff():
    assert [backoff_s(i) for i in range(1, 9)] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 16.0, 16.0]


def test_broken_postcopy_stream_is_resumed_and_completes():
    clock = FakeClock(0.0)
    dom = BreakingDomain([job_stats(300, iteration=1)] * 10, "hang", resume_failures=2, clock=clock)
    outcome, dest, _seen = run_breaking(dom, clock)
    assert outcome.status == "completed" and outcome.switched_to_postcopy, outcome.reason
    assert dom.resume_calls == 3
    assert all(f & libvirt.VIR_MIGRATE_POSTCOPY and f & libvirt.VIR_MIGRATE_POSTCOPY_RESUME for f in dom.resume_flags)
    (rec,) = outcome.postcopy_recoveries
    assert rec.recovered and rec.attempts == 3 and rec.last_error == ""
    # attempts at +0 s, +1 s (backoff), +2 s: resumed at the first poll of the third attempt
    assert rec.resume_s == pytest.approx(3.0, abs=0.6)
    assert rec.total_s >= rec.resume_s
    assert "abortJob" not in dom.names() and "resume" not in dom.names() and not dest.undefined


def test_a_second_break_is_resumed_too():
    clock = FakeClock(0.0)
    dom = BreakingDomain([job_stats(300, iteration=1)] * 10, "hang", breaks=2, clock=clock)
    outcome, _dest, _seen = run_breaking(dom, clock)
    assert outcome.status == "completed"
    assert len(outcome.postcopy_recoveries) == 2 and all(r.recovered for r in outcome.postcopy_recoveries)


def test_break_past_the_window_fails_clearly_and_destroys_nothing():
    clock = FakeClock(0.0)
    dom = BreakingDomain([job_stats(300, iteration=1)] * 10, "hang", resume_failures=10_000, clock=clock)
    outcome, dest, _seen = run_breaking(dom, clock, live_migration_postcopy_recovery_s=20)
    assert outcome.status == "failed" and outcome.switched_to_postcopy
    (rec,) = outcome.postcopy_recoveries
    assert not rec.recovered and rec.resumed_at_s is None
    assert rec.attempts == 6  # at +0, +1, +3, +7, +15 s, and the last at the window's end (+20 s)
    assert rec.total_s == 20
    assert "Connection refused" in rec.last_error
    assert rec.source_state == "paused/postcopy-failed (3/13)" and rec.destination_state.startswith("running/")
    for text in ("split", "operator action needed", "could not be resumed", "nothing was destroyed", "paused/"):
        assert text in outcome.reason
    assert "abortJob" not in dom.names() and "resume" not in dom.names() and not dest.undefined
    assert tuple(dom.state()) == BROKEN  # left as QEMU keeps it: resumable by the operator


def test_recovery_off_reports_the_split_at_once():
    clock = FakeClock(0.0)
    dom = BreakingDomain([job_stats(300, iteration=1)] * 10, "hang", clock=clock)
    outcome, dest, _seen = run_breaking(dom, clock, live_migration_postcopy_recovery_s=0)
    assert outcome.status == "failed" and "split" in outcome.reason
    assert dom.resume_calls == 0 and outcome.postcopy_recoveries == () and not dest.undefined


def test_resume_over_a_new_connection_after_the_first_attempt():
    clock = FakeClock(0.0)
    dom = BreakingDomain([job_stats(300, iteration=1)] * 10, "hang", resume_failures=1, clock=clock)
    src = FakeConn(dom)
    opened = []

    def connect(uri):
        opened.append(uri)
        return src if uri == src.getURI() else DestConn(lambda: dom.mode != "precopy", DestDomain(active=True))

    config = cfg(live_migration_completion_timeout_s=2, live_migration_timeout_action="force_complete")
    runner = mig.MigrationRunner(src, config, clock=clock, sleep=clock.sleep, connect=connect)
    outcome = runner.run("vm1", TARGET, PLACEMENT, make_request(post_copy=True))
    assert outcome.status == "completed"
    assert opened.count(src.getURI()) == 2  # the job connection, then a new one for the second attempt
    assert src.closed >= 2


def test_abort_is_refused_while_waiting_for_the_resume():
    clock = FakeClock(0.0)
    dom = BreakingDomain([job_stats(300, iteration=1)] * 10, "hang", resume_failures=1, clock=clock)
    src = FakeConn(dom)
    config = cfg(live_migration_completion_timeout_s=2, live_migration_timeout_action="force_complete")
    errors = []

    def sleep(dt):
        clock.sleep(dt)
        if tuple(dom.state_) == BROKEN and not errors:
            try:
                runner.abort()
            except mig.MigrationAbortRefused as exc:
                errors.append(exc)

    dest_conn = DestConn(lambda: dom.mode != "precopy", DestDomain(active=True))
    runner = mig.MigrationRunner(src, config, clock=clock, sleep=sleep, connect=connector(src, dest_conn))
    outcome = runner.run("vm1", TARGET, PLACEMENT, make_request(post_copy=True))
    assert errors and outcome.status == "completed" and "abortJob" not in dom.names()


def test_no_more_attempts_once_the_destination_guest_is_gone():
    clock = FakeClock(0.0)
    dom = BreakingDomain([job_stats(300, iteration=1)] * 10, "hang", resume_failures=10_000, clock=clock)
    src = FakeConn(dom)
    dest = DestDomain(active=False)  # its QEMU died: shut off
    config = cfg(live_migration_completion_timeout_s=2, live_migration_timeout_action="force_complete")
    dest_conn = DestConn(lambda: dom.mode != "precopy", dest)
    runner = mig.MigrationRunner(src, config, clock=clock, sleep=clock.sleep, connect=connector(src, dest_conn))
    outcome = runner.run("vm1", TARGET, PLACEMENT, make_request(post_copy=True))
    (rec,) = outcome.postcopy_recoveries
    assert rec.attempts == 1 and not rec.recovered and rec.destination_state.startswith("shut off/")
    assert outcome.status == "failed" and not dest.undefined and "resume" not in dom.names()
