"""After a restart (even a SIGKILL mid-migration), take up what the source's record says was under way.

For each unfinished record (agent.daemon.migrations.MigrationStore.unfinished) libvirt is asked
what became of the instance (`probe`: the source domain, its job, the destination's copy), and one
pure rule (`verdict`) decides:

| record                        | libvirt now                                  | verdict                        |
| ----------------------------- | -------------------------------------------- | ------------------------------ |
| ended, claim pending          | (not asked)                                  | settle: confirm / release      |
| any active                    | an outgoing job runs on the source domain    | attach: monitor it again       |
| any active                    | the instance runs on the destination         | completed (confirm the claim)  |
| queued                        | the instance runs here, no job               | requeue (it never started)     |
| preparing / running           | the instance runs here, no job               | failed / aborted (release)     |
| any active                    | neither here nor there                       | failed, claim left to expire   |

Attaching (`AttachedJob`) takes up what the runner did for its own job: progress events, the
downtime steps and the completion timeout counted from the job's own start (jobStats
`time_elapsed`), abort and force-complete, and at the end the outcome with the claim settled.

The runner cannot attach to a job it did not start (MigrationRunner.run starts one); what it
should offer so that this module shrinks to the verdict table is in the lead's report:
`MigrationRunner.attach(domain, target, policy, on_progress) -> MigrationOutcome`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

import libvirt

from agent.daemon.source_model import Ending, Flight
from agent.errors import AgentError
from agent.libvirt_ops.connection import close_quietly, open_connection
from agent.libvirt_ops.errors import MigrationAbortRefused, MigrationError, NoMigrationInProgress
from agent.libvirt_ops.migration import (
    MigrationProgress,
    MigrationTarget,
    Phase,
    completion_timeout_s,
    downtime_for,
    downtime_steps,
    progress_from_stats,
)
from agent.libvirt_ops.policy import MigrationPolicy
from agent.log import log_context
from agent.numa.placement import Placement

if TYPE_CHECKING:
    from agent.config import LibvirtConfig
    from agent.daemon.migrations import MigrationRecord
    from agent.daemon.source import Source

log = logging.getLogger("compute_agent.source")

Verdict = Literal["settle", "attach", "completed", "requeue", "failed", "aborted", "lost"]
_ACTIVE_JOBS = (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED)
_POSTCOPY_REASONS = frozenset(
    {
        (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY),
        (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED),
        (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY),
        (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY_FAILED),
    }
)
_END_WAIT_S = 30.0  # after the job ends, how long to wait for the destination to report the domain running


@dataclass(frozen=True, slots=True)
class Probe:
    """What libvirt says now about a migration's instance."""

    here: bool  # the source domain exists and is active
    job_active: bool  # an outgoing migration job runs on it
    there: bool | None  # the instance runs on the destination (None: the destination could not be asked)
    in_postcopy: bool = False  # the source domain's state is a post-copy one


def verdict(record: MigrationRecord, probe: Probe | None) -> Verdict:
    """What to do with an unfinished record (the table in the module doc). `probe` is None for an
    ended record (nothing to ask libvirt)."""
    if not record.active or probe is None:
        return "settle"
    if probe.job_active:
        return "attach"
    if probe.there:
        return "completed"
    if not probe.here:
        return "lost"
    if record.status == "queued":
        return "requeue"
    return "aborted" if record.abort_requested else "failed"


# --- libvirt: probe -------------------------------------------------------------------------------


def _job_active(dom: Any) -> bool:
    try:
        stats = dom.jobStats(0) or {}
    except libvirt.libvirtError:
        return False
    operation = stats.get("operation", libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT)
    return stats.get("type") in _ACTIVE_JOBS and operation == libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT


def _source_side(conn: Any, uuid: str) -> tuple[bool, bool, bool]:
    """(active here, outgoing job, post-copy state) of the source domain."""
    try:
        dom = conn.lookupByUUIDString(uuid)
        if not dom.isActive():
            return False, False, False
        state = tuple(dom.state())
    except libvirt.libvirtError:
        return False, False, False
    return True, _job_active(dom), state in _POSTCOPY_REASONS


def destination_running(uri: str, uuid: str, connect: Callable[[str], Any] = open_connection) -> bool | None:
    """True when the instance is active on the destination libvirtd at `uri`; None when it cannot be asked."""
    try:
        conn = connect(uri)
    except AgentError as exc:
        log.warning("cannot ask %s about %s: %s", uri, uuid, exc)
        return None
    try:
        return bool(conn.lookupByUUIDString(uuid).isActive())
    except libvirt.libvirtError as exc:
        return False if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN else None
    finally:
        close_quietly(conn)


