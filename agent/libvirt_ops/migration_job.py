"""The state of one running migration job and the actions taken on it (abort, force-complete,
switch to post-copy, downtime steps, the completion-timeout action).

``JobControls`` is shared by the runner (``abort()`` / ``force_complete()`` from another thread) and
the monitor (its acts); its methods are called with the runner's lock held.

Post-copy is one ``PostCopyPhase``: NONE -> REQUESTED (migrateStartPostCopy accepted; libvirt
switches at the next iteration) -> RUNNING (the switch observed: domain state, lifecycle event or
page requests) -> PAUSED (the stream broke in post-copy: QEMU paused both sides, recoverable with
VIR_MIGRATE_POSTCOPY_RESUME). Abort is refused from REQUESTED on.
"""

from __future__ import annotations

import enum
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import libvirt

from agent.libvirt_ops.convergence import Phase
from agent.libvirt_ops.errors import MigrationError, libvirt_error_details

# a failed force-complete (switch to post-copy / pause) at the completion timeout is retried on the
# next polls; after this many failures the timeout falls back to aborting the job
MAX_FORCE_COMPLETE_FAILURES = 3
# a switch to post-copy on a stall that libvirt refuses is retried on the next polls this many times
# in all; then the stall trigger gives up and the completion timeout (its action) decides
MAX_STALL_SWITCH_FAILURES = 3

# (state, reason) pairs of a domain whose migration is in post-copy; libvirt accepts
# migrateStartPostCopy at once but switches at the next iteration: only these states (or observing
# one while the job ran) mean that the switch really happened.
POSTCOPY_RUNNING_STATES = frozenset(
    (
        (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY),
        (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY),
    )
)
# ... and those whose post-copy stream broke: QEMU paused the migration (postcopy-paused), the
# guest's memory is split between the hosts until VIR_MIGRATE_POSTCOPY_RESUME succeeds
POSTCOPY_FAILED_STATES = frozenset(
    (
        (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED),
        (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY_FAILED),
    )
)

UNREAD: Any = object()  # "the caller did not read the domain state"


class ForceCompleteAction(str, enum.Enum):
    """What force_complete() did (a str: "postcopy" == ForceCompleteAction.POSTCOPY)."""

    POSTCOPY = "postcopy"  # the switch to post-copy was requested
    PAUSED = "paused"  # the guest was paused so that pre-copy completes
    ALREADY_POSTCOPY = "already-postcopy"  # nothing done: post-copy requested or running already
    ALREADY_PAUSED = "already-paused"  # nothing done: the guest was paused already (pre-copy completes)


class PostCopyPhase(enum.Enum):
    NONE = "none"
    REQUESTED = "requested"  # migrateStartPostCopy accepted, the switch not observed yet
    RUNNING = "running"  # the switch observed: the guest runs on the destination
    PAUSED = "paused"  # the post-copy stream broke: both sides paused, resumable


@dataclass
class MigrationJob:
    dom: Any
    name: str
    uuid: str
    policy: Any
    domain_paused_at_start: bool
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    postcopy_phase: PostCopyPhase = PostCopyPhase.NONE
    paused_by_us: bool = False
    seen_active: bool = False  # the monitor has seen libvirt's job active
    abort_requested: bool = False  # set only once abortJob() succeeded
    abort_reason: str = ""
    abort_pending: str = ""  # abort() came before libvirt started the job: abort on the first active poll
    timeout_fired: bool = False  # the completion-timeout action was carried out
    timeout_fired_at: float | None = None  # elapsed seconds when it was
    force_failures: int = 0  # failed force-complete attempts at the completion timeout
    switch_failures: int = 0  # refused migrateStartPostCopy calls
    last_switch_error: str = ""  # libvirt's message for the last failed migrateStartPostCopy
    last_force_error: str = ""
    # final statistics delivered by the JOB_COMPLETED event on the job connection
    event_stats: dict[str, Any] | None = None
    event_seen: threading.Event = field(default_factory=threading.Event)
    event_registered: bool = False
    # followed after the agent's restart (MigrationRunner.attach): no migrateToURI3 call of ours
    # returns at its end, so the end seen (no job, JOB_COMPLETED, the domain stopped) sets `done`
    attached: bool = False

    @property
    def postcopy(self) -> bool:
        """Post-copy requested or running: abort is refused and no pre-copy tuning is done."""
        return self.postcopy_phase is not PostCopyPhase.NONE

    @property
    def in_postcopy(self) -> bool:
        """The switch to post-copy really happened (observed), not merely requested."""
        return self.postcopy_phase in (PostCopyPhase.RUNNING, PostCopyPhase.PAUSED)

    @property
    def postcopy_requested(self) -> bool:
        return self.postcopy_phase is PostCopyPhase.REQUESTED

    def mark_postcopy_running(self) -> None:
        """The switch was observed (one-way: a PAUSED job stays paused until resumed)."""
        if self.postcopy_phase in (PostCopyPhase.NONE, PostCopyPhase.REQUESTED):
            self.postcopy_phase = PostCopyPhase.RUNNING


