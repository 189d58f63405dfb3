"""Following an outgoing migration job this process did not start (``MigrationRunner.attach``, after
the agent's restart): finding the job, and deciding how it ended.

No migrateToURI3 call of ours returns at the end of such a job, so its outcome is read from libvirt:
the JOB_COMPLETED event (the completed job's statistics) says completed; else the guest running on
the destination and no longer here says completed, and still running here says failed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import libvirt

from agent.errors import AgentError
from agent.libvirt_ops.connection import close_quietly
from agent.libvirt_ops.errors import MigrationError, NoMigrationInProgress
from agent.libvirt_ops.migration_job import MigrationJob, postcopy_phase_of_state, read_state
from agent.libvirt_ops.migration_monitor import ACTIVE_JOB_TYPES

# an attached job is over: how long the destination may take to report the guest running (seconds;
# libvirt starts the guest there right after the job's end), asked every _END_POLL_S
END_WAIT_S = 30.0
_END_POLL_S = 0.5
# a source domain in one of these states (and not in post-copy) still runs the guest
_LIVE_STATES = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_BLOCKED)


@dataclass(frozen=True, slots=True)
class AttachedDomain:
    """A domain found with an outgoing job, as attach() reads it."""

    dom: Any
    name: str
    uuid: str
    paused: bool
    elapsed_ms: int  # jobStats time_elapsed: how long the job has run
    memory_kib: int


def outgoing_job_running(stats: Mapping[str, Any]) -> bool:
    """jobStats(0) of a domain says an outgoing migration job runs (no "operation" before libvirt 3.3)."""
    operation = stats.get("operation", libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT)
    return stats.get("type") in ACTIVE_JOB_TYPES and operation == libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT


def read_attached(dom: Any, domain: str) -> AttachedDomain:
    """The domain and its job; NoMigrationInProgress when no outgoing job runs on it."""
    try:
        name, uuid = dom.name(), dom.UUIDString()
        stats = dom.jobStats(0) or {}
        state, _reason = dom.state()
        memory_kib = int(dom.maxMemory())
    except libvirt.libvirtError as exc:
        raise MigrationError.from_libvirt(f"reading domain {domain!r} and its job", exc) from None
    if not outgoing_job_running(stats):
        raise NoMigrationInProgress(f"attach: domain {name} has no outgoing migration job")
    elapsed_ms = int(stats.get("time_elapsed", 0) or 0)
    return AttachedDomain(dom, name, uuid, state == libvirt.VIR_DOMAIN_PAUSED, elapsed_ms, memory_kib)


class AttachedEnd:
    """How an attached job that is over ended."""

    def __init__(self, connect: Callable[[str], Any], sleep: Callable[[float], None], log: logging.Logger) -> None:
        self._connect, self._sleep, self._log = connect, sleep, log

    def decide(self, job: MigrationJob, target: Any) -> tuple[bool, str]:
        """(completed, why not): completed when JOB_COMPLETED came, or the guest runs on the
        destination and no longer here; failed when it still runs here. The destination may need a
        moment to report the guest running: asked for END_WAIT_S."""
        for _ in range(int(END_WAIT_S / _END_POLL_S)):
            if job.event_seen.is_set():
                return True, ""
            state, _error = read_state(job.dom)
            here = state is not None and state[0] in _LIVE_STATES and postcopy_phase_of_state(state) is None
            if here:
                return False, "the job ended and the guest still runs on the source"
            if self._destination_active(job, target):
                return True, ""
            self._sleep(_END_POLL_S)
        return False, f"the job ended and the guest runs on neither host after {END_WAIT_S:.0f}s"

    def _destination_active(self, job: MigrationJob, target: Any) -> bool:
        try:
            conn = self._connect(target.uri)
        except AgentError as exc:
            self._log.info("migration %s: cannot ask %s: %s", job.name, target.host, exc)
            return False
        try:
            return bool(conn.lookupByUUIDString(job.uuid).isActive())
        except libvirt.libvirtError:
            return False
        finally:
            close_quietly(conn)