def probe(conn: Any, record: MigrationRecord, connect: Callable[[str], Any] = open_connection) -> Probe:
    here, job, postcopy = _source_side(conn, record.instance_uuid)
    there = None if job else destination_running(record.dest_libvirt_uri, record.instance_uuid, connect)
    return Probe(here=here, job_active=job, there=there, in_postcopy=postcopy)


# --- attaching to a running job -------------------------------------------------------------------


class AttachedJob:
    """Controls and monitor for an outgoing job this process did not start (after a restart).

    The same rules as the runner's own monitor, from the job's own clock (`time_elapsed`): the
    downtime steps, the completion timeout with its action; abort refused in post-copy; force-
    complete switches to post-copy when the job was started with it, else pauses the guest.
    """

    def __init__(self, dom: Any, cfg: LibvirtConfig, policy: MigrationPolicy, memory_mb: float) -> None:
        self.dom, self.cfg, self.policy = dom, cfg, policy
        self.steps = downtime_steps(cfg, memory_mb)
        self.timeout = completion_timeout_s(cfg, memory_mb)
        self._lock = threading.Lock()
        self.in_postcopy = False
        self.aborted = False
        self.paused_by_us = False
        self.timeout_fired = False
        self.downtime_ms: int | None = None

    # --- Controls -----------------------------------------------------------------------------------

    def abort(self) -> None:
        with self._lock:
            self._note_state()
            if self.in_postcopy:
                raise MigrationAbortRefused("the migration is in post-copy: the guest runs on the destination")
            try:
                self.dom.abortJob()
            except libvirt.libvirtError as exc:
                if not _job_active(self.dom):
                    raise NoMigrationInProgress("the job has ended") from None
                raise MigrationError.from_libvirt("aborting the attached migration", exc) from None
            self.aborted = True

    def force_complete(self) -> str:
        with self._lock:
            return self._force_locked()

    def _force_locked(self) -> str:
        self._note_state()
        if self.in_postcopy:
            return "none"
        try:
            if self.policy.post_copy:
                self.dom.migrateStartPostCopy(0)
                return "postcopy"
            self.dom.suspend()
        except libvirt.libvirtError as exc:
            raise MigrationError.from_libvirt("forcing the attached migration to complete", exc) from None
        self.paused_by_us = True
        return "paused"

    def _note_state(self) -> None:
        try:
            self.in_postcopy = self.in_postcopy or tuple(self.dom.state()) in _POSTCOPY_REASONS
        except libvirt.libvirtError:
            pass

    # --- monitor ------------------------------------------------------------------------------------

    def follow(self, on_progress: Callable[[MigrationProgress], None], sleep: Callable[[float], None]) -> None:
        """Poll until the job ends: progress, downtime steps, completion timeout."""
        while True:
            try:
                stats = self.dom.jobStats(0) or {}
            except libvirt.libvirtError:
                return  # the domain is gone: the job ended (completed with the source undefined)
            if stats.get("type") not in _ACTIVE_JOBS:
                return
            elapsed = float(stats.get("time_elapsed", 0) or 0) / 1000.0
            with self._lock:
                self._note_state()
                self._act(elapsed)
            phase: Phase = "postcopy" if self.in_postcopy else ("paused-precopy" if self.paused_by_us else "precopy")
            on_progress(
                progress_from_stats(stats, phase=phase, max_downtime_ms=self.downtime_ms or 0, elapsed_s=elapsed)
            )
            sleep(self.cfg.live_migration_poll_interval_s)

    def _act(self, elapsed: float) -> None:
        if self.in_postcopy or self.aborted:
            return
        wanted = downtime_for(self.steps, elapsed)
        if wanted is not None and wanted != self.downtime_ms:
            try:
                self.dom.migrateSetMaxDowntime(wanted, 0)
                self.downtime_ms = wanted
            except libvirt.libvirtError as exc:
                log.warning("attached migration: could not set max downtime %d ms: %s", wanted, exc)
        if self.timeout is not None and elapsed > self.timeout and not self.timeout_fired:
            self.timeout_fired = True
            self._timeout_action(elapsed)

    def _timeout_action(self, elapsed: float) -> None:
        log.warning("attached migration: not completed after %.0f s (timeout %.0f s)", elapsed, self.timeout or 0)
        try:
            if self.cfg.live_migration_timeout_action == "force_complete":
                self._force_locked()
            else:
                self.dom.abortJob()
                self.aborted = True
        except (libvirt.libvirtError, MigrationError) as exc:
            self.timeout_fired = False  # retried on the next poll
            log.error("attached migration: the completion-timeout action failed: %s", exc)


# --- taking records up ----------------------------------------------------------------------------


def _policy(record: MigrationRecord) -> MigrationPolicy:
    ac, pc = bool(record.auto_converge), bool(record.post_copy)
    return MigrationPolicy(ac, pc and not ac, record.decided_by or "as recorded before the restart")


