"""Post-copy recovery: when the migration stream breaks during post-copy, QEMU pauses both sides
(``postcopy-paused``) instead of losing the guest; libvirt (>= 8.5) reports the source domain
PAUSED / POSTCOPY_FAILED and the migrateToURI3 call fails. Nothing is destroyed: the job is resumed
with ``VIR_MIGRATE_POSTCOPY_RESUME`` (same flags and parameters as the original call) over the same
connection first, then over new ones, with backoff, within ``live_migration_postcopy_recovery_s``.
Only then is the migration declared failed, with the guest state on each side in the report.

Limits (libvirt 9.0 / QEMU 7.2): an attempt that is still connecting when the window closes runs
to its end -- QEMU cannot cancel a resume before it is connected (migrate-pause needs
postcopy-active) and libvirt sets no timeout, so the outcome may come up to a TCP connect timeout
(about 2 min with tcp_syn_retries=6) after the window. Retrying stops early when the destination's
guest is gone (its QEMU died): no resume can work then.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import libvirt

from agent.errors import AgentError
from agent.libvirt_ops.connection import close_quietly
from agent.libvirt_ops.errors import libvirt_error_details
from agent.libvirt_ops.migration_job import (
    POSTCOPY_FAILED_STATES,
    POSTCOPY_RUNNING_STATES,
    MigrationJob,
    PostCopyPhase,
    read_state,
)
from agent.libvirt_ops.migration_monitor import Sample

# first wait between resume attempts, doubled after each failure up to the cap (a broken link
# usually comes back within seconds; the cap keeps a long outage from being retried only rarely)
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 16.0


def backoff_s(attempt: int) -> float:
    """Wait before resume attempt `attempt` (1-based): 0, 1, 2, 4, 8, 16, 16, ... s."""
    if attempt <= 1:
        return 0.0
    return min(BACKOFF_FIRST_S * 2 ** (attempt - 2), BACKOFF_MAX_S)


@dataclass(frozen=True, slots=True)
class PostcopyRecovery:
    """One broken post-copy stream and what became of it (seconds since the migration started)."""

    broke_at_s: float  # the failed migrateToURI3 returned
    resumed_at_s: float | None  # the source ran post-copy again (None: never)
    ended_at_s: float
    attempts: int
    recovered: bool  # post-copy ran again (it may have completed or broken anew: another report then)
    last_error: str
    source_state: str  # "state/reason" of each side at the end, "unknown: <why>" when unreadable
    destination_state: str

    @property
    def resume_s(self) -> float | None:
        return None if self.resumed_at_s is None else round(self.resumed_at_s - self.broke_at_s, 3)

    @property
    def total_s(self) -> float:
        return round(self.ended_at_s - self.broke_at_s, 3)

    def summary(self) -> str:
        if self.recovered:
            return f"post-copy stream broke at {self.broke_at_s:.1f}s, resumed after {self.resume_s} s"
        return (
            f"post-copy stream broke at {self.broke_at_s:.1f}s and could not be resumed in {self.total_s:.0f} s "
            f"({self.attempts} attempts, last error: {self.last_error}); guest on the source: {self.source_state}, "
            f"on the destination: {self.destination_state}; nothing was destroyed"
        )


def broken_in_postcopy(job: MigrationJob, state: tuple[int, int] | None) -> bool:
    """The job failed with the stream broken in post-copy (resumable)."""
    return job.error is not None and (job.postcopy_phase is PostCopyPhase.PAUSED or state in POSTCOPY_FAILED_STATES)


class PostcopyResumer:
    """Drives the resume attempts. `attempt(dom, on_sample)` runs one migrateToURI3 with the
    RESUME flag on `dom` under the monitor and returns when it ended (error in `job.error`)."""

    def __init__(
        self,
        job: MigrationJob,
        *,
        window_s: float,
        source_uri: str,
        dest_uri: str,
        attempt: Callable[[Any, Callable[[Sample], None]], None],
        connect: Callable[[str], Any],
        clock: Callable[[], float],
        sleep: Callable[[float], None],
        log: logging.Logger,
        start: float,
    ) -> None:
        self._job, self._window_s = job, window_s
        self._source_uri, self._dest_uri = source_uri, dest_uri
        self._attempt, self._connect = attempt, connect
        self._clock, self._sleep, self._log, self._start = clock, sleep, log, start
        self._resumed_at: float | None = None
        self._window_end = float("inf")  # seconds since start; set when a break is seen
        self._late_warned = False

    def run(self, job_dom: Any) -> list[PostcopyRecovery]:
        reports: list[PostcopyRecovery] = []
        while self._window_s > 0 and self._job.error is not None and self._broken():
            report = self._recover(job_dom)
            reports.append(report)
            if not report.recovered:
                break
        return reports

    def _broken(self) -> bool:
        return broken_in_postcopy(self._job, read_state(self._job.dom)[0])

    def _now(self) -> float:
        return self._clock() - self._start

    def _recover(self, job_dom: Any) -> PostcopyRecovery:
        job, broke_at = self._job, self._now()
        job.postcopy_phase = PostCopyPhase.PAUSED
        first_error = _detail(job.error)
        self._log.error(
            "migration %s: the post-copy stream broke (%s); both sides wait paused: resuming within %.0f s",
            job.name,
            first_error,
            self._window_s,
        )
        self._resumed_at, attempts = None, 0
        self._window_end, self._late_warned = broke_at + self._window_s, False
        while (wait := self._wait_before_next(broke_at, attempts)) is not None:
            attempts += 1
            self._sleep(wait)
            self._try_once(job_dom if attempts == 1 else None, attempts)
            if job.error is None or self._resumed_at is not None:  # completed, or resumed and broke again
                return self._report(broke_at, attempts, recovered=True, last_error="")
            if not self._broken() or self._destination_lost():
                break  # no longer resumable: nothing more to do here
        return self._report(broke_at, attempts, recovered=False, last_error=_detail(job.error) or first_error)

    def _wait_before_next(self, broke_at: float, attempts: int) -> float | None:
        """Seconds to wait before the next attempt, None once the window is over (the backoff is
        cut short so that the last attempt is made at the window's end)."""
        if attempts == 0:
            return 0.0
        left = broke_at + self._window_s - self._now()
        return None if left <= 0 else min(backoff_s(attempts + 1), left)

    def _try_once(self, job_dom: Any, attempt: int) -> None:
        """One resume attempt: over the job connection first, then over a new connection each time
        (the old one may have died with the stream)."""
        self._log.warning("migration %s: post-copy resume attempt %d", self._job.name, attempt)
        if job_dom is not None:
            self._attempt(job_dom, self._on_sample)
            return
        try:
            conn = self._connect(self._source_uri)
        except AgentError as exc:
            self._job.error = exc
            return
        try:
            self._attempt(conn.lookupByUUIDString(self._job.uuid), self._on_sample)
        except libvirt.libvirtError as exc:
            self._job.error = exc
        finally:
            close_quietly(conn)

    def _on_sample(self, sample: Sample) -> None:
        if self._resumed_at is None and sample.state in POSTCOPY_RUNNING_STATES:
            self._resumed_at = self._now()
            self._log.info("migration %s: post-copy resumed after the break", self._job.name)
        elif self._resumed_at is None and self._now() > self._window_end and not self._late_warned:
            self._late_warned = True
            self._log.warning(
                "migration %s: the post-copy recovery window is over while a resume attempt is still "
                "connecting; QEMU cannot cancel it (migrate-pause needs postcopy-active): waiting for it",
                self._job.name,
            )

    def _destination_lost(self) -> bool:
        """The destination's QEMU is gone (shut off, crashed, undefined): no resume can work."""
        try:
            conn = self._connect(self._dest_uri)
        except AgentError:
            return False  # unreachable is not lost: the link may come back
        try:
            state, _message = read_state(conn.lookupByUUIDString(self._job.uuid))
        except libvirt.libvirtError as exc:
            return exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
        finally:
            close_quietly(conn)
        lost = state is not None and state[0] in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED)
        if lost:
            self._log.error("migration %s: the destination's guest is gone (%s): no resume", self._job.name, state)
        return lost

    def _report(self, broke_at: float, attempts: int, *, recovered: bool, last_error: str) -> PostcopyRecovery:
        resumed_at = self._resumed_at
        if recovered and resumed_at is None:
            resumed_at = self._now()  # completed faster than a poll: resumed at the latest by now
        report = PostcopyRecovery(
            broke_at_s=round(broke_at, 3),
            resumed_at_s=None if resumed_at is None else round(resumed_at, 3),
            ended_at_s=round(self._now(), 3),
            attempts=attempts,
            recovered=recovered,
            last_error=last_error,
            source_state=_state_text(read_state(self._job.dom)),
            destination_state=self._destination_state(),
        )
        log = self._log.info if recovered else self._log.error
        log("migration %s: post-copy recovery: %s", self._job.name, report)
        return report

    def _destination_state(self) -> str:
        try:
            conn = self._connect(self._dest_uri)
        except AgentError as exc:
            return f"unknown: {exc}"
        try:
            return _state_text(read_state(conn.lookupByUUIDString(self._job.uuid)))
        except libvirt.libvirtError as exc:
            return f"unknown: {libvirt_error_details(exc)[1]}"
        finally:
            close_quietly(conn)


def _state_text(read: tuple[tuple[int, int] | None, str]) -> str:
    """E.g. "paused/postcopy-failed (3/13)"."""
    state, message = read
    if state is None:
        return f"unknown: {message}"
    name = _STATE_NAMES.get(state[0], "state")
    reason = _REASON_NAMES.get(state, "reason")
    return f"{name}/{reason} ({state[0]}/{state[1]})"


def _detail(error: BaseException | None) -> str:
    return "" if error is None else libvirt_error_details(error)[1]


_REASON_NAMES = {
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY): "postcopy",
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED): "postcopy-failed",
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_MIGRATION): "migration",
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER): "user",
    (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY): "postcopy",
    (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY_FAILED): "postcopy-failed",
    (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_MIGRATED): "migrated",
    (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED): "booted",
}
_STATE_NAMES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
}
