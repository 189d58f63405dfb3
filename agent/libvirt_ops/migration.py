"""Live migration runner + monitor: start a libvirt migration job and steer it to an outcome.

``MigrationRunner.run()`` does, in order (see DESIGN.md, "A migration, end to end", step 4):

1. look the domain up, decide the policy (``policy.decide_policy``: a conflicting request raises
   before any migration call), read its migratable XML and rewrite it for the destination
   ``Placement`` (live and persistent definitions alike);
2. start ``virDomainMigrateToURI3`` in a worker thread (it blocks until the job ends);
3. in the calling thread, poll ``jobStats()`` every ``live_migration_poll_interval_s`` and
   - report ``MigrationProgress`` to the callback,
   - raise the maximum downtime in steps (``downtime_steps``, Nova's linear schedule),
   - enforce the completion timeout (``completion_timeout_s``) with the configured action,
   - switch to post-copy when the policy armed it and pre-copy is not converging
     (``ConvergenceTracker``: see "Post-copy switch trigger" below);
4. build the ``MigrationOutcome``; on failure make sure the VM still runs on the source (resume it
   if *we* paused it) and that nothing of it is left defined on the destination -- unless the job
   really was in post-copy (seen in the domain state while it ran, or the source's state after the
   failure is a post-copy one): the guest's memory is split then, both sides are left to the
   operator. A post-copy *request* alone does not count: libvirt accepts migrateStartPostCopy at
   once but switches at the next iteration, and the job may fail before that.
   ``switched_to_postcopy`` reports observed post-copy only.

Each poll makes one ``jobStats()`` and one ``state()`` call. A completion-timeout action that
failed (abortJob refused, switch to post-copy / pause failed) is retried on the next poll; after
_MAX_FORCE_COMPLETE_FAILURES failed force-completes the timeout aborts the job instead.

``abort()`` and ``force_complete()`` may be called from another thread while ``run()`` is in
progress. Abort is refused (``MigrationAbortRefused``) once post-copy has been requested or is
running: the guest already executes on the destination then. A failed abortJob raises
MigrationError and changes nothing, unless libvirt has no job: then the job already ended ("too
late", returns quietly) or has not started yet (the abort is done on the first active poll).
``force_complete()`` raises MigrationError when the switch to post-copy (or the pause) failed.

Post-copy switch trigger (only when the policy armed post-copy): pre-copy is "not converging" when,
after the first full pass over RAM (``memory_iteration >= 2``), the dirty set left at the start of
an iteration (the largest ``memory_remaining`` polled during that iteration) is still at least 90 %
of the one of the previous observed iteration (>= 2): the guest dirties memory as fast as it is sent.
The completion timeout with action ``force_complete``, and ``force_complete()``, also switch.
Without post-copy armed, force-complete pauses the guest (``suspend``) so that pre-copy can finish,
and resumes it if the migration then fails.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid as _uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

import libvirt

from agent.config import LibvirtConfig
from agent.errors import AgentError
from agent.libvirt_ops.connection import close_quietly, ensure_event_loop, lookup_domain, open_connection
from agent.libvirt_ops.domain_xml import rewrite_for_placement
from agent.libvirt_ops.errors import (
    LibvirtConnectionError,
    MigrationAbortRefused,
    MigrationError,
    NoMigrationInProgress,
    libvirt_error_details,
)
from agent.libvirt_ops.policy import MigrationPolicy, decide_policy, migration_flags, migration_params
from agent.numa.placement import Placement
from agent.numa.request import InstanceRequest, parse_request

LOG = logging.getLogger("compute_agent.migration")

Phase = Literal["precopy", "postcopy", "paused-precopy"]
Status = Literal["completed", "failed", "aborted"]

# a stalled pre-copy: an iteration's dirty set shrank by less than this fraction
NOT_CONVERGING_MIN_SHRINK = 0.10
# how long (real seconds) to wait for migrateToURI3 to return once the job is seen finished
_FINISH_WAIT_S = 30.0

# a failed force-complete (switch to post-copy / pause) at the completion timeout is retried on the
# next polls; after this many failures the timeout falls back to aborting the job
_MAX_FORCE_COMPLETE_FAILURES = 3

# source lifecycle event details (event SUSPENDED) sent when the job switched to post-copy
_POSTCOPY_SUSPEND_DETAILS = (
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY,
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY_FAILED,
)
# jobStats key: pages the destination requested during post-copy (> 0 proves the switch happened)
_POSTCOPY_REQS = libvirt.VIR_DOMAIN_JOB_MEMORY_POSTCOPY_REQS

_UNREAD: Any = object()  # "the caller did not read the domain state"

_ACTIVE_JOB_TYPES = (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED)
# (state, reason) pairs of a domain whose migration is in post-copy, or failed in post-copy (the
# guest's memory is then split between the hosts). libvirt accepts migrateStartPostCopy at once but
# switches at the next iteration: only these states (or observing one while the job ran) mean that
# the switch really happened.
_POSTCOPY_STATES = frozenset(
    (
        (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY),
        (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED),
        (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY),
        (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY_FAILED),
    )
)


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
class MigrationProgress:
    phase: Phase
    percent: float  # 0..100, (total - remaining) / total
    memory_total: int  # bytes
    memory_processed: int  # bytes sent so far (can exceed total: pages are resent)
    memory_remaining: int  # bytes
    dirty_rate_pps: int  # pages dirtied per second (memory_dirty_rate)
    iteration: int  # memory_iteration: 1 = first pass over RAM
    max_downtime_ms: int  # the max downtime currently set (0 = not set yet)
    throttle_pct: int  # auto_converge_throttle
    elapsed_s: float


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


# --- schedules ------------------------------------------------------------------------------------


def _data_gib(memory_mb: int | float) -> float:
    """GiB of guest RAM to transfer, at least 1 (small guests still get sane delays)."""
    return max(float(memory_mb) / 1024.0, 1.0)


def downtime_steps(cfg: LibvirtConfig, memory_mb: int | float) -> list[tuple[float, int]]:
    """[(seconds after start, max downtime ms)], Nova's linear schedule.

    ``steps`` increases from ``downtime/steps`` to ``downtime`` (= live_migration_downtime_ms), one
    every ``live_migration_downtime_delay_s`` x GiB of RAM (min 1 GiB). E.g. 500 ms, 10 steps,
    75 s/GiB, 2 GiB: 0 s -> 50 ms, 150 s -> 95 ms, 300 s -> 140 ms, ..., 1500 s -> 500 ms.
    """
    downtime = cfg.live_migration_downtime_ms
    steps = max(int(cfg.live_migration_downtime_steps), 1)
    delay = cfg.live_migration_downtime_delay_s * _data_gib(memory_mb)
    base = downtime / steps
    offset = (downtime - base) / steps
    return [(delay * i, max(int(base + offset * i), 1)) for i in range(steps + 1)]


def downtime_for(steps: list[tuple[float, int]], elapsed_s: float) -> int | None:
    """The step value in force at `elapsed_s` (None before the first marker)."""
    value: int | None = None
    for at, ms in steps:
        if elapsed_s >= at:
            value = ms
    return value


def completion_timeout_s(cfg: LibvirtConfig, memory_mb: int | float) -> float | None:
    """live_migration_completion_timeout_s x GiB of RAM (min 1 GiB); None = no timeout."""
    if cfg.live_migration_completion_timeout_s <= 0:
        return None
    return cfg.live_migration_completion_timeout_s * _data_gib(memory_mb)


class ConvergenceTracker:
    """Decides that pre-copy is not converging (see the module docstring).

    Feed it every polled (memory_iteration, memory_remaining); ``observe`` returns True once the
    dirty set stopped shrinking by at least `min_shrink` between two observed iterations >= 2.
    """

    def __init__(self, min_shrink: float = NOT_CONVERGING_MIN_SHRINK) -> None:
        self.min_shrink = min_shrink
        self._current: int | None = None
        self._current_max = 0
        self._done: list[tuple[int, int]] = []  # (iteration, max remaining) of finished iterations
        self.stalled = False
        self.why = ""

    def observe(self, iteration: int, remaining: int) -> bool:
        if self.stalled:
            return True
        if iteration < 2:  # first pass over RAM: nothing to judge yet
            return False
        if self._current is None or iteration > self._current:
            if self._current is not None:
                self._done.append((self._current, self._current_max))
            self._current, self._current_max = iteration, remaining
            if len(self._done) >= 2:
                (it_a, prev), (it_b, last) = self._done[-2], self._done[-1]
                if prev > 0 and last >= (1.0 - self.min_shrink) * prev:
                    self.stalled = True
                    self.why = (
                        f"pre-copy not converging: dirty set {last >> 20} MiB at iteration {it_b} "
                        f"vs {prev >> 20} MiB at iteration {it_a} (shrank < {self.min_shrink:.0%})"
                    )
                    return True
        elif iteration == self._current:
            self._current_max = max(self._current_max, remaining)
        return False


def progress_from_stats(
    stats: Mapping[str, Any], *, phase: Phase, max_downtime_ms: int, elapsed_s: float
) -> MigrationProgress:
    """MigrationProgress from a ``jobStats()`` dict (missing keys count as 0)."""

    def num(key: str) -> int:
        try:
            return int(stats.get(key, 0) or 0)
        except (TypeError, ValueError):
            return 0

    total, processed, remaining = num("memory_total"), num("memory_processed"), num("memory_remaining")
    if total > 0:
        done = total - remaining if "memory_remaining" in stats else processed
        percent = min(max(done * 100.0 / total, 0.0), 100.0)
    else:
        percent = 0.0
    return MigrationProgress(
        phase=phase,
        percent=round(percent, 2),
        memory_total=total,
        memory_processed=processed,
        memory_remaining=remaining,
        dirty_rate_pps=num("memory_dirty_rate"),
        iteration=num("memory_iteration"),
        max_downtime_ms=max_downtime_ms,
        throttle_pct=num("auto_converge_throttle"),
        elapsed_s=round(elapsed_s, 3),
    )


# --- the runner -----------------------------------------------------------------------------------


@dataclass
class _Job:
    dom: Any
    name: str
    uuid: str
    policy: Any
    domain_paused_at_start: bool
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    postcopy_requested: bool = False  # migrateStartPostCopy succeeded (libvirt switches later)
    in_postcopy: bool = False  # post-copy observed in the domain state: the switch happened
    paused_by_us: bool = False
    seen_active: bool = False  # the monitor has seen libvirt's job active
    abort_requested: bool = False  # set only once abortJob() succeeded
    abort_reason: str = ""
    abort_pending: str = ""  # abort() came before libvirt started the job: abort on the first active poll
    timeout_fired: bool = False  # the completion-timeout action was carried out
    force_failures: int = 0  # failed force-complete attempts at the completion timeout
    last_switch_error: str = ""  # libvirt's message for the last failed migrateStartPostCopy
    last_force_error: str = ""
    # final statistics delivered by the JOB_COMPLETED event on the job connection
    event_stats: dict[str, Any] | None = None
    event_seen: threading.Event = field(default_factory=threading.Event)
    event_registered: bool = False

    @property
    def postcopy(self) -> bool:
        """Post-copy requested or running: abort is refused and no pre-copy tuning is done. Not
        proof that the switch happened (see `in_postcopy`)."""
        return self.postcopy_requested or self.in_postcopy


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
        self._job: _Job | None = None

    # -- public API ------------------------------------------------------------------------------

    def run(
        self,
        domain_name_or_uuid: str,
        target: MigrationTarget,
        placement: Placement,
        request: InstanceRequest | Mapping[str, Any],
        on_progress: Callable[[MigrationProgress], None] | None = None,
    ) -> MigrationOutcome:
        """Migrate the domain to `target` with `placement`; blocks until the job ends.

        `request` is the parsed InstanceRequest, or the instance metadata document (uuid, vcpus,
        memory_mb, extra_specs, image_properties), parsed here first so that a contradictory
        request is refused before any libvirt call.

        Raises (before any migration call): InvalidRequest (incl. policy conflicts), DomainNotFound,
        LibvirtConnectionError, DomainXMLError, MigrationError. Once the job is started every
        problem is reported in the returned MigrationOutcome instead.
        """
        if not self._run_lock.acquire(blocking=False):
            raise MigrationError("a migration is already running on this runner")
        try:
            return self._run(domain_name_or_uuid, target, placement, request, on_progress)
        finally:
            self._run_lock.release()

    def abort(self) -> None:
        """Cancel the running migration (the VM stays on the source).

        Raises MigrationAbortRefused once post-copy was requested or is running, and
        NoMigrationInProgress when there is nothing to abort."""
        with self._lock:
            job = self._require_job("abort")
            self._note_postcopy(job, self._read_state(job))
            if job.postcopy:
                raise MigrationAbortRefused(
                    f"migration of {job.name} is in post-copy: the guest already runs on the destination, "
                    "it cannot be aborted (force it to complete or wait)"
                )
            self._abort(job, "aborted on request")

    def force_complete(self) -> str:
        """Make the running migration finish now: switch to post-copy when the policy armed it,
        else pause the guest so pre-copy completes. Returns the action taken
        ("postcopy", "paused", or "none" when already in post-copy / already paused).

        Raises MigrationError when the switch to post-copy (or the pause) failed: nothing was
        done then, the job goes on in pre-copy."""
        with self._lock:
            job = self._require_job("force_complete")
            return self._force_complete(job, "force-complete requested")

    # -- run -------------------------------------------------------------------------------------

    def _run(
        self,
        domain: str,
        target: MigrationTarget,
        placement: Placement,
        request: InstanceRequest | Mapping[str, Any],
        on_progress: Callable[[MigrationProgress], None] | None,
    ) -> MigrationOutcome:
        if not isinstance(request, InstanceRequest):
            request = parse_request(request)  # InvalidRequest before any libvirt call

        cfg = self._cfg
        dom = lookup_domain(self._conn, domain)
        try:
            name = dom.name()
            uuid = dom.UUIDString()
            state, _reason = dom.state()
        except libvirt.libvirtError as exc:
            raise MigrationError.from_libvirt(f"reading domain {domain!r}", exc) from None
        if state not in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED):
            raise MigrationError(f"domain {name} is not running (state {state}): nothing to live-migrate")
        paused = state == libvirt.VIR_DOMAIN_PAUSED

        policy = decide_policy(request.migration, cfg, domain_paused=paused)
        self._log.info(
            "migration %s -> %s: policy auto_converge=%s post_copy=%s (%s)",
            name,
            target.host,
            policy.auto_converge,
            policy.post_copy,
            policy.reason,
        )

        base_flags = libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE
        try:
            live = dom.XMLDesc(base_flags)
            persistent_src = dom.XMLDesc(base_flags | libvirt.VIR_DOMAIN_XML_INACTIVE) if dom.isPersistent() else None
            memory_kib = int(dom.maxMemory())
        except libvirt.libvirtError as exc:
            raise MigrationError.from_libvirt(f"reading the XML of {name}", exc) from None
        dest_xml = rewrite_for_placement(live, placement)
        persistent_xml = rewrite_for_placement(persistent_src, placement) if persistent_src else dest_xml
        flags = migration_flags(policy)
        params = migration_params(
            policy, dest_xml=dest_xml, persistent_xml=persistent_xml, migrate_uri=target.migrate_uri, cfg=cfg
        )
        memory_mb = memory_kib / 1024.0 if memory_kib > 0 else float(request.memory_mb)
        steps = downtime_steps(cfg, memory_mb)
        timeout = completion_timeout_s(cfg, memory_mb)
        self._log.info(
            "migration %s: %d MiB RAM, downtime steps %s, completion timeout %s, timeout action %s, "
            "bandwidth %s MiB/s, flags %#x",
            name,
            round(memory_mb),
            ", ".join(f"{at:.0f}s:{ms}ms" for at, ms in steps),
            f"{timeout:.0f}s" if timeout else "none",
            cfg.live_migration_timeout_action,
            cfg.live_migration_bandwidth_mib or "unlimited",
            flags,
        )
        dest_preexisting = self._check_destination(target, uuid, name)

        job = _Job(dom=dom, name=name, uuid=uuid, policy=policy, domain_paused_at_start=paused)
        job_conn, job_dom, event_ids = self._job_connection(job)
        with self._lock:
            self._job = job
        worker = threading.Thread(
            target=self._migrate_worker,
            args=(job, job_dom, target.uri, params, flags),
            name=f"migrate-{name}",
            daemon=True,
        )
        start = self._clock()
        self._log.info("migration %s -> %s (%s): starting", name, target.host, target.uri)
        worker.start()
        try:
            last_stats, max_throttle = self._monitor(job, start, steps, timeout, on_progress)
            worker.join()
            elapsed = self._clock() - start
            if job.error is None and job.event_registered:
                job.event_seen.wait(2.0)  # the event may trail migrateToURI3's return a little
        finally:
            if worker.is_alive():  # the monitor itself failed (a bug, KeyboardInterrupt): do not leave a job behind
                self._log.error("migration %s: monitor stopped while the job runs; aborting it", name)
                try:
                    dom.abortJob()
                except libvirt.libvirtError:
                    pass
                worker.join(60.0)
            with self._lock:
                self._job = None
            for event_id in event_ids:
                try:
                    job_conn.domainEventDeregisterAny(event_id)
                except libvirt.libvirtError:
                    pass
            close_quietly(job_conn)
        return self._outcome(job, target, policy, last_stats, max_throttle, elapsed, dest_preexisting)

    def _job_connection(self, job: _Job) -> tuple[Any, Any, list[int]]:
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
            uri = self._conn.getURI()
        except libvirt.libvirtError as exc:
            raise MigrationError.from_libvirt("reading the source connection URI", exc) from None
        events = self._events and ensure_event_loop()
        conn = self._connect(uri)
        try:
            dom = conn.lookupByUUIDString(job.uuid)
        except libvirt.libvirtError as exc:
            close_quietly(conn)
            raise MigrationError.from_libvirt(f"looking up {job.name} on a job connection", exc) from None
        event_ids: list[int] = []
        if events and hasattr(conn, "domainEventRegisterAny"):

            def on_completed(_conn: Any, _dom: Any, params: Any, opaque: _Job) -> None:
                opaque.event_stats = dict(params or {})
                opaque.event_seen.set()

            def on_lifecycle(_conn: Any, _dom: Any, event: int, detail: int, opaque: _Job) -> None:
                if event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED and detail in _POSTCOPY_SUSPEND_DETAILS:
                    opaque.in_postcopy = True  # a one-way flag: no lock needed (event loop thread)

            try:
                event_ids.append(
                    conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, on_completed, job)
                )
                job.event_registered = True
            except libvirt.libvirtError as exc:
                _code, message = libvirt_error_details(exc)
                self._log.info("migration %s: no JOB_COMPLETED events: %s", job.name, message)
            try:
                event_ids.append(
                    conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, job)
                )
            except libvirt.libvirtError as exc:
                _code, message = libvirt_error_details(exc)
                self._log.info("migration %s: no lifecycle events: %s", job.name, message)
        return conn, dom, event_ids

    def _migrate_worker(self, job: _Job, dom: Any, dest_uri: str, params: dict, flags: int) -> None:
        try:
            dom.migrateToURI3(dest_uri, params, flags)
        except BaseException as exc:  # noqa: BLE001 - reported through the outcome
            job.error = exc
        finally:
            job.done.set()

    def _monitor(
        self,
        job: _Job,
        start: float,
        steps: list[tuple[float, int]],
        timeout: float | None,
        on_progress: Callable[[MigrationProgress], None] | None,
    ) -> tuple[dict[str, Any], int]:
        interval = self._cfg.live_migration_poll_interval_s
        tracker = ConvergenceTracker()
        last_stats: dict[str, Any] = {}
        downtime_ms: int | None = None
        max_throttle = 0
        while not job.done.is_set():
            stats = self._job_stats(job)
            elapsed = self._clock() - start
            active = stats is not None and stats.get("type") in _ACTIVE_JOB_TYPES
            if active:
                last_stats = dict(stats)
                max_throttle = max(max_throttle, int(stats.get("auto_converge_throttle", 0) or 0))
                with self._lock:
                    job.seen_active = True
                    state = self._read_state(job)  # the poll's only dom.state() call
                    self._note_postcopy(job, state)
                    if job.abort_pending and not job.postcopy and not job.abort_requested:
                        reason, job.abort_pending = job.abort_pending, ""
                        try:
                            self._abort(job, reason)
                        except MigrationError as exc:
                            self._log.error("migration %s: %s", job.name, exc)
                    if not job.postcopy and not job.abort_requested:
                        downtime_ms = self._step_downtime(job, steps, elapsed, downtime_ms)
                        try:
                            if timeout is not None and elapsed > timeout and not job.timeout_fired:
                                # False (or MigrationError): not carried out, retried on the next poll
                                job.timeout_fired = self._timeout_action(job, timeout, elapsed, state)
                            elif job.policy.post_copy and tracker.observe(
                                int(stats.get("memory_iteration", 0) or 0),
                                int(stats.get("memory_remaining", 0) or 0),
                            ):
                                self._log.info("migration %s: %s", job.name, tracker.why)
                                self._switch_to_postcopy(job, "not converging")  # retried next poll if it fails
                        except MigrationError as exc:  # keep monitoring: the job is still running
                            self._log.error("migration %s: %s", job.name, exc)
                    phase = self._phase(job, state)
                if on_progress is not None:
                    progress = progress_from_stats(
                        stats, phase=phase, max_downtime_ms=downtime_ms or 0, elapsed_s=elapsed
                    )
                    try:
                        on_progress(progress)
                    except Exception:  # noqa: BLE001 - a broken listener must not break the migration
                        self._log.exception("migration %s: progress callback failed", job.name)
            elif job.seen_active:
                # the job is over on the source: migrateToURI3 returns shortly
                if job.done.wait(_FINISH_WAIT_S):
                    break
            if job.done.is_set():
                break
            if self._sleep is time.sleep:
                job.done.wait(interval)  # same pacing, but notices the end of the job at once
            else:
                self._sleep(interval)
        return last_stats, max_throttle

    def _job_stats(self, job: _Job) -> dict[str, Any] | None:
        try:
            return job.dom.jobStats(0)
        except libvirt.libvirtError as exc:
            code, message = libvirt_error_details(exc)
            self._log.debug("migration %s: jobStats failed: %s (libvirt error %s)", job.name, message, code)
            return None

    # -- decisions (called with self._lock held) -------------------------------------------------

    def _read_state(self, job: _Job) -> tuple[int, int] | None:
        """The domain's (state, reason), None when it cannot be read."""
        try:
            state, reason = job.dom.state()
        except libvirt.libvirtError as exc:
            code, message = libvirt_error_details(exc)
            self._log.debug(
                "migration %s: reading the domain state failed: %s (libvirt error %s)", job.name, message, code
            )
            return None
        return int(state), int(reason)

    def _phase(self, job: _Job, state: tuple[int, int] | None) -> Phase:
        if job.in_postcopy:
            return "postcopy"
        if job.paused_by_us or (state is not None and state[0] == libvirt.VIR_DOMAIN_PAUSED):
            return "paused-precopy"
        return "precopy"

    def _note_postcopy(self, job: _Job, state: tuple[int, int] | None) -> None:
        """Learn from the domain state whether the job is in post-copy (also when someone else
        switched it, e.g. `virsh migrate-postcopy`): jobStats has no phase before libvirt 10."""
        if job.in_postcopy or state is None:
            return
        if state in _POSTCOPY_STATES:
            self._log.info(
                "migration %s: the job is in post-copy (domain state %s/%s)%s",
                job.name,
                state[0],
                state[1],
                "" if job.postcopy_requested else ", switched by someone else",
            )
            job.in_postcopy = True

    def _step_downtime(
        self, job: _Job, steps: list[tuple[float, int]], elapsed: float, current: int | None
    ) -> int | None:
        wanted = downtime_for(steps, elapsed)
        if wanted is None or wanted == current:
            return current
        self._log.info("migration %s: max downtime -> %d ms after %.1f s", job.name, wanted, elapsed)
        try:
            job.dom.migrateSetMaxDowntime(wanted, 0)
        except libvirt.libvirtError as exc:
            _code, message = libvirt_error_details(exc)
            self._log.warning("migration %s: could not set max downtime %d ms: %s", job.name, wanted, message)
        return wanted

    def _timeout_action(self, job: _Job, timeout: float, elapsed: float, state: tuple[int, int] | None) -> bool:
        """Carry out the completion-timeout action. True once done; False or MigrationError when
        it was not (the monitor retries on the next poll). A force-complete that failed
        _MAX_FORCE_COMPLETE_FAILURES times falls back to aborting the job."""
        action = self._cfg.live_migration_timeout_action
        self._log.warning(
            "migration %s: not completed after %.1f s (completion timeout %.0f s): action %s",
            job.name,
            elapsed,
            timeout,
            action,
        )
        abort_reason = f"completion timeout: not completed within {timeout:.0f}s"
        if action == "force_complete" and job.force_failures < _MAX_FORCE_COMPLETE_FAILURES:
            try:
                self._force_complete(job, f"completion timeout {timeout:.0f}s", state)
                return True
            except MigrationError as exc:
                job.force_failures += 1
                job.last_force_error = str(exc)
                if job.force_failures < _MAX_FORCE_COMPLETE_FAILURES:
                    self._log.error(
                        "migration %s: force-complete failed (attempt %d of %d), retrying: %s",
                        job.name,
                        job.force_failures,
                        _MAX_FORCE_COMPLETE_FAILURES,
                        exc,
                    )
                    return False
                self._log.error(
                    "migration %s: force-complete failed %d times (%s): aborting the job instead",
                    job.name,
                    job.force_failures,
                    exc,
                )
        if action == "force_complete":  # here only after the force-complete attempts failed
            abort_reason += f", and force-complete failed {job.force_failures} times ({job.last_force_error})"
        self._abort(job, abort_reason)  # MigrationError: not aborted, retried on the next poll
        return True

    def _abort(self, job: _Job, reason: str) -> None:
        """abortJob(). `abort_requested` is set only once it succeeded. When it fails because
        libvirt has no job: returns quietly if the job already ended ("too late"), or arms
        `abort_pending` if the job was not seen active yet (the monitor aborts it on its first
        active poll). Any other failure raises MigrationError and changes nothing."""
        self._log.warning("migration %s: aborting the job (%s)", job.name, reason)
        try:
            job.dom.abortJob()
        except libvirt.libvirtError as exc:
            if job.done.is_set() or self._no_job(job):
                if job.done.is_set() or job.seen_active:
                    self._log.info("migration %s: abort came too late, the job had ended", job.name)
                else:
                    self._log.info(
                        "migration %s: the job has not started yet; it will be aborted as soon as it runs", job.name
                    )
                    job.abort_pending = reason
                return
            raise MigrationError.from_libvirt(f"aborting the migration of {job.name}", exc) from None
        job.abort_requested = True
        job.abort_reason = reason
        job.abort_pending = ""

    def _no_job(self, job: _Job) -> bool:
        """True when libvirt has no job on the domain (jobStats type NONE, or the domain is gone)."""
        try:
            stats = job.dom.jobStats(0)
        except libvirt.libvirtError as exc:
            return exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
        return not stats or stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE

    def _force_complete(self, job: _Job, why: str, state: Any = _UNREAD) -> str:
        """Switch to post-copy (policy armed it) or pause the guest. `state`: the domain state the
        caller just read, if any. Raises MigrationError when the action failed."""
        if state is _UNREAD:
            state = self._read_state(job)
        self._note_postcopy(job, state)
        if job.postcopy:
            self._log.info("migration %s: force-complete (%s): already in post-copy", job.name, why)
            return "none"
        if job.policy.post_copy:
            if self._switch_to_postcopy(job, why):
                return "postcopy"
            raise MigrationError(f"switching the migration of {job.name} to post-copy failed: {job.last_switch_error}")
        if state is None:
            try:
                state = tuple(job.dom.state())
            except libvirt.libvirtError as exc:
                raise MigrationError.from_libvirt(f"reading the state of {job.name}", exc) from None
        if state[0] == libvirt.VIR_DOMAIN_PAUSED:
            self._log.info("migration %s: force-complete (%s): guest already paused", job.name, why)
            return "none"
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
        return "paused"

    def _switch_to_postcopy(self, job: _Job, why: str) -> bool:
        """migrateStartPostCopy; True when libvirt accepted the request (it switches at the next
        iteration: `in_postcopy` is set once the domain state shows it). False on failure (logged,
        message in `job.last_switch_error`)."""
        self._log.warning("migration %s: switching to post-copy (%s)", job.name, why)
        try:
            job.dom.migrateStartPostCopy(0)
        except libvirt.libvirtError as exc:
            _code, message = libvirt_error_details(exc)
            job.last_switch_error = message
            self._log.warning("migration %s: switch to post-copy failed: %s", job.name, message)
            return False
        job.postcopy_requested = True
        return True

    def _require_job(self, what: str) -> _Job:
        job = self._job
        if job is None or job.done.is_set():
            raise NoMigrationInProgress(f"{what}: no migration in progress")
        return job

    # -- destination checks and outcome ------------------------------------------------------------

    def _check_destination(self, target: MigrationTarget, uuid: str, name: str) -> bool:
        """True when the destination already has a (defined, inactive) domain with this UUID; refuse
        when it is running there."""
        conn = self._connect(target.uri)
        try:
            try:
                other = conn.lookupByUUIDString(uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return False
                raise MigrationError.from_libvirt(f"checking {target.host} for {name}", exc) from None
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

    def _outcome(
        self,
        job: _Job,
        target: MigrationTarget,
        policy: Any,
        last_stats: dict[str, Any],
        max_throttle: int,
        elapsed: float,
        dest_preexisting: bool,
    ) -> MigrationOutcome:
        last_stats = {k: v for k, v in last_stats.items() if k != "type"}  # the job type is no statistic
        # while a job runs, libvirt's "downtime" is the *expected* downtime: keep it apart
        if "downtime" in last_stats:
            last_stats["expected_downtime"] = last_stats.pop("downtime")
        self._note_postcopy_requests(job, last_stats)
        if job.error is None:
            final = {**last_stats, **self._completed_stats(job, target)}
            self._note_postcopy_requests(job, final)
            switched = job.in_postcopy  # observed (state, event or statistics), not merely requested
            downtime = final.get("downtime")
            max_throttle = max(max_throttle, int(final.get("auto_converge_throttle", 0) or 0))
            note = ""
            if switched:
                note = " (post-copy)"
            elif job.postcopy_requested:
                note = " (post-copy requested, the switch was not observed)"
            outcome = MigrationOutcome(
                status="completed",
                reason=f"migrated to {target.host}{note}",
                final_stats=final,
                policy=policy,
                elapsed_s=round(elapsed, 3),
                downtime_ms=int(downtime) if downtime is not None else None,
                switched_to_postcopy=switched,
                max_throttle_pct=max_throttle,
            )
        else:
            code, message = libvirt_error_details(job.error)
            if not isinstance(job.error, libvirt.libvirtError):
                message = f"{type(job.error).__name__}: {job.error}"
            detail = f"{message} (libvirt error {code})" if code is not None else message
            # the source's state after the failure tells whether the switch to post-copy happened
            state, state_error = self._state_after_failure(job)
            self._note_postcopy(job, state)
            if job.abort_requested and not job.in_postcopy:
                status: Status = "aborted"
                reason = f"{job.abort_reason}; libvirt: {detail}"
            else:
                status = "failed"
                reason = f"migration failed: {detail}"
            notes = self._recover(job, target, dest_preexisting, state, state_error)
            if notes:
                reason = f"{reason}; {notes}"
            outcome = MigrationOutcome(
                status=status,
                reason=reason,
                final_stats=last_stats,
                policy=policy,
                elapsed_s=round(elapsed, 3),
                downtime_ms=None,
                switched_to_postcopy=job.in_postcopy,
                max_throttle_pct=max_throttle,
            )
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
        return outcome

    def _note_postcopy_requests(self, job: _Job, stats: Mapping[str, Any]) -> None:
        try:
            requests = int(stats.get(_POSTCOPY_REQS, 0) or 0)
        except (TypeError, ValueError):
            return
        if requests > 0 and not job.in_postcopy:
            self._log.info("migration %s: %d post-copy page requests: the job was in post-copy", job.name, requests)
            job.in_postcopy = True

    def _state_after_failure(self, job: _Job) -> tuple[tuple[int, int] | None, str]:
        """The source domain's (state, reason) after a failed job, or (None, libvirt's message)."""
        try:
            state, reason = job.dom.state()
        except libvirt.libvirtError as exc:
            _code, message = libvirt_error_details(exc)
            return None, message
        return (int(state), int(reason)), ""

    def _completed_stats(self, job: _Job, target: MigrationTarget) -> dict[str, Any]:
        """Completed-job stats (without the job "type"): from the JOB_COMPLETED event, else from
        the source domain if libvirt still has it, else from the destination's copy of the domain."""
        stats = self._completed_stats_raw(job, target)
        stats.pop("type", None)
        return stats

    def _completed_stats_raw(self, job: _Job, target: MigrationTarget) -> dict[str, Any]:
        if job.event_stats:
            return dict(job.event_stats)
        flag = libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED
        try:
            stats = job.dom.jobStats(flag)
            if stats and stats.get("type", libvirt.VIR_DOMAIN_JOB_COMPLETED) != libvirt.VIR_DOMAIN_JOB_NONE:
                return dict(stats)
        except libvirt.libvirtError:
            pass
        try:
            conn = self._connect(target.uri)
        except AgentError as exc:
            self._log.info("migration %s: no completed stats from %s: %s", job.name, target.host, exc)
            return {}
        try:
            stats = conn.lookupByUUIDString(job.uuid).jobStats(flag)
            return dict(stats or {})
        except libvirt.libvirtError as exc:
            _code, message = libvirt_error_details(exc)
            self._log.info("migration %s: no completed stats from %s: %s", job.name, target.host, message)
            return {}
        finally:
            close_quietly(conn)

    def _recover(
        self,
        job: _Job,
        target: MigrationTarget,
        dest_preexisting: bool,
        source_state: tuple[int, int] | None,
        state_error: str,
    ) -> str:
        """After a failed/aborted job: the VM must run on the source and nothing of it may be left
        defined on the destination. Returns notes for the outcome reason ("" when all is well).

        Hands off (both sides left for the operator) only when the switch to post-copy really
        happened: post-copy observed while the job ran, or the source's state after the failure is
        a post-copy one (`_note_postcopy` set `in_postcopy` then). A post-copy *request* alone
        does not count: if the job failed before libvirt switched, the guest still runs on the
        source and the destination may hold a leftover to clean up. If the request was made and the
        source state cannot be read, nothing is touched either."""
        notes: list[str] = []
        if job.in_postcopy:
            self._log.error(
                "migration %s: failed after the switch to post-copy: the guest's memory is split between "
                "the hosts; leaving both sides as they are for the operator",
                job.name,
            )
            return "failed in post-copy: guest state is split between source and destination, operator action needed"
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
        # source
        if source_state is None:
            notes.append(f"cannot check the source domain: {state_error}")
            self._log.error("migration %s: cannot check the source domain after the failure: %s", job.name, state_error)
        else:
            try:
                state, reason = source_state
                if state == libvirt.VIR_DOMAIN_PAUSED and (job.paused_by_us or not job.domain_paused_at_start):
                    self._log.warning(
                        "migration %s: resuming the guest on the source (paused by us: %s, reason %s)",
                        job.name,
                        job.paused_by_us,
                        reason,
                    )
                    job.dom.resume()
                    state, _ = job.dom.state()
                if state != libvirt.VIR_DOMAIN_RUNNING and not (
                    state == libvirt.VIR_DOMAIN_PAUSED and job.domain_paused_at_start
                ):
                    notes.append(f"source domain in state {state}, not running")
                    self._log.error("migration %s: after the failure the source domain is in state %s", job.name, state)
                else:
                    self._log.info("migration %s: guest still runs on the source", job.name)
            except libvirt.libvirtError as exc:
                _code, message = libvirt_error_details(exc)
                notes.append(f"cannot check the source domain: {message}")
                self._log.error("migration %s: cannot check the source domain after the failure: %s", job.name, message)
        # destination
        try:
            conn = self._connect(target.uri)
        except LibvirtConnectionError as exc:
            notes.append(f"cannot check {target.host}: {exc}")
            self._log.error("migration %s: cannot check the destination for leftovers: %s", job.name, exc)
            return "; ".join(notes)
        try:
            try:
                leftover = conn.lookupByUUIDString(job.uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    self._log.info("migration %s: nothing left on %s", job.name, target.host)
                    return "; ".join(notes)
                raise
            if _uuid.UUID(leftover.UUIDString()) != _uuid.UUID(job.uuid):  # paranoia: only our UUID
                return "; ".join(notes)
            if leftover.isActive():
                notes.append(f"a running copy is still on {target.host}")
                self._log.error("migration %s: a running copy is still on %s; not touching it", job.name, target.host)
            elif dest_preexisting:
                self._log.info(
                    "migration %s: the inactive definition on %s predates the migration; kept", job.name, target.host
                )
            elif leftover.isPersistent():
                self._log.warning(
                    "migration %s: undefining the leftover inactive definition on %s", job.name, target.host
                )
                leftover.undefine()
        except libvirt.libvirtError as exc:
            _code, message = libvirt_error_details(exc)
            notes.append(f"cannot clean up {target.host}: {message}")
            self._log.error("migration %s: cannot clean up %s: %s", job.name, target.host, message)
        finally:
            close_quietly(conn)
        return "; ".join(notes)
