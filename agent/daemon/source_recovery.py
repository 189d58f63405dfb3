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

Attaching is the runner's (`MigrationRunner.attach`): the same monitor as for a job it started
(progress, downtime steps and completion timeout on the job's own clock, abort and force-complete),
and its outcome ends the migration as any other (the claim settled, `.done` published).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

import libvirt

from agent.daemon.source_model import Ending, Flight, ending_from_outcome
from agent.errors import AgentError
from agent.libvirt_ops.connection import close_quietly, open_connection
from agent.libvirt_ops.errors import NoMigrationInProgress
from agent.libvirt_ops.migration import MigrationTarget
from agent.libvirt_ops.migration_attach import outgoing_job_running
from agent.libvirt_ops.migration_job import postcopy_phase_of_state
from agent.libvirt_ops.policy import MigrationPolicy
from agent.log import log_context
from agent.numa.placement import Placement

if TYPE_CHECKING:
    from agent.daemon.migrations import MigrationRecord
    from agent.daemon.source import Source

log = logging.getLogger("compute_agent.source")

Verdict = Literal["settle", "attach", "completed", "requeue", "failed", "aborted", "lost"]


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
    return outgoing_job_running(stats)


def _source_side(conn: Any, uuid: str) -> tuple[bool, bool, bool]:
    """(active here, outgoing job, post-copy state) of the source domain."""
    try:
        dom = conn.lookupByUUIDString(uuid)
        if not dom.isActive():
            return False, False, False
        state = tuple(dom.state())
    except libvirt.libvirtError:
        return False, False, False
    return True, _job_active(dom), postcopy_phase_of_state((int(state[0]), int(state[1]))) is not None


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


def _attach(source: Source, record: MigrationRecord) -> None:
    """Follow the job with the runner (MigrationRunner.attach) on a thread of its own, as a
    migration of this agent: same outbound slot, same progress, abort, force-complete and end.
    An abort asked before the restart (the agent died before libvirt heard it) is applied on the
    first progress (the flight is not `started` until then: Source.on_progress)."""
    flight = _flight(record)
    policy = flight.policy or _policy(record)

    def monitor() -> Ending:
        with source.own_connection() as conn:  # the runner's own, closed when it ends
            runner = source.new_runner(conn)
            flight.controls = runner
            try:
                outcome = runner.attach(
                    record.instance_uuid, flight.target, policy, lambda p: source.on_progress(flight, p)
                )
            except NoMigrationInProgress:  # it ended between the probe and the attach
                return _ending_now(source, record)
        return ending_from_outcome(outcome, source.ctx.host, record.dest_host)

    log.warning("migration %s: found its job running after a restart; following it again", record.migration_id)
    source.adopt(flight, monitor)


def _ending_now(source: Source, record: MigrationRecord) -> Ending:
    found = probe(source.ctx.libvirt.get(), record)
    decided = verdict(record, found)
    if decided == "attach":  # a new job on the instance, started by someone else: ours is over
        decided = "failed"
    return _ending_for(source, record, decided, found)


def _ending(status: str, reason: str, host_now: str, probe_: Probe) -> Ending:
    return Ending(status, reason, host_now, in_postcopy=probe_.in_postcopy and status != "completed")


def take_up(source: Source, record: MigrationRecord, sleep: Callable[[float], None]) -> Verdict:
    """Act on one unfinished record; the verdict taken."""
    found = None if not record.active else probe(source.ctx.libvirt.get(), record)
    decided = verdict(record, found)
    log.info("migration %s (%s before the restart): %s", record.migration_id, record.status, decided)
    if decided == "settle":
        ending = Ending(record.status, record.reason or "", record.host_now or source.ctx.host)
        source.publish_done(source.settle_claim(record, ending))
    elif decided == "attach":
        _attach(source, record)
    elif decided == "requeue":
        source.enqueue(_flight(record))
    elif found is not None:
        _conclude_from(source, record, decided, found)
    return decided


def _conclude_from(source: Source, record: MigrationRecord, decided: Verdict, found: Probe) -> None:
    source.finish(_flight(record), _ending_for(source, record, decided, found))


def _ending_for(source: Source, record: MigrationRecord, decided: Verdict, found: Probe) -> Ending:
    """The ending a verdict on a job that is over means."""
    host = source.ctx.host
    if decided == "completed":
        return _ending("completed", f"migrated to {record.dest_host} (found after a restart)", record.dest_host, found)
    if decided == "lost":
        return _ending("failed", "after a restart the instance runs on neither host", host, found)
    return _ending(decided, "the job ended while the agent was down; the instance still runs here", host, found)


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