def postcopy_phase_of_state(state: tuple[int, int] | None) -> PostCopyPhase | None:
    """The post-copy phase a domain (state, reason) proves, None when it proves none."""
    if state in POSTCOPY_FAILED_STATES:
        return PostCopyPhase.PAUSED
    if state in POSTCOPY_RUNNING_STATES:
        return PostCopyPhase.RUNNING
    return None


def read_state(dom: Any) -> tuple[tuple[int, int] | None, str]:
    """A domain's (state, reason), or (None, libvirt's message) when it cannot be read."""
    try:
        state, reason = dom.state()
    except libvirt.libvirtError as exc:
        _code, message = libvirt_error_details(exc)
        return None, message
    return (int(state), int(reason)), ""


class JobControls:
    """Actions on the running job (call with the runner's lock held)."""

    def __init__(self, cfg: Any, log: logging.Logger) -> None:
        self._cfg = cfg
        self._log = log

    # -- observing -------------------------------------------------------------------------------

    def read_state(self, job: MigrationJob) -> tuple[int, int] | None:
        """The domain's (state, reason), None when it cannot be read."""
        state, message = read_state(job.dom)
        if state is None:
            self._log.debug("migration %s: reading the domain state failed: %s", job.name, message)
        return state

    def note_postcopy(self, job: MigrationJob, state: tuple[int, int] | None) -> None:
        """Learn from the domain state whether the job is in post-copy (also when someone else
        switched it, e.g. `virsh migrate-postcopy`): jobStats has no phase before libvirt 10."""
        seen = postcopy_phase_of_state(state)
        if seen is None or seen is job.postcopy_phase or state is None:
            return
        self._log.info(
            "migration %s: the job is in post-copy (%s; domain state %s/%s)%s",
            job.name,
            seen.value,
            state[0],
            state[1],
            "" if job.postcopy else ", switched by someone else",
        )
        job.postcopy_phase = seen

    def phase(self, job: MigrationJob, state: tuple[int, int] | None) -> Phase:
        if job.in_postcopy:
            return "postcopy"
        if job.paused_by_us or (state is not None and state[0] == libvirt.VIR_DOMAIN_PAUSED):
            return "paused-precopy"
        return "precopy"

    def no_job(self, job: MigrationJob) -> bool:
        """True when libvirt has no job on the domain (jobStats type NONE, or the domain is gone)."""
        try:
            stats = job.dom.jobStats(0)
        except libvirt.libvirtError as exc:
            return exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
        return not stats or stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE

    # -- acting ----------------------------------------------------------------------------------

    def step_downtime(self, job: MigrationJob, wanted: int | None, current: int | None, elapsed: float) -> int | None:
        """Set the max downtime to `wanted` when it changed; returns the value now in force."""
        if wanted is None or wanted == current:
            return current
        self._log.info("migration %s: max downtime -> %d ms after %.1f s", job.name, wanted, elapsed)
        try:
            job.dom.migrateSetMaxDowntime(wanted, 0)
        except libvirt.libvirtError as exc:
            _code, message = libvirt_error_details(exc)
            self._log.warning("migration %s: could not set max downtime %d ms: %s", job.name, wanted, message)
        return wanted

    def abort(self, job: MigrationJob, reason: str) -> None:
        """abortJob(). `abort_requested` is set only once it succeeded. When it fails because
        libvirt has no job: returns quietly if the job already ended ("too late"), or arms
        `abort_pending` if the job was not seen active yet (the monitor aborts it on its first
        active poll). Any other failure raises MigrationError and changes nothing."""
        self._log.warning("migration %s: aborting the job (%s)", job.name, reason)
        try:
            job.dom.abortJob()
        except libvirt.libvirtError as exc:
            if not (job.done.is_set() or self.no_job(job)):
                raise MigrationError.from_libvirt(f"aborting the migration of {job.name}", exc) from None
            self._abort_without_job(job, reason)
            return
        job.abort_requested = True
        job.abort_reason = reason
        job.abort_pending = ""

    def _abort_without_job(self, job: MigrationJob, reason: str) -> None:
        if job.done.is_set() or job.seen_active:
            self._log.info("migration %s: abort came too late, the job had ended", job.name)
            return
        self._log.info("migration %s: the job has not started yet; it will be aborted as soon as it runs", job.name)
        job.abort_pending = reason

    def switch_to_postcopy(self, job: MigrationJob, why: str) -> bool:
        """migrateStartPostCopy; True when libvirt accepted the request (it switches at the next
        iteration). False on failure (logged, message in `job.last_switch_error`)."""
        self._log.warning("migration %s: switching to post-copy (%s)", job.name, why)
        try:
            job.dom.migrateStartPostCopy(0)
        except libvirt.libvirtError as exc:
            _code, message = libvirt_error_details(exc)
            job.last_switch_error = message
            job.switch_failures += 1
            self._log.warning("migration %s: switch to post-copy failed: %s", job.name, message)
            return False
        if job.postcopy_phase is PostCopyPhase.NONE:  # the lifecycle event may have said RUNNING already
            job.postcopy_phase = PostCopyPhase.REQUESTED
        return True

    def force_complete(self, job: MigrationJob, why: str, state: Any = UNREAD) -> ForceCompleteAction:
        """Switch to post-copy (policy armed it) or pause the guest. `state`: the domain state the
        caller just read, if any. Raises MigrationError when the action failed or an abort was
        already accepted (pausing a guest whose migration is being cancelled helps nobody)."""
        if job.abort_requested:
            raise MigrationError(f"force-complete of {job.name} refused: its abort was already accepted")
        if state is UNREAD:
            state = self.read_state(job)
        self.note_postcopy(job, state)
        if job.postcopy:
            self._log.info("migration %s: force-complete (%s): already in post-copy", job.name, why)
            return ForceCompleteAction.ALREADY_POSTCOPY
        if job.policy.post_copy:
            if self.switch_to_postcopy(job, why):
                return ForceCompleteAction.POSTCOPY
            raise MigrationError(f"switching the migration of {job.name} to post-copy failed: {job.last_switch_error}")
        return self._pause(job, why, state)

    def _pause(self, job: MigrationJob, why: str, state: tuple[int, int] | None) -> ForceCompleteAction:
        if state is None:
            try:
                state = tuple(job.dom.state())
            except libvirt.libvirtError as exc:
                raise MigrationError.from_libvirt(f"reading the state of {job.name}", exc) from None
        if state[0] == libvirt.VIR_DOMAIN_PAUSED:
            self._log.info("migration %s: force-complete (%s): guest already paused", job.name, why)
            return ForceCompleteAction.ALREADY_PAUSED
        self._log.warning(
            "migration %s: force-complete (%s): post-copy not armed, pausing the guest so pre-copy completes",
            job.name,
            why,
        )
        try:
            job.dom.suspend()
        except libvirt.libvirtError as exc:
            raise MigrationError.from_libvirt(f"pausing {job.name} to force completion", exc) from None
        job.paused_by_us = True
        return ForceCompleteAction.PAUSED

    def timeout_action(
        self, job: MigrationJob, timeout: float, elapsed: float, state: tuple[int, int] | None, action: str
    ) -> bool:
        """Carry out the completion-timeout `action` ("abort" or "force_complete"). True once done;
        False or MigrationError when it was not (the monitor retries on the next poll). A
        force-complete that failed MAX_FORCE_COMPLETE_FAILURES times falls back to aborting the job."""
        self._log.warning(
            "migration %s: not completed after %.1f s (completion timeout %.0f s): action %s",
            job.name,
            elapsed,
            timeout,
            action,
        )
        if action == "force_complete" and job.force_failures < MAX_FORCE_COMPLETE_FAILURES:
            if self._try_force_complete(job, timeout, state):
                return True
            if job.force_failures < MAX_FORCE_COMPLETE_FAILURES:
                return False
        abort_reason = f"completion timeout: not completed within {timeout:.0f}s"
        if action == "force_complete":  # here only after the force-complete attempts failed
            abort_reason += f", and force-complete failed {job.force_failures} times ({job.last_force_error})"
        self.abort(job, abort_reason)  # MigrationError: not aborted, retried on the next poll
        return True

    def _try_force_complete(self, job: MigrationJob, timeout: float, state: tuple[int, int] | None) -> bool:
        try:
            self.force_complete(job, f"completion timeout {timeout:.0f}s", state)
            return True
        except MigrationError as exc:
            job.force_failures += 1
            job.last_force_error = str(exc)
            retrying = job.force_failures < MAX_FORCE_COMPLETE_FAILURES
            self._log.error(
                "migration %s: force-complete failed (attempt %d of %d)%s: %s",
                job.name,
                job.force_failures,
                MAX_FORCE_COMPLETE_FAILURES,
                ", retrying" if retrying else "; aborting the job instead",
                exc,
            )
            return False
