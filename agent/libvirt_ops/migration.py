"""Live migration runner: start a libvirt migration job and steer it to an outcome.

``MigrationRunner.run()`` does, in order (see DESIGN.md, "A migration, end to end", step 4):

1. prepare: look the domain up, refuse a request whose instance UUID is not the domain's, decide
   the policy (``policy.decide_policy``: a conflicting request raises before any migration call),
   read its migratable XML and rewrite it for the destination ``Placement`` (live and persistent
   definitions alike), measure the guest's dirty rate and predict convergence (``preflight``);
2. start ``virDomainMigrateToURI3`` in a worker thread (it blocks until the job ends);
3. in the calling thread, run the monitor (``migration_monitor``: poll -> observe -> act with the
   pure rules of ``convergence``: downtime steps, completion timeout, post-copy switch, progress
   with a convergence verdict);
4. when the stream broke in post-copy (both sides paused), resume it with
   VIR_MIGRATE_POSTCOPY_RESUME within ``live_migration_postcopy_recovery_s`` (``postcopy_resume``);
5. build the ``MigrationOutcome``; on failure make sure the VM still runs on the source and that
   nothing of it is left defined on the destination, unless the job really was in post-copy
   (``migration_recovery``).

``MigrationRunner.attach()`` follows an outgoing job that is already running (started before the
agent's restart) with the same monitor, on the job's own clock (jobStats ``time_elapsed``); its end
comes from libvirt (jobStats type NONE, the JOB_COMPLETED and lifecycle events) and its outcome
from the completed statistics and a lookup on the destination (``migration_attach``).

``abort()`` and ``force_complete()`` may be called from another thread while ``run()`` or
``attach()`` is in progress. An abort during step 1 is kept and cancels the migration before it starts. Abort is
refused (``MigrationAbortRefused``) once post-copy has been requested or is running: the guest
already executes on the destination then. ``force_complete()`` is refused once an abort was
accepted, and raises MigrationError when the switch to post-copy (or the pause) failed.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid as _uuid
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal, Mapping

import libvirt

from agent.config import LibvirtConfig
from agent.errors import AgentError, InvalidRequest
from agent.libvirt_ops.connection import close_quietly, ensure_event_loop, lookup_domain, open_connection
from agent.libvirt_ops.convergence import (
    NOT_CONVERGING_MIN_SHRINK,
    ConvergencePrediction,
    ConvergenceTracker,
    MigrationProgress,
    Phase,
    StallDetector,
    Watermark,
    completion_timeout_s,
    downtime_for,
    downtime_steps,
    predict_precopy,
    progress_from_stats,
)
from agent.libvirt_ops.domain_xml import rewrite_for_placement
from agent.libvirt_ops.errors import (
    MigrationAbortRefused,
    MigrationError,
    NoMigrationInProgress,
    libvirt_error_details,
)
from agent.libvirt_ops.migration_attach import AttachedEnd, read_attached
from agent.libvirt_ops.migration_job import (
    MAX_FORCE_COMPLETE_FAILURES,
    MAX_STALL_SWITCH_FAILURES,
    ForceCompleteAction,
    JobControls,
    MigrationJob,
    PostCopyPhase,
    read_state,
)
from agent.libvirt_ops.migration_monitor import MigrationMonitor, MonitorPlan, MonitorResult, Sample
from agent.libvirt_ops.migration_recovery import FailureRecovery
from agent.libvirt_ops.policy import MigrationPolicy, decide_policy, migration_flags, migration_params
from agent.libvirt_ops.postcopy_resume import PostcopyRecovery, PostcopyResumer
from agent.libvirt_ops.preflight import PreflightReport, measure_preflight
from agent.numa.placement import Placement
from agent.numa.request import InstanceRequest, parse_request

__all__ = [
    "MAX_STALL_SWITCH_FAILURES",
    "NOT_CONVERGING_MIN_SHRINK",
    "ConvergencePrediction",
    "ConvergenceTracker",
    "ForceCompleteAction",
    "MigrationOutcome",
    "MigrationPolicy",
    "MigrationProgress",
    "MigrationRunner",
    "MigrationTarget",
    "Phase",
    "PostCopyPhase",
    "PostcopyRecovery",
    "PreflightReport",
    "StallDetector",
    "Watermark",
    "completion_timeout_s",
    "downtime_for",
    "downtime_steps",
    "predict_precopy",
    "progress_from_stats",
]

LOG = logging.getLogger("compute_agent.migration")

Status = Literal["completed", "failed", "aborted"]
_MAX_FORCE_COMPLETE_FAILURES = MAX_FORCE_COMPLETE_FAILURES  # the old private name, kept for the tests

# source lifecycle event details (event SUSPENDED): the job switched to post-copy / its stream broke
_POSTCOPY_SUSPEND = libvirt.VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY
_POSTCOPY_SUSPEND_FAILED = libvirt.VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY_FAILED
# jobStats key: pages the destination requested during post-copy (> 0 proves the switch happened)
_POSTCOPY_REQS = libvirt.VIR_DOMAIN_JOB_MEMORY_POSTCOPY_REQS
# how long the JOB_COMPLETED event may trail migrateToURI3's return (seconds)
_EVENT_TRAIL_S = 2.0

# the stall detector's window: a new low of remaining memory must be missing for this many polls
# (never one sample)
_STALL_WINDOW_POLLS = 5


# --- value types ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MigrationTarget:
    """Where to: the destination libvirtd URI (``uri``, used peer-to-peer by the source daemon),
    the address QEMU streams memory to (``migrate_uri``, e.g. ``tcp://10.0.0.2``) and the
    destination's host name (for logs and events)."""

    uri: str
    migrate_uri: str
    host: str


@dataclass(frozen=True, slots=True)
class MigrationOutcome:
    status: Status
    reason: str
    final_stats: Mapping[str, int | float]
    policy: MigrationPolicy
    elapsed_s: float
    downtime_ms: int | None
    switched_to_postcopy: bool
    max_throttle_pct: int
    preflight: PreflightReport | None = None  # dirty rate measured before starting + prediction
    postcopy_recoveries: tuple[PostcopyRecovery, ...] = ()  # one per broken post-copy stream


@dataclass(frozen=True, slots=True)
class _Prepared:
    """Everything decided before the job starts."""

    dom: Any
    name: str
    uuid: str
    paused: bool
    policy: Any
    flags: int
    params: dict[str, Any]
    plan: MonitorPlan
    dest_preexisting: bool
    preflight: PreflightReport | None


class MigrationRunner:
    """Runs one live migration at a time from the source host (see the module docstring)."""

    def __init__(
        self,
        source_conn: Any,
        cfg: LibvirtConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        log: logging.Logger = LOG,
        connect: Callable[[str], Any] = open_connection,
        events: bool = True,
    ) -> None:
        self._conn = source_conn
        self._cfg = cfg
        self._clock = clock
        self._sleep = sleep
        self._log = log
        self._connect = connect  # opens the job and destination connections (tests may inject)
        self._events = events  # run libvirt's event loop to get JOB_COMPLETED statistics
        self._lock = threading.RLock()
        self._run_lock = threading.Lock()
        self._job: MigrationJob | None = None
        self._preparing = False  # run() is in step 1: an abort is kept for the start
        self._prep_abort = ""
        self._controls = JobControls(cfg, log)
        self._source_uri = ""  # the source connection's URI, read when a job connection is opened

    # -- public API ------------------------------------------------------------------------------

    def run(
        self,
        domain_name_or_uuid: str,
        target: MigrationTarget,
        placement: Placement | None,
        request: InstanceRequest | Mapping[str, Any],
        on_progress: Callable[[MigrationProgress], None] | None = None,
        on_policy: Callable[[MigrationPolicy], None] | None = None,
    ) -> MigrationOutcome:
        """Migrate the domain to `target` with `placement`; blocks until the job ends.

        `placement` None is the 1.0 legacy move: the live and persistent XML go to the destination
        unchanged (the pinning copied as it is), as libvirt does without the agent.

        `request` is the parsed InstanceRequest, or the instance metadata document (uuid, vcpus,
        memory_mb, extra_specs, image_properties), parsed here first so that a contradictory
        request is refused before any libvirt call.

        `on_policy` hears the decided policy (each part with the key or option that decided it, in
        its `reason`) as soon as it is decided, before the job starts; the outcome carries it too.

        Raises (before any migration call): InvalidRequest (incl. policy conflicts and a request for
        another instance), DomainNotFound, LibvirtConnectionError, DomainXMLError, MigrationError.
        Once the job is started every problem is reported in the returned MigrationOutcome instead.
        """
        if not self._run_lock.acquire(blocking=False):
            raise MigrationError("a migration is already running on this runner")
        with self._lock:
            self._preparing, self._prep_abort = True, ""
        try:
            return self._run(domain_name_or_uuid, target, placement, request, on_progress, on_policy)
        finally:
            with self._lock:
                self._preparing = False
            self._run_lock.release()

    def abort(self) -> None:
        """Cancel the running migration (the VM stays on the source), also while it is still being
        prepared (it then never starts).

        Raises MigrationAbortRefused once post-copy was requested or is running, and
        NoMigrationInProgress when there is nothing to abort."""
        with self._lock:
            if self._job is None and self._preparing:
                self._log.warning("migration: abort requested while preparing; it will not start")
                self._prep_abort = "aborted on request"
                return
            job = self._require_job("abort")
            self._controls.note_postcopy(job, self._controls.read_state(job))
            if job.postcopy:
                raise MigrationAbortRefused(
                    f"migration of {job.name} is in post-copy: the guest already runs on the destination, "
                    "it cannot be aborted (force it to complete or wait)"
                )
            self._controls.abort(job, "aborted on request")

    def force_complete(self) -> ForceCompleteAction:
        """Make the running migration finish now: switch to post-copy when the policy armed it,
        else pause the guest so pre-copy completes. Returns the action taken: POSTCOPY, PAUSED, or
        nothing done because the job is ALREADY_POSTCOPY / the guest ALREADY_PAUSED.

        Raises MigrationError when the switch to post-copy (or the pause) failed, or the abort of
        the migration was already accepted: nothing was done then."""
        with self._lock:
            job = self._require_job("force_complete")
            return self._controls.force_complete(job, "force-complete requested")

    def attach(
        self,
        domain_name_or_uuid: str,
        target: MigrationTarget,
        policy: MigrationPolicy,
        on_progress: Callable[[MigrationProgress], None] | None = None,
    ) -> MigrationOutcome:
        """Follow an outgoing migration job that is already running (started by this agent before
        its restart); blocks until the job ends. `policy` is the one the job was started with.

        The same monitor as run()'s, on the job's own clock (jobStats `time_elapsed`): progress,
        downtime steps, completion timeout and its action, post-copy switch rules; abort() and
        force_complete() act on it. Its end is seen from libvirt (jobStats type NONE, the
        JOB_COMPLETED and lifecycle events) and the outcome decided from the completed job's
        statistics and a lookup on the destination (``migration_attach.AttachedEnd``).

        Raises (before following): NoMigrationInProgress when the domain has no outgoing job,
        DomainNotFound, LibvirtConnectionError, MigrationError."""
        if not self._run_lock.acquire(blocking=False):
            raise MigrationError("a migration is already running on this runner")
        try:
            return self._attach(domain_name_or_uuid, target, policy, on_progress)
        finally:
            self._run_lock.release()

    def _require_job(self, what: str) -> MigrationJob:
        job = self._job
        waiting_for_resume = job is not None and job.postcopy_phase is PostCopyPhase.PAUSED
        if job is None or (job.done.is_set() and not waiting_for_resume):
            raise NoMigrationInProgress(f"{what}: no migration in progress")
        return job

    # -- step 1: prepare -------------------------------------------------------------------------

    def _run(
        self,
        domain: str,
        target: MigrationTarget,
        placement: Placement | None,
        request: InstanceRequest | Mapping[str, Any],
        on_progress: Callable[[MigrationProgress], None] | None,
        on_policy: Callable[[MigrationPolicy], None] | None,
    ) -> MigrationOutcome:
        if not isinstance(request, InstanceRequest):
            request = parse_request(request)  # InvalidRequest before any libvirt call
        prep = self._prepare(domain, target, placement, request, on_policy)
        job = MigrationJob(
            dom=prep.dom, name=prep.name, uuid=prep.uuid, policy=prep.policy, domain_paused_at_start=prep.paused
        )
        job_conn, job_dom, event_ids = self._job_connection(job)
        with self._lock:
            self._preparing = False
            prep_abort = self._prep_abort
            if not prep_abort:
                self._job = job
        if prep_abort:
            self._close_job_connection(job_conn, event_ids)
            return self._aborted_before_start(prep, target, prep_abort)
        return self._execute(job, job_conn, job_dom, event_ids, prep, target, on_progress)

    def _read_domain(self, domain: str, request: InstanceRequest) -> tuple[Any, str, str, bool]:
        dom = lookup_domain(self._conn, domain)
        try:
            name, uuid = dom.name(), dom.UUIDString()
            state, _reason = dom.state()
        except libvirt.libvirtError as exc:
            raise MigrationError.from_libvirt(f"reading domain {domain!r}", exc) from None
        _check_instance_uuid(request, name, uuid)
        if state not in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED):
            raise MigrationError(f"domain {name} is not running (state {state}): nothing to live-migrate")
        return dom, name, uuid, state == libvirt.VIR_DOMAIN_PAUSED

    def _prepare(
        self,
        domain: str,
        target: MigrationTarget,
        placement: Placement | None,
        request: InstanceRequest,
        on_policy: Callable[[MigrationPolicy], None] | None = None,
    ) -> _Prepared:
        cfg = self._cfg
        dom, name, uuid, paused = self._read_domain(domain, request)
        policy = self._decide_policy(request, name, target, paused, on_policy)
        live, persistent_src, memory_kib = self._read_xml(dom, name)
        dest_xml, persistent_xml = _destination_xml(live, persistent_src, placement)
        flags = migration_flags(policy)
        params = migration_params(
            policy, dest_xml=dest_xml, persistent_xml=persistent_xml, migrate_uri=target.migrate_uri, cfg=cfg
        )
        memory_mb = memory_kib / 1024.0 if memory_kib > 0 else float(request.memory_mb)
        plan = self._plan(memory_mb)
        self._log_plan(name, memory_mb, plan, flags)
        dest_preexisting = self._check_destination(target, uuid, name)
        preflight = measure_preflight(
            self._conn, dom, cfg, memory_bytes=int(memory_mb * 1024 * 1024), sleep=self._sleep, log=self._log
        )
        return _Prepared(dom, name, uuid, paused, policy, flags, params, plan, dest_preexisting, preflight)

    def _decide_policy(
        self,
        request: InstanceRequest,
        name: str,
        target: MigrationTarget,
        paused: bool,
        on_policy: Callable[[MigrationPolicy], None] | None,
    ) -> MigrationPolicy:
        policy = decide_policy(request.migration, self._cfg, domain_paused=paused)
        self._log.info(
            "migration %s -> %s: policy auto_converge=%s post_copy=%s (%s)",
            name,
            target.host,
            policy.auto_converge,
            policy.post_copy,
            policy.reason,
        )
        if on_policy is not None:
            try:
                on_policy(policy)
            except Exception:  # noqa: BLE001 - a broken listener must not break the migration
                self._log.exception("migration %s: policy callback failed", name)
        return policy

    def _read_xml(self, dom: Any, name: str) -> tuple[str, str | None, int]:
        base_flags = libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE
        try:
            live = dom.XMLDesc(base_flags)
            persistent = dom.XMLDesc(base_flags | libvirt.VIR_DOMAIN_XML_INACTIVE) if dom.isPersistent() else None
            return live, persistent, int(dom.maxMemory())
        except libvirt.libvirtError as exc:
            raise MigrationError.from_libvirt(f"reading the XML of {name}", exc) from None

    def _plan(self, memory_mb: float) -> MonitorPlan:
        cfg = self._cfg
        return MonitorPlan(
            steps=tuple(downtime_steps(cfg, memory_mb)),
            timeout_s=completion_timeout_s(cfg, memory_mb),
            timeout_action=cfg.live_migration_timeout_action,
            postcopy_switch=cfg.live_migration_postcopy_switch,
            interval_s=cfg.live_migration_poll_interval_s,
            stall_window_s=_STALL_WINDOW_POLLS * cfg.live_migration_poll_interval_s,
        )

    def _log_plan(self, name: str, memory_mb: float, plan: MonitorPlan, flags: int) -> None:
        cfg = self._cfg
        self._log.info(
            "migration %s: %d MiB RAM, downtime steps %s, completion timeout %s, timeout action %s, "
            "post-copy switch %s, bandwidth %s MiB/s, flags %#x",
            name,
            round(memory_mb),
            ", ".join(f"{at:.0f}s:{ms}ms" for at, ms in plan.steps),
            f"{plan.timeout_s:.0f}s" if plan.timeout_s else "none",
            cfg.live_migration_timeout_action,
            cfg.live_migration_postcopy_switch,
            cfg.live_migration_bandwidth_mib or "unlimited",
            flags,
        )

    def _check_destination(self, target: MigrationTarget, uuid: str, name: str) -> bool:
        """True when the destination already has a (defined, inactive) domain with this UUID; refuse
        when it is running there."""
        conn = self._connect(target.uri)
        try:
            other = _lookup_or_none(conn, uuid, f"checking {target.host} for {name}")
            if other is None:
                return False
            try:
                active = other.isActive()
            except libvirt.libvirtError as exc:
                raise MigrationError.from_libvirt(f"checking {target.host} for {name}", exc) from None
            if active:
                raise MigrationError(f"domain {name} ({uuid}) is already running on {target.host}")
            self._log.warning(
                "migration %s: %s already has an inactive definition of it; it will be replaced", name, target.host
            )
            return True
        finally:
            close_quietly(conn)

    def _aborted_before_start(self, prep: _Prepared, target: MigrationTarget, reason: str) -> MigrationOutcome:
        self._log.warning(
            "migration %s -> %s: %s before the job started; nothing migrated", prep.name, target.host, reason
        )
        return MigrationOutcome(
            status="aborted",
            reason=f"{reason} while the migration was being prepared: not started",
            final_stats={},
            policy=prep.policy,
            elapsed_s=0.0,
            downtime_ms=None,
            switched_to_postcopy=False,
            max_throttle_pct=0,
            preflight=prep.preflight,
        )

    # -- steps 2-4: the job ----------------------------------------------------------------------

    def _execute(
        self,
        job: MigrationJob,
        job_conn: Any,
        job_dom: Any,
        event_ids: list[int],
        prep: _Prepared,
        target: MigrationTarget,
        on_progress: Callable[[MigrationProgress], None] | None,
    ) -> MigrationOutcome:
        start = self._clock()
        self._log.info("migration %s -> %s (%s): starting", prep.name, target.host, target.uri)
        worker = self._start_worker(job, job_dom, target.uri, prep.params, prep.flags)
        recoveries: list[PostcopyRecovery] = []
        try:
            result = self._monitor(job, prep.plan, on_progress).run(start)
            worker.join()
            recoveries = self._resume_postcopy(job, job_dom, target, prep, on_progress, start)
            elapsed = self._clock() - start
            if job.error is None and job.event_registered:
                job.event_seen.wait(_EVENT_TRAIL_S)  # the event may trail migrateToURI3's return a little
        finally:
            self._stop_stray_worker(worker, job)
            with self._lock:
                self._job = None
            self._close_job_connection(job_conn, event_ids)
        return self._outcome(job, target, prep, result, elapsed, tuple(recoveries))

    def _start_worker(self, job: MigrationJob, dom: Any, uri: str, params: dict, flags: int) -> threading.Thread:
        job.done.clear()
        job.error = None
        worker = threading.Thread(
            target=_migrate_worker, args=(job, dom, uri, params, flags), name=f"migrate-{job.name}", daemon=True
        )
        worker.start()
        return worker

    def _monitor(
        self,
        job: MigrationJob,
        plan: MonitorPlan,
        on_progress: Callable[[MigrationProgress], None] | None,
        on_sample: Callable[[Sample], None] | None = None,
    ) -> MigrationMonitor:
        return MigrationMonitor(
            job,
            self._controls,
            self._lock,
            plan,
            clock=self._clock,
            sleep=self._sleep,
            log=self._log,
            on_progress=on_progress,
            on_sample=on_sample,
        )

    def _resume_postcopy(
        self,
        job: MigrationJob,
        job_dom: Any,
        target: MigrationTarget,
        prep: _Prepared,
        on_progress: Callable[[MigrationProgress], None] | None,
        start: float,
    ) -> list[PostcopyRecovery]:
        """Step 4; a no-op unless the stream broke in post-copy."""

        def attempt(dom: Any, on_sample: Callable[[Sample], None]) -> None:
            job.seen_active = False  # a new job: "no job" before it starts is not its end
            flags = prep.flags | libvirt.VIR_MIGRATE_POSTCOPY_RESUME
            worker = self._start_worker(job, dom, target.uri, prep.params, flags)
            self._monitor(job, prep.plan, on_progress, on_sample).run(start)
            worker.join()

        resumer = PostcopyResumer(
            job,
            window_s=float(self._cfg.live_migration_postcopy_recovery_s),
            source_uri=self._source_uri,
            dest_uri=target.uri,
            attempt=attempt,
            connect=self._connect,
            clock=self._clock,
            sleep=self._sleep,
            log=self._log,
            start=start,
        )
        return resumer.run(job_dom)

    def _stop_stray_worker(self, worker: threading.Thread, job: MigrationJob) -> None:
        """The monitor itself failed (a bug, KeyboardInterrupt): do not leave a job behind."""
        if not worker.is_alive():
            return
        self._log.error("migration %s: monitor stopped while the job runs; aborting it", job.name)
        try:
            job.dom.abortJob()
        except libvirt.libvirtError:
            pass
        worker.join(60.0)

    def _job_connection(self, job: MigrationJob) -> tuple[Any, Any, list[int]]:
        """A connection of its own for the blocking migrateToURI3 call, the domain on it, and the
        ids of its event callbacks (JOB_COMPLETED, LIFECYCLE; none without events).

        Monitor calls (jobStats, migrateSetMaxDowntime, abortJob, ...) issued on the connection
        that is blocked in migrateToURI3 were seen to hang for good with libvirt 9.0 (remote
        driver, two threads on one virConnect); on separate connections they never did.
        The JOB_COMPLETED event carries the final statistics (with the real downtime) of the
        source's job: with VIR_MIGRATE_UNDEFINE_SOURCE the source domain is gone afterwards, and
        after a post-copy migration the destination has no completed statistics either.
        The LIFECYCLE event SUSPENDED/POSTCOPY is the source's word that the switch to post-copy
        happened: a post-copy phase shorter than a poll interval is not seen in the polled state.
        """
        try:
            self._source_uri = self._conn.getURI()
        except libvirt.libvirtError as exc:
            raise MigrationError.from_libvirt("reading the source connection URI", exc) from None
        events = self._events and ensure_event_loop()
        conn = self._connect(self._source_uri)
        try:
            dom = conn.lookupByUUIDString(job.uuid)
        except libvirt.libvirtError as exc:
            close_quietly(conn)
            raise MigrationError.from_libvirt(f"looking up {job.name} on a job connection", exc) from None
        event_ids: list[int] = []
        if events and hasattr(conn, "domainEventRegisterAny"):
            event_ids = self._register_events(conn, dom, job)
        return conn, dom, event_ids

    def _register_events(self, conn: Any, dom: Any, job: MigrationJob) -> list[int]:
        event_ids: list[int] = []
        for event, callback, what in (
            (libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, _on_job_completed, "JOB_COMPLETED"),
            (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, _on_lifecycle, "lifecycle"),
        ):
            try:
                event_ids.append(conn.domainEventRegisterAny(dom, event, callback, job))
            except libvirt.libvirtError as exc:
                _code, message = libvirt_error_details(exc)
                self._log.info("migration %s: no %s events: %s", job.name, what, message)
                continue
            if event == libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED:
                job.event_registered = True
        return event_ids

    def _close_job_connection(self, job_conn: Any, event_ids: list[int]) -> None:
        for event_id in event_ids:
            try:
                job_conn.domainEventDeregisterAny(event_id)
            except libvirt.libvirtError:
                pass
        close_quietly(job_conn)

    # -- attach: a job started before the agent's restart ---------------------------------------

    def _attach(
        self,
        domain: str,
        target: MigrationTarget,
        policy: MigrationPolicy,
        on_progress: Callable[[MigrationProgress], None] | None,
    ) -> MigrationOutcome:
        found = read_attached(lookup_domain(self._conn, domain), domain)
        job = MigrationJob(
            dom=found.dom,
            name=found.name,
            uuid=found.uuid,
            policy=policy,
            domain_paused_at_start=found.paused,
            seen_active=True,
            attached=True,
        )
        start = self._clock() - found.elapsed_ms / 1000.0  # the job's own start, not the attach
        plan = self._plan(found.memory_kib / 1024.0)
        self._log.warning(
            "migration %s -> %s: following a job running for %.1f s (started before a restart); policy %s",
            job.name,
            target.host,
            found.elapsed_ms / 1000.0,
            policy.reason,
        )
        job_conn, _job_dom, event_ids = self._job_connection(job)  # for its events only
        with self._lock:
            self._job = job
        try:
            result = self._monitor(job, plan, on_progress, self._end_watch(job)).run(start)
            elapsed = self._clock() - start
        finally:
            with self._lock:
                self._job = None
            self._close_job_connection(job_conn, event_ids)
        return self._attached_outcome(job, target, result, elapsed)

    def _end_watch(self, job: MigrationJob) -> Callable[[Sample], None]:
        """The monitor's on_sample for an attached job: its end sets `done` (run()'s worker does it
        for a job of ours): no job any more, the domain gone, or the JOB_COMPLETED event seen."""

        def watch(sample: Sample) -> None:
            ended = not sample.failed and not sample.active
            if ended or job.event_seen.is_set() or (sample.failed and self._controls.no_job(job)):
                job.done.set()

        return watch

    def _attached_outcome(
        self, job: MigrationJob, target: MigrationTarget, result: MonitorResult, elapsed: float
    ) -> MigrationOutcome:
        last_stats = _running_stats(result.last_stats)
        self._note_postcopy_requests(job, last_stats)
        completed, why = AttachedEnd(self._connect, self._sleep, self._log).decide(job, target)
        if completed:
            outcome = self._completed_outcome(job, target, result, last_stats, elapsed)
        else:
            job.error = MigrationError(why)
            # dest_preexisting True: after a restart nobody knows what the destination held before
            outcome = self._failed_outcome(job, target, True, result, last_stats, elapsed)
        outcome = replace(outcome, reason=f"{outcome.reason} (followed after a restart)")
        self._log_outcome(job, target, outcome)
        return outcome

    # -- step 5: outcome -------------------------------------------------------------------------

    def _outcome(
        self,
        job: MigrationJob,
        target: MigrationTarget,
        prep: _Prepared,
        result: MonitorResult,
        elapsed: float,
        recoveries: tuple[PostcopyRecovery, ...] = (),
    ) -> MigrationOutcome:
        last_stats = _running_stats(result.last_stats)
        self._note_postcopy_requests(job, last_stats)
        if job.error is None:
            outcome = self._completed_outcome(job, target, result, last_stats, elapsed)
        else:
            outcome = self._failed_outcome(job, target, prep.dest_preexisting, result, last_stats, elapsed)
            if recoveries and not recoveries[-1].recovered:
                outcome = replace(outcome, reason=f"{outcome.reason}; {recoveries[-1].summary()}")
        outcome = _with_extras(outcome, prep.preflight, recoveries)
        self._log_outcome(job, target, outcome)
        return outcome

    def _completed_outcome(
        self,
        job: MigrationJob,
        target: MigrationTarget,
        result: MonitorResult,
        last_stats: dict[str, Any],
        elapsed: float,
    ) -> MigrationOutcome:
        final = {**last_stats, **self._completed_stats(job, target)}
        self._note_postcopy_requests(job, final)
        switched = job.in_postcopy  # observed (state, event or statistics), not merely requested
        downtime = final.get("downtime")
        note = ""
        if switched:
            note = " (post-copy)"
        elif job.postcopy_requested:
            note = " (post-copy requested, the switch was not observed)"
        return MigrationOutcome(
            status="completed",
            reason=f"migrated to {target.host}{note}",
            final_stats=final,
            policy=job.policy,
            elapsed_s=round(elapsed, 3),
            downtime_ms=int(downtime) if downtime is not None else None,
            switched_to_postcopy=switched,
            max_throttle_pct=max(result.max_throttle, int(final.get("auto_converge_throttle", 0) or 0)),
        )

    def _failed_outcome(
        self,
        job: MigrationJob,
        target: MigrationTarget,
        dest_preexisting: bool,
        result: MonitorResult,
        last_stats: dict[str, Any],
        elapsed: float,
    ) -> MigrationOutcome:
        assert job.error is not None
        detail = _error_detail(job.error)
        # the source's state after the failure tells whether the switch to post-copy happened
        state, state_error = read_state(job.dom)
        self._controls.note_postcopy(job, state)
        if job.abort_requested and not job.in_postcopy:
            status: Status = "aborted"
            reason = f"{job.abort_reason}; libvirt: {detail}"
        else:
            status = "failed"
            reason = f"migration failed: {detail}"
        notes = FailureRecovery(self._connect, self._log).recover(job, target, dest_preexisting, state, state_error)
        return MigrationOutcome(
            status=status,
            reason=f"{reason}; {notes}" if notes else reason,
            final_stats=last_stats,
            policy=job.policy,
            elapsed_s=round(elapsed, 3),
            downtime_ms=None,
            switched_to_postcopy=job.in_postcopy,
            max_throttle_pct=result.max_throttle,
        )

    def _log_outcome(self, job: MigrationJob, target: MigrationTarget, outcome: MigrationOutcome) -> None:
        log = self._log.info if outcome.status == "completed" else self._log.warning
        log(
            "migration %s -> %s: %s in %.1f s (%s); downtime %s ms, post-copy %s, max throttle %d%%",
            job.name,
            target.host,
            outcome.status,
            outcome.elapsed_s,
            outcome.reason,
            outcome.downtime_ms,
            outcome.switched_to_postcopy,
            outcome.max_throttle_pct,
        )

    def _note_postcopy_requests(self, job: MigrationJob, stats: Mapping[str, Any]) -> None:
        try:
            requests = int(stats.get(_POSTCOPY_REQS, 0) or 0)
        except (TypeError, ValueError):
            return
        if requests > 0 and not job.in_postcopy:
            self._log.info("migration %s: %d post-copy page requests: the job was in post-copy", job.name, requests)
            job.mark_postcopy_running()

    def _completed_stats(self, job: MigrationJob, target: MigrationTarget) -> dict[str, Any]:
        """Completed-job stats (without the job "type"): from the JOB_COMPLETED event, else from
        the source domain if libvirt still has it, else from the destination's copy of the domain."""
        stats = job.event_stats or _source_completed_stats(job) or self._destination_completed_stats(job, target)
        stats = dict(stats)
        stats.pop("type", None)
        return stats

    def _destination_completed_stats(self, job: MigrationJob, target: MigrationTarget) -> dict[str, Any]:
        try:
            conn = self._connect(target.uri)
        except AgentError as exc:
            self._log.info("migration %s: no completed stats from %s: %s", job.name, target.host, exc)
            return {}
        try:
            stats = conn.lookupByUUIDString(job.uuid).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
            return dict(stats or {})
        except libvirt.libvirtError as exc:
            _code, message = libvirt_error_details(exc)
            self._log.info("migration %s: no completed stats from %s: %s", job.name, target.host, message)
            return {}
        finally:
            close_quietly(conn)


