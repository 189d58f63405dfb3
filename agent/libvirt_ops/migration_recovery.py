"""After a failed or aborted migration job: the VM must run on the source, and nothing of it may be
left defined on the destination -- unless the job really was in post-copy (the guest's memory is
split between the hosts then: both sides are left to the operator, or to the post-copy resume).

A definition is undefined on the destination only when another definition of the same VM is known
to exist: the source domain was read after the failure. When the source cannot be read, the
destination's inactive definition may be the VM's last one, so it is kept.
"""

from __future__ import annotations

import logging
import uuid as _uuid
from typing import Any, Callable

import libvirt

from agent.libvirt_ops.connection import close_quietly
from agent.libvirt_ops.errors import LibvirtConnectionError, libvirt_error_details
from agent.libvirt_ops.migration_job import MigrationJob

SPLIT_NOTE = "failed in post-copy: guest state is split between source and destination, operator action needed"


class FailureRecovery:
    def __init__(self, connect: Callable[[str], Any], log: logging.Logger) -> None:
        self._connect = connect
        self._log = log

    def recover(
        self,
        job: MigrationJob,
        target: Any,
        dest_preexisting: bool,
        source_state: tuple[int, int] | None,
        state_error: str,
    ) -> str:
        """Returns notes for the outcome reason ("" when all is well).

        Hands off (both sides left as they are) when the switch to post-copy really happened, or
        when it was requested and the source state cannot be read. A post-copy *request* alone does
        not count otherwise: if the job failed before libvirt switched, the guest still runs on the
        source and the destination may hold a leftover to clean up."""
        handoff = self._handoff_note(job, source_state, state_error)
        if handoff:
            return handoff
        notes = self._check_source(job, source_state, state_error)
        notes += self._clean_destination(job, target, dest_preexisting, source_known=source_state is not None)
        return "; ".join(notes)

    def _handoff_note(self, job: MigrationJob, source_state: tuple[int, int] | None, state_error: str) -> str:
        if job.in_postcopy:
            self._log.error(
                "migration %s: failed after the switch to post-copy: the guest's memory is split between "
                "the hosts; leaving both sides as they are for the operator",
                job.name,
            )
            return SPLIT_NOTE
        if job.postcopy_requested and source_state is None:
            self._log.error(
                "migration %s: failed after post-copy was requested and the source state cannot be read (%s); "
                "leaving both sides as they are for the operator",
                job.name,
                state_error,
            )
            return (
                f"post-copy was requested and the source domain state cannot be read ({state_error}): "
                "the guest state may be split, operator action needed"
            )
        return ""

    # -- source ----------------------------------------------------------------------------------

    def _check_source(self, job: MigrationJob, source_state: tuple[int, int] | None, state_error: str) -> list[str]:
        if source_state is None:
            self._log.error("migration %s: cannot check the source domain after the failure: %s", job.name, state_error)
            return [f"cannot check the source domain: {state_error}"]
        try:
            state = self._resume_if_ours(job, source_state)
        except libvirt.libvirtError as exc:
            _code, message = libvirt_error_details(exc)
            self._log.error("migration %s: cannot check the source domain after the failure: %s", job.name, message)
            return [f"cannot check the source domain: {message}"]
        if state == libvirt.VIR_DOMAIN_RUNNING or (state == libvirt.VIR_DOMAIN_PAUSED and job.domain_paused_at_start):
            self._log.info("migration %s: guest still runs on the source", job.name)
            return []
        self._log.error("migration %s: after the failure the source domain is in state %s", job.name, state)
        return [f"source domain in state {state}, not running"]

    def _resume_if_ours(self, job: MigrationJob, source_state: tuple[int, int]) -> int:
        """Resume a guest paused by us (or by the migration); returns the state afterwards."""
        state, reason = source_state
        if state != libvirt.VIR_DOMAIN_PAUSED or not (job.paused_by_us or not job.domain_paused_at_start):
            return state
        self._log.warning(
            "migration %s: resuming the guest on the source (paused by us: %s, reason %s)",
            job.name,
            job.paused_by_us,
            reason,
        )
        job.dom.resume()
        return int(job.dom.state()[0])

    # -- destination -----------------------------------------------------------------------------

    def _clean_destination(
        self, job: MigrationJob, target: Any, dest_preexisting: bool, *, source_known: bool
    ) -> list[str]:
        try:
            conn = self._connect(target.uri)
        except LibvirtConnectionError as exc:
            self._log.error("migration %s: cannot check the destination for leftovers: %s", job.name, exc)
            return [f"cannot check {target.host}: {exc}"]
        try:
            return self._clean_leftover(job, conn, target, dest_preexisting, source_known)
        except libvirt.libvirtError as exc:
            _code, message = libvirt_error_details(exc)
            self._log.error("migration %s: cannot clean up %s: %s", job.name, target.host, message)
            return [f"cannot clean up {target.host}: {message}"]
        finally:
            close_quietly(conn)

    def _clean_leftover(
        self, job: MigrationJob, conn: Any, target: Any, dest_preexisting: bool, source_known: bool
    ) -> list[str]:
        leftover = self._leftover(job, conn, target)
        if leftover is None:
            return []
        if leftover.isActive():
            self._log.error("migration %s: a running copy is still on %s; not touching it", job.name, target.host)
            return [f"a running copy is still on {target.host}"]
        if dest_preexisting:
            self._log.info(
                "migration %s: the inactive definition on %s predates the migration; kept", job.name, target.host
            )
            return []
        if not leftover.isPersistent():
            return []
        if not source_known:
            self._log.error(
                "migration %s: the source domain cannot be read: keeping the inactive definition on %s "
                "(it may be the VM's last one)",
                job.name,
                target.host,
            )
            return [f"kept the inactive definition on {target.host}: the source domain cannot be read"]
        self._log.warning("migration %s: undefining the leftover inactive definition on %s", job.name, target.host)
        leftover.undefine()
        return []

    def _leftover(self, job: MigrationJob, conn: Any, target: Any) -> Any:
        """The destination's domain with the job's UUID, None when there is none."""
        try:
            leftover = conn.lookupByUUIDString(job.uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
            self._log.info("migration %s: nothing left on %s", job.name, target.host)
            return None
        if _uuid.UUID(leftover.UUIDString()) != _uuid.UUID(job.uuid):  # paranoia: only our UUID
            return None
        return leftover