def _flight(record: MigrationRecord) -> Flight:
    placement = Placement.from_json(record.placement_json) if record.placement_json else None
    target = MigrationTarget(record.dest_libvirt_uri, record.dest_migration_uri, record.dest_host)
    flight = Flight(record.migration_id, record.instance_uuid, target, placement, record.claim_host)
    flight.percent, flight.phase, flight.policy = record.percent, record.phase, _policy(record)
    flight.abort_requested = record.abort_requested
    return flight


def _ended_after_job(
    source: Source, record: MigrationRecord, job: AttachedJob, conn: Any, sleep: Callable[[float], None]
) -> Ending:
    """The outcome of an attached job once libvirt's job is over."""
    host = source.ctx.host
    for _ in range(int(_END_WAIT_S / 0.5)):
        there = destination_running(record.dest_libvirt_uri, record.instance_uuid)
        here, _job, postcopy = _source_side(conn, record.instance_uuid)
        if there:
            return Ending("completed", f"migrated to {record.dest_host} (followed after a restart)", record.dest_host)
        if here and not postcopy:
            status = "aborted" if job.aborted or record.abort_requested else "failed"
            return Ending(status, "the job ended and the instance still runs here (followed after a restart)", host)
        sleep(0.5)
    split = job.in_postcopy
    return Ending(
        "failed",
        "the job ended; the instance runs on neither host",
        record.dest_host if split else host,
        in_postcopy=split,
    )


def _attach(source: Source, record: MigrationRecord, sleep: Callable[[float], None]) -> None:
    flight = _flight(record)
    stack = contextlib.ExitStack()
    conn = stack.enter_context(source.own_connection())  # the monitor's own, closed when it ends
    try:
        dom = conn.lookupByUUIDString(record.instance_uuid)
        memory_mb = float(dom.maxMemory()) / 1024.0
    except BaseException:
        stack.close()
        raise
    job = AttachedJob(dom, source.ctx.cfg.libvirt, flight.policy or _policy(record), memory_mb)
    flight.controls, flight.started = job, record.status == "running"
    if record.abort_requested:  # asked before the restart; the agent died before libvirt heard it
        _abort_again(job, record)

    def monitor() -> Ending:
        with stack:
            job.follow(lambda p: source.on_progress(flight, p), sleep)
            return _ended_after_job(source, record, job, conn, sleep)

    log.warning("migration %s: found its job running after a restart; following it again", record.migration_id)
    source.adopt(flight, monitor)


def _abort_again(job: AttachedJob, record: MigrationRecord) -> None:
    try:
        job.abort()
    except MigrationError as exc:  # refused in post-copy, or the job just ended: the monitor sees the end
        log.warning("migration %s: the abort asked before the restart: %s", record.migration_id, exc)


def _conclude(source: Source, record: MigrationRecord, status: str, reason: str, host_now: str, probe_: Probe) -> None:
    ending = Ending(status, reason, host_now, in_postcopy=probe_.in_postcopy and status != "completed")
    source.finish(_flight(record), ending)


def take_up(source: Source, record: MigrationRecord, sleep: Callable[[float], None]) -> Verdict:
    """Act on one unfinished record; the verdict taken."""
    found = None if not record.active else probe(source.ctx.libvirt.get(), record)
    decided = verdict(record, found)
    log.info("migration %s (%s before the restart): %s", record.migration_id, record.status, decided)
    if decided == "settle":
        ending = Ending(record.status, record.reason or "", record.host_now or source.ctx.host)
        source.publish_done(source.settle_claim(record, ending))
    elif decided == "attach":
        _attach(source, record, sleep)
    elif decided == "requeue":
        source.enqueue(_flight(record))
    elif found is not None:
        _conclude_from(source, record, decided, found)
    return decided


def _conclude_from(source: Source, record: MigrationRecord, decided: Verdict, found: Probe) -> None:
    host = source.ctx.host
    if decided == "completed":
        _conclude(
            source,
            record,
            "completed",
            f"migrated to {record.dest_host} (found after a restart)",
            record.dest_host,
            found,
        )
    elif decided == "lost":
        _conclude(source, record, "failed", "after a restart the instance runs on neither host", host, found)
    else:
        _conclude(
            source, record, decided, "the job ended while the agent was down; the instance still runs here", host, found
        )


def recover(source: Source, sleep: Callable[[float], None] | None = None) -> dict[str, Verdict]:
    """Take up every unfinished record (a failure on one is logged; the others still go on)."""
    import time

    taken: dict[str, Verdict] = {}
    for record in source.store.unfinished():
        try:
            with log_context(migration_id=record.migration_id, instance_uuid=record.instance_uuid):
                taken[record.migration_id] = take_up(source, record, sleep or time.sleep)
        except Exception:
            log.exception("migration %s: could not take it up after the restart", record.migration_id)
    return taken