# --- helpers --------------------------------------------------------------------------------------


def _check_instance_uuid(request: InstanceRequest, name: str, uuid: str) -> None:
    """Refuse a request written for another instance: its policy must not be applied to this one."""
    if not request.uuid:
        return
    try:
        same = _uuid.UUID(str(request.uuid)) == _uuid.UUID(uuid)
    except ValueError:
        same = False
    if not same:
        raise InvalidRequest(
            f"the request is for instance {request.uuid}, but domain {name} is instance {uuid}: refused", ["uuid"]
        )


def _destination_xml(live: str, persistent: str | None, placement: Placement | None) -> tuple[str, str]:
    """(live, persistent) XML for the destination: rewritten for `placement`, or unchanged for the
    legacy move (placement None); a transient domain's persistent definition is its live one."""
    if placement is None:
        return live, persistent or live
    dest_xml = rewrite_for_placement(live, placement)
    return dest_xml, rewrite_for_placement(persistent, placement) if persistent else dest_xml


def _lookup_or_none(conn: Any, uuid: str, what: str) -> Any:
    try:
        return conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise MigrationError.from_libvirt(what, exc) from None


def _migrate_worker(job: MigrationJob, dom: Any, dest_uri: str, params: dict, flags: int) -> None:
    try:
        dom.migrateToURI3(dest_uri, params, flags)
    except BaseException as exc:  # noqa: BLE001 - reported through the outcome
        job.error = exc
    finally:
        job.done.set()


