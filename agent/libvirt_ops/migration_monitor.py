"""The migration monitor: poll -> observe -> act, until the job ends (as KubeVirt's
``live-migration-source.go``: the loop only collects and delegates).

Each poll makes one ``jobStats()`` and one ``state()`` call (``poll``), feeds the pure rules of
``convergence`` (``observe``: watermark, transfer rate, stall detector), then decides with small
named predicates what to do (``act``: a pending abort, the downtime step, the completion timeout,
the deadline after the timeout action, the switch to post-copy on a stall) and reports progress.

A ``jobStats()`` that fails while the job runs is a missed sample, not the end of the job: the
time-driven acts (downtime steps, timeout, deadline) go on with the last good sample. Only jobStats
saying "no job" after the job was seen active means it ended (then migrateToURI3 returns shortly).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import libvirt

from agent.libvirt_ops.convergence import (
    MigrationProgress,
    PostcopySwitch,
    Situation,
    StallDetector,
    TransferRate,
    Watermark,
    dirty_rate_bps,
    downtime_for,
    judge,
    progress_from_stats,
    with_verdict,
)
from agent.libvirt_ops.errors import MigrationError, libvirt_error_details
from agent.libvirt_ops.migration_job import MAX_STALL_SWITCH_FAILURES, JobControls, MigrationJob, PostCopyPhase

# how long (real seconds) to wait for migrateToURI3 to return once the job is seen finished
FINISH_WAIT_S = 30.0
ACTIVE_JOB_TYPES = (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED)


@dataclass(frozen=True, slots=True)
class MonitorPlan:
    """What the monitor enforces, fixed before the job starts."""

    steps: tuple[tuple[float, int], ...]  # downtime schedule (downtime_steps)
    timeout_s: float | None  # completion timeout (completion_timeout_s)
    timeout_action: str  # "abort" | "force_complete"
    postcopy_switch: PostcopySwitch
    interval_s: float  # poll interval
    stall_window_s: float  # no new low of remaining memory for this long (StallDetector)

    @property
    def deadline_after_action_s(self) -> float | None:
        """After the timeout action (guest paused by force-complete, or paused at start) the job gets
        as long again as the completion timeout: a guest that dirties nothing and still does not
        finish in that time is stuck, so it is aborted."""
        return self.timeout_s


@dataclass(frozen=True, slots=True)
class Sample:
    """One poll: jobStats (None when the call failed), the domain state, seconds since start."""

    stats: dict[str, Any] | None
    state: tuple[int, int] | None
    elapsed: float

    @property
    def active(self) -> bool:
        return self.stats is not None and self.stats.get("type") in ACTIVE_JOB_TYPES

    @property
    def failed(self) -> bool:
        return self.stats is None


@dataclass
class MonitorResult:
    last_stats: dict[str, Any] = field(default_factory=dict)
    max_throttle: int = 0
    downtime_ms: int | None = None
    watermark: Watermark = field(default_factory=Watermark)
    rate: TransferRate = field(default_factory=TransferRate)


class MigrationMonitor:
    def __init__(
        self,
        job: MigrationJob,
        controls: JobControls,
        lock: threading.RLock,
        plan: MonitorPlan,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
        log: logging.Logger,
        on_progress: Callable[[MigrationProgress], None] | None = None,
        on_sample: Callable[[Sample], None] | None = None,
    ) -> None:
        self._job, self._c, self._lock, self._plan = job, controls, lock, plan
        self._clock, self._sleep, self._log = clock, sleep, log
        self._on_progress = on_progress
        self._on_sample = on_sample  # sees every poll (the post-copy resume watches the state)
        self._stall = StallDetector(plan.stall_window_s)
        self.result = MonitorResult()

    def run(self, start: float) -> MonitorResult:
        job = self._job
        while not job.done.is_set():
            sample = self._poll(start)
            if self._on_sample is not None:
                self._on_sample(sample)
            if self._job_over(sample):
                job.done.wait(FINISH_WAIT_S)  # the job is over on the source: migrateToURI3 returns shortly
                break
            if sample.active or (sample.failed and job.seen_active):
                self._observe(sample)
                self._act_locked(sample)
            if job.done.is_set():
                break
            self._pause()
        return self.result

    # -- poll ------------------------------------------------------------------------------------

    def _poll(self, start: float) -> Sample:
        stats = self._job_stats()
        elapsed = self._clock() - start
        state = self._c.read_state(self._job) if stats is None or self._active(stats) else None
        return Sample(stats=stats, state=state, elapsed=elapsed)

    @staticmethod
    def _active(stats: dict[str, Any]) -> bool:
        return stats.get("type") in ACTIVE_JOB_TYPES

    def _job_stats(self) -> dict[str, Any] | None:
        try:
            return self._job.dom.jobStats(0)
        except libvirt.libvirtError as exc:
            code, message = libvirt_error_details(exc)
            self._log.debug("migration %s: jobStats failed: %s (libvirt error %s)", self._job.name, message, code)
            return None

    def _pause(self) -> None:
        if self._sleep is time.sleep:
            self._job.done.wait(self._plan.interval_s)  # same pacing, but notices the end of the job at once
        else:
            self._sleep(self._plan.interval_s)

    # -- observe ---------------------------------------------------------------------------------

    def _observe(self, sample: Sample) -> None:
        if not sample.active or sample.stats is None:
            return
        stats, r = sample.stats, self.result
        r.last_stats = dict(stats)
        r.max_throttle = max(r.max_throttle, int(stats.get("auto_converge_throttle", 0) or 0))
        total, remaining = int(stats.get("memory_total", 0) or 0), int(stats.get("memory_remaining", 0) or 0)
        if "memory_remaining" in stats:  # without it there is no watermark to keep
            r.watermark = r.watermark.observe(total, remaining)
        r.rate = r.rate.observe(sample.elapsed, int(stats.get("memory_processed", 0) or 0))
        self._stall.observe(sample.elapsed, int(stats.get("memory_iteration", 0) or 0), remaining)

    # -- predicates ------------------------------------------------------------------------------

    def _job_over(self, sample: Sample) -> bool:
        return not sample.failed and not sample.active and self._job.seen_active

    def _pending_abort_due(self) -> bool:
        job = self._job
        return bool(job.abort_pending) and not job.postcopy and not job.abort_requested

    def _tunable(self) -> bool:
        """Pre-copy that nobody is aborting: downtime steps, timeout and switches apply."""
        return not self._job.postcopy and not self._job.abort_requested

    def _timeout_due(self, elapsed: float) -> bool:
        timeout = self._plan.timeout_s
        return timeout is not None and elapsed > timeout and not self._job.timeout_fired

    def _deadline_after_action_passed(self, elapsed: float) -> bool:
        grace, fired_at = self._plan.deadline_after_action_s, self._job.timeout_fired_at
        return self._job.timeout_fired and grace is not None and fired_at is not None and elapsed > fired_at + grace

    def _stall_switch_due(self) -> bool:
        job = self._job
        armed = job.policy.post_copy and self._plan.postcopy_switch == "on_stall"
        return armed and self._stall.stalled and job.switch_failures < MAX_STALL_SWITCH_FAILURES

    # -- act -------------------------------------------------------------------------------------

    def _act_locked(self, sample: Sample) -> None:
        with self._lock:
            if sample.active:
                self._job.seen_active = True
            self._c.note_postcopy(self._job, sample.state)
            if self._pending_abort_due():
                self._carry_out_pending_abort()
            if self._tunable():
                self._tune(sample)
            phase = self._c.phase(self._job, sample.state)
        if sample.active and self._on_progress is not None:
            self._report(sample, phase)

    def _carry_out_pending_abort(self) -> None:
        job = self._job
        reason, job.abort_pending = job.abort_pending, ""
        try:
            self._c.abort(job, reason)
        except MigrationError as exc:
            self._log.error("migration %s: %s", job.name, exc)

    def _tune(self, sample: Sample) -> None:
        r, elapsed = self.result, sample.elapsed
        r.downtime_ms = self._c.step_downtime(
            self._job, downtime_for(list(self._plan.steps), elapsed), r.downtime_ms, elapsed
        )
        try:
            if self._timeout_due(elapsed):
                self._on_timeout(sample)
            elif self._deadline_after_action_passed(elapsed):
                self._abort_after_action(elapsed)
            elif self._stall_switch_due():
                self._log.info("migration %s: %s", self._job.name, self._stall.why)
                self._c.switch_to_postcopy(self._job, "not converging")  # retried next poll if it fails
        except MigrationError as exc:  # keep monitoring: the job is still running
            self._log.error("migration %s: %s", self._job.name, exc)

    def _timeout_action_name(self) -> str:
        """With post-copy armed and switch "on_timeout", the timeout switches to post-copy (a
        force-complete), whose refusals fall back to aborting after a bounded number of tries."""
        if self._job.policy.post_copy and self._plan.postcopy_switch == "on_timeout":
            return "force_complete"
        return self._plan.timeout_action

    def _on_timeout(self, sample: Sample) -> None:
        job, timeout = self._job, self._plan.timeout_s or 0.0
        # False (or MigrationError): not carried out, retried on the next poll
        if self._c.timeout_action(job, timeout, sample.elapsed, sample.state, self._timeout_action_name()):
            job.timeout_fired, job.timeout_fired_at = True, sample.elapsed

    def _abort_after_action(self, elapsed: float) -> None:
        grace = self._plan.deadline_after_action_s or 0.0
        self._c.abort(
            self._job,
            f"deadline: not completed {grace:.0f}s after the completion timeout action "
            f"({self._timeout_action_name()}, at {self._job.timeout_fired_at:.0f}s)",
        )

    # -- report ----------------------------------------------------------------------------------

    def _report(self, sample: Sample, phase: Any) -> None:
        assert sample.stats is not None and self._on_progress is not None
        r = self.result
        progress = progress_from_stats(
            sample.stats, phase=phase, max_downtime_ms=r.downtime_ms or 0, elapsed_s=sample.elapsed
        )
        verdict = judge(self._situation(sample, progress))
        progress = with_verdict(progress, verdict, max(r.watermark.percent, progress.percent), r.rate.bps)
        try:
            self._on_progress(progress)
        except Exception:  # noqa: BLE001 - a broken listener must not break the migration
            self._log.exception("migration %s: progress callback failed", self._job.name)

    def _situation(self, sample: Sample, progress: MigrationProgress) -> Situation:
        assert sample.stats is not None
        return Situation(
            phase=progress.phase,
            elapsed_s=sample.elapsed,
            remaining=progress.memory_remaining,
            transfer_bps=self.result.rate.bps,
            dirty_bps=float(dirty_rate_bps(sample.stats)),
            stalled=self._stall.stalled or self._stall.tracker.stalled,
            postcopy_armed=bool(self._job.policy.post_copy),
            postcopy_switch=self._plan.postcopy_switch,
            timeout_s=self._plan.timeout_s,
            timeout_action=self._plan.timeout_action,
            timeout_fired=self._job.timeout_fired,
            steps=self._plan.steps,
            postcopy_paused=self._job.postcopy_phase is PostCopyPhase.PAUSED,
        )