def _on_job_completed(_conn: Any, _dom: Any, params: Any, opaque: MigrationJob) -> None:
    opaque.event_stats = dict(params or {})
    opaque.event_seen.set()
    if opaque.attached:
        opaque.done.set()


def _on_lifecycle(_conn: Any, _dom: Any, event: int, detail: int, opaque: MigrationJob) -> None:
    """Event loop thread; one-way phase changes, no lock needed."""
    if event == libvirt.VIR_DOMAIN_EVENT_STOPPED and opaque.attached:
        opaque.done.set()  # the source domain stopped: the job we follow is over
    if event != libvirt.VIR_DOMAIN_EVENT_SUSPENDED:
        return
    if detail == _POSTCOPY_SUSPEND:
        opaque.mark_postcopy_running()
    elif detail == _POSTCOPY_SUSPEND_FAILED:
        opaque.postcopy_phase = PostCopyPhase.PAUSED


def _running_stats(stats: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in stats.items() if k != "type"}  # the job type is no statistic
    # while a job runs, libvirt's "downtime" is the *expected* downtime: keep it apart
    if "downtime" in out:
        out["expected_downtime"] = out.pop("downtime")
    return out


def _error_detail(error: BaseException) -> str:
    code, message = libvirt_error_details(error)
    if isinstance(error, AgentError):  # our own words (an attached job's end), no class name needed
        message = str(error)
    elif not isinstance(error, libvirt.libvirtError):
        message = f"{type(error).__name__}: {error}"
    return f"{message} (libvirt error {code})" if code is not None else message


def _source_completed_stats(job: MigrationJob) -> dict[str, Any]:
    try:
        stats = job.dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError:
        return {}
    if stats and stats.get("type", libvirt.VIR_DOMAIN_JOB_COMPLETED) != libvirt.VIR_DOMAIN_JOB_NONE:
        return dict(stats)
    return {}


def _with_extras(
    outcome: MigrationOutcome, preflight: PreflightReport | None, recoveries: tuple[PostcopyRecovery, ...]
) -> MigrationOutcome:
    return replace(outcome, preflight=preflight, postcopy_recoveries=recoveries)
