"""The source side of the daemon: `describe_instance`, `live_migrate` (in the background, behind the
outbound limit), `abort_migration`, `force_complete`, `migration_status` (docs/protocol.md 5.2-5.4).

A migration's life here (its durable record: agent.daemon.migrations):

    live_migrate ─ checks (NotFound / Conflict / InvalidRequest / Busy) ─ queued
      └ a slot frees ([DEFAULT] max_concurrent_live_migrations) ─ preparing ─ running (the runner's
        first progress) ─ completed | failed | aborted
      └ settle the destination's claim (confirm on completion, release otherwise; bounded retries)
      └ `migration.<id>.done`

Progress goes out as `migration.<id>.progress` at most every `[bus] progress_interval_s`, with a
percent that never goes down. A queued migration aborted leaves nothing anywhere (its claim is
released); a preparing one is aborted as soon as libvirt's job exists. Idempotent by migration id:
a repeated `live_migrate` answers `accepted` again and never starts a second job. After a restart
agent.daemon.source_recovery takes up what the record says was running (`start()`).

The libvirt side is `MigrationRunner` (agent.libvirt_ops.migration) behind the `Runner` seam, so
tests and the fleet bench drive the same code with a fake.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

import libvirt

from agent.bus.errors import (
    BusError,
    RemoteBusy,
    RemoteConflict,
    RemoteError,
    RemoteInvalidRequest,
    RemoteNotFound,
    RemoteRefused,
)
from agent.bus.schemas import (
    DescribeInstanceBody,
    LiveMigrateBody,
    LiveMigrateBodyV10,
    MigrationIdBody,
)
from agent.daemon.metrics import RunningMigration
from agent.daemon.migrations import MigrationRecord, MigrationStore
from agent.daemon.source_model import (
    WIRE_PHASES,
    Ending,
    Flight,
    InstanceView,
    Runner,
    RunnerFactory,
    default_runner,
    ending_from_outcome,
    has_numa_topology,
    numa_workaround,
    policy_view,
    progress_body,
    state_word,
)
from agent.errors import AgentError, InvalidInput
from agent.libvirt_ops.connection import close_quietly, lookup_domain, open_connection
from agent.libvirt_ops.domain_read import parse_domain
from agent.libvirt_ops.domain_rewrite import check_matches
from agent.libvirt_ops.errors import (
    DomainNotFound,
    LibvirtOpError,
    MigrationAbortRefused,
    MigrationError,
    NoMigrationInProgress,
)
from agent.libvirt_ops.instance_metadata import InstanceMetadata, read_instance_metadata
from agent.libvirt_ops.migration import ForceCompleteAction, MigrationProgress, MigrationTarget
from agent.libvirt_ops.policy import MigrationPolicy, decide_policy
from agent.log import log_context
from agent.numa.placement import Placement
from agent.numa.request import InstanceRequest

if TYPE_CHECKING:
    from agent.bus.rpc import RpcServer
    from agent.daemon.context import AgentContext

log = logging.getLogger("compute_agent.source")

MAX_QUEUED = 256  # accepted migrations waiting for a slot: a drain of the largest host; beyond: Busy
BUSY_RETRY_S = 30.0  # a queue that full drains in minutes, not seconds
CLAIM_CALL_DELAYS_S = (0.0, 1.0, 2.0, 4.0, 8.0)  # ~15 s of retries; the destination confirms alone anyway
CLAIM_CALL_TIMEOUT_S = 10.0
# what a live migration can move
_LIVE_STATES = frozenset({libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED, libvirt.VIR_DOMAIN_PAUSED})


# --- the role -------------------------------------------------------------------------------------


class Source:
    """The source role (agent.daemon.context.Role)."""

    def __init__(
        self,
        ctx: AgentContext,
        *,
        store: MigrationStore | None = None,
        runner_factory: RunnerFactory = default_runner,
        sleep: Callable[[float], None] = time.sleep,
        recover: bool = True,
        connect: Callable[[str], Any] = open_connection,
    ) -> None:
        self.ctx = ctx
        self._store = store
        self._runner_factory = runner_factory
        self._sleep = sleep
        self._recover = recover
        self._connect = connect
        self.recovered = threading.Event()  # set once the restart recovery looked at every record
        self._lock = threading.Lock()
        self._flights: dict[str, Flight] = {}
        self._queue: collections.deque[str] = collections.deque()
        self._running = 0
        self._stopping = False

    @property
    def store(self) -> MigrationStore:
        if self._store is None:
            self._store = MigrationStore.open(self.ctx.cfg.claims.state_dir, clock=self.ctx.clock)
        return self._store

    # --- Role ---------------------------------------------------------------------------------------

    def register(self, server: RpcServer) -> None:
        server.register("describe_instance", self.describe_instance, since="1.0", body_type=DescribeInstanceBody)
        server.register("live_migrate", self.live_migrate, since="1.0", body_type=LiveMigrateBodyV10)
        server.register("live_migrate", self.live_migrate, since="1.1", body_type=LiveMigrateBody)
        server.register("abort_migration", self.abort_migration, since="1.0", body_type=MigrationIdBody)
        server.register("force_complete", self.force_complete, since="1.0", body_type=MigrationIdBody)
        server.register("migration_status", self.migration_status, since="1.0", body_type=MigrationIdBody)

    def start(self) -> None:
        """Open the record and take up what it says was under way, in the background (recovery
        asks libvirt on both hosts and may retry claim calls: the daemon's start must not wait)."""
        pruned = self.store.prune()
        if pruned:
            log.info("forgot %d ended migrations past their retention", pruned)
        if not self._recover:
            self.recovered.set()
            return
        threading.Thread(target=self._recover_all, name="source-recovery", daemon=True).start()

    def _recover_all(self) -> None:
        from agent.daemon.source_recovery import recover

        try:
            recover(self, self._sleep)
        finally:
            self.recovered.set()

    @contextlib.contextmanager
    def own_connection(self) -> Iterator[Any]:
        """A libvirt connection for one migration's thread, closed when it ends (the per-thread
        connections of the context would pile up: a migration thread lives once)."""
        conn = self._connect(self.ctx.libvirt.uri)
        try:
            yield conn
        finally:
            close_quietly(conn)

    def stop(self) -> None:
        """Start nothing more; running jobs belong to libvirt and go on (a restart takes them up)."""
        with self._lock:
            self._stopping = True

    def status(self) -> str:
        with self._lock:
            running, queued = self._running, len(self._queue)
        if not running and not queued:
            return ""
        return f"{running} migration{'s' if running != 1 else ''} out" + (f", {queued} queued" if queued else "")

    # --- describe_instance --------------------------------------------------------------------------

    def instance(self, name_or_uuid: str, conn: Any = None) -> InstanceView:
        """The domain and its metadata; RemoteNotFound when there is no such domain here."""
        try:
            dom = lookup_domain(conn if conn is not None else self.ctx.libvirt.get(), name_or_uuid)
            xml, (state, _reason) = dom.XMLDesc(0), dom.state()
        except DomainNotFound:
            raise RemoteNotFound(
                f"no instance {name_or_uuid!r} on {self.ctx.host}", details={"code": "no_instance"}
            ) from None
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:  # gone between the lookup and the read
                raise RemoteNotFound(f"instance {name_or_uuid!r} vanished", details={"code": "no_instance"}) from None
            raise LibvirtOpError.from_libvirt(f"reading instance {name_or_uuid!r}", exc) from None
        domain = parse_domain(xml)
        meta = read_instance_metadata(xml) or InstanceMetadata()
        return InstanceView(domain.uuid.lower(), domain.name, int(state), domain, meta)

    def describe_instance(self, body: DescribeInstanceBody) -> dict[str, Any]:
        view = self.instance(body.instance)
        policy = decide_policy(
            view.request().migration, self.ctx.cfg.libvirt, domain_paused=view.state == libvirt.VIR_DOMAIN_PAUSED
        )
        placement = view.placement()
        return {
            "uuid": view.uuid,
            "name": view.name,
            "state": state_word(view.state),
            "vcpus": view.domain.vcpus,
            "memory_mb": view.memory_mb,
            "extra_specs": dict(view.metadata.extra_specs),
            "image_properties": dict(view.metadata.image_properties),
            "placement": placement.to_json() if placement is not None else None,
            "policy": policy_view(policy),
        }

    # --- live_migrate -------------------------------------------------------------------------------

    def live_migrate(self, body: LiveMigrateBodyV10) -> dict[str, Any]:
        existing = self.store.get(body.migration_id)
        if existing is not None:
            return self._repeat(existing, body)
        flight, record = self._plan(body)
        record, created = self.store.add(record)
        if not created:  # the same id raced in from a second call
            return self._repeat(record, body)
        log.info(
            "migration %s: %s -> %s accepted (%s move)",
            record.migration_id,
            record.instance_name,
            record.dest_host,
            "NUMA-aware" if record.placement_json else "legacy",
        )
        self.enqueue(flight)
        return {"migration_id": record.migration_id, "accepted": True}

    def _repeat(self, record: MigrationRecord, body: LiveMigrateBodyV10) -> dict[str, Any]:
        """The same id again: accepted when it is the same request, Conflict otherwise."""
        if body.instance not in (record.instance, record.instance_uuid, record.instance_name):
            raise RemoteConflict(
                f"migration {record.migration_id} is of instance {record.instance}, not {body.instance}",
                details={"code": "migration_id_taken"},
            )
        if body.destination.host != record.dest_host:
            raise RemoteConflict(
                f"migration {record.migration_id} goes to {record.dest_host}, not {body.destination.host}",
                details={"code": "migration_id_taken"},
            )
        return {"migration_id": record.migration_id, "accepted": True}

    def _plan(self, body: LiveMigrateBodyV10) -> tuple[Flight, MigrationRecord]:
        """Every check before anything is queued; the flight and its record."""
        placement, claim_host = _placement_of(body)
        view = self.instance(body.instance)
        if view.state not in _LIVE_STATES:
            raise RemoteConflict(
                f"instance {view.name} is {state_word(view.state)}: nothing to live-migrate",
                details={"code": "not_running"},
            )
        request = view.request()
        self._check_move(view, request, placement)
        self._check_free(view)
        target = MigrationTarget(body.destination.libvirt_uri, body.destination.migration_uri, body.destination.host)
        flight = Flight(body.migration_id, view.uuid, target, placement, claim_host)
        return flight, self._new_record(body, view, flight)

    def _check_move(self, view: InstanceView, request: InstanceRequest, placement: Placement | None) -> None:
        if placement is not None:
            try:
                check_matches(view.domain, placement)
            except InvalidInput as exc:
                raise RemoteInvalidRequest(f"body.placement: {exc}", details={"field": "body.placement"}) from None
            return
        if has_numa_topology(request, view.domain) and not numa_workaround(self.ctx.cfg):
            raise RemoteInvalidRequest(
                f"instance {view.name} has a NUMA topology: moving it without a placement copies its pinning to a "
                "host where those CPUs may be taken; call with 1.1 and a placement, or set [workarounds] "
                "enable_numa_live_migration = true",
                details={"field": "body.placement"},
            )

    def _check_free(self, view: InstanceView) -> None:
        with self._lock:
            busy = next((f for f in self._flights.values() if f.instance_uuid == view.uuid), None)
            queued = len(self._queue)
        if busy is not None:
            raise RemoteConflict(
                f"instance {view.name} is already being migrated ({busy.migration_id})",
                details={"code": "migration_running"},
            )
        if queued >= MAX_QUEUED:
            raise RemoteBusy(f"{queued} migrations are waiting on {self.ctx.host}", retry_after=BUSY_RETRY_S)

    def _new_record(self, body: LiveMigrateBodyV10, view: InstanceView, flight: Flight) -> MigrationRecord:
        now = self.ctx.clock()
        placement_json = json.dumps(flight.placement.to_json(), sort_keys=True) if flight.placement else None
        return MigrationRecord(
            migration_id=body.migration_id,
            instance=body.instance,
            instance_uuid=view.uuid,
            instance_name=view.name,
            dest_host=body.destination.host,
            dest_libvirt_uri=body.destination.libvirt_uri,
            dest_migration_uri=body.destination.migration_uri,
            claim_host=flight.claim_host,
            placement_json=placement_json,
            version="1.1" if flight.placement is not None else "1.0",
            status="queued",
            phase="queued",
            percent=0.0,
            created_at=now,
            updated_at=now,
            claim_action="pending" if flight.claim_host else "none",
        )

    # --- the queue ----------------------------------------------------------------------------------

    def enqueue(self, flight: Flight) -> None:
        with self._lock:
            self._flights[flight.migration_id] = flight
            self._queue.append(flight.migration_id)
            self._dispatch_locked()

    def _dispatch_locked(self) -> None:
        limit = self.ctx.cfg.max_concurrent_live_migrations  # read each time: SIGHUP may change it
        while self._queue and self._running < limit and not self._stopping:
            flight = self._flights[self._queue.popleft()]
            self._running += 1
            threading.Thread(
                target=self._execute, args=(flight,), name=f"migration-{flight.migration_id}", daemon=True
            ).start()

    def adopt(self, flight: Flight, monitor: Callable[[], Ending]) -> None:
        """Run `monitor` for a job found running after a restart, as if this agent had started it
        (it counts against the outbound limit and ends through the same outcome handling)."""
        with self._lock:
            self._flights[flight.migration_id] = flight
            self._running += 1
        threading.Thread(
            target=self._finish_with, args=(flight, monitor), name=f"attached-{flight.migration_id}", daemon=True
        ).start()

    def _execute(self, flight: Flight) -> None:
        self._finish_with(flight, lambda: self._migrate(flight))

    def _finish_with(self, flight: Flight, body: Callable[[], Ending]) -> None:
        """Run one migration's thread: every record it logs (the runner's included) carries the
        migration's journal fields, so `journalctl MIGRATION_ID=<id>` tells its whole story."""
        with log_context(**self.journal_fields(flight)):
            self._run_to_end(flight, body)

    def journal_fields(self, flight: Flight) -> dict[str, str | None]:
        return {
            "migration_id": flight.migration_id,
            "instance_uuid": flight.instance_uuid,
            "source_host": self.ctx.host,
            "dest_host": flight.target.host,
            "claim_id": flight.migration_id if flight.claim_host else None,
        }

    def _run_to_end(self, flight: Flight, body: Callable[[], Ending]) -> None:
        try:
            ending = body()
        except Exception as exc:  # a bug: the migration's end must still be recorded and told
            log.exception("migration %s: unexpected failure", flight.migration_id)
            ending = Ending("failed", f"internal error on {self.ctx.host}: {type(exc).__name__}", self.ctx.host)
        try:
            self.finish(flight, ending)
        finally:
            with self._lock:
                self._running -= 1
                self._flights.pop(flight.migration_id, None)
                self._dispatch_locked()
            flight.done.set()
            self._publish_running()

    # --- one migration ------------------------------------------------------------------------------

    def _migrate(self, flight: Flight) -> Ending:
        if flight.abort_requested:
            return Ending("aborted", "aborted before it started", self.ctx.host)
        with self.own_connection() as conn:
            return self._migrate_on(flight, conn)

    def _migrate_on(self, flight: Flight, conn: Any) -> Ending:
        try:
            view, request, runner = self._prepare(flight, conn)
            if flight.abort_requested:
                return Ending("aborted", "aborted before it started", self.ctx.host)
            # placement None: the legacy move, the pinning copied as it is
            outcome = runner.run(
                view.uuid,
                flight.target,
                flight.placement,
                request,
                lambda p: self.on_progress(flight, p),
                on_policy=lambda policy: self._policy_decided(flight, policy),
            )
        except AgentError as exc:  # refused before libvirt's job started: the VM never moved
            status = "aborted" if flight.abort_requested else "failed"
            return Ending(status, f"not started: {exc}", self.ctx.host)
        return ending_from_outcome(outcome, self.ctx.host, flight.target.host)

    def _prepare(self, flight: Flight, conn: Any) -> tuple[InstanceView, InstanceRequest, Runner]:
        """The instance as it is now (it may have changed while queued), a runner (which decides the
        policy: `_policy_decided`)."""
        view = self.instance(flight.instance_uuid, conn)
        request = view.request()
        self._mark(flight, status="preparing", phase="preparing", started_at=self.ctx.clock())
        runner = self.new_runner(conn)
        flight.controls = runner
        return view, request, runner

    def _policy_decided(self, flight: Flight, policy: MigrationPolicy) -> None:
        """The runner decided the policy (before the job starts): recorded, so that `.done` and a
        restart (recovery attaches with it) know it."""
        flight.policy = policy
        self._mark(flight)

    def new_runner(self, conn: Any) -> Runner:
        """A runner for one migration (started here, or attached after a restart) on `conn`."""
        return self._runner_factory(conn, self.ctx.cfg.libvirt)

    def _mark(self, flight: Flight, **changes: Any) -> MigrationRecord:
        if flight.policy is not None:
            changes.update(
                auto_converge=flight.policy.auto_converge,
                post_copy=flight.policy.post_copy,
                decided_by=flight.policy.reason,
            )
        if "phase" in changes:
            flight.phase = changes["phase"]
        return self.store.update(flight.migration_id, **changes)

    def on_progress(self, flight: Flight, progress: MigrationProgress) -> None:
        """The runner's progress (each poll): apply a pending abort, record, publish at most every
        progress_interval_s. Runs on the runner's monitor thread: never blocks on the broker."""
        with flight.progress_lock:
            self._progress(flight, progress)

    def _progress(self, flight: Flight, progress: MigrationProgress) -> None:
        if flight.abort_requested and not flight.started:
            self._abort_now(flight)
        flight.percent = max(flight.percent, progress.percent)
        flight.phase = WIRE_PHASES.get(progress.phase, progress.phase)
        now = self.ctx.clock()
        if flight.started and now - flight.last_published < self.ctx.cfg.bus.progress_interval_s:
            return
        flight.started, flight.last_published = True, now
        record = self._mark(flight, status="running", phase=flight.phase, percent=flight.percent)
        body = progress_body(flight, record, progress, self.ctx.host, now)
        self._publish(f"migration.{flight.migration_id}.progress", body, wait=False)
        self._publish_running(flight, progress)

    def _abort_now(self, flight: Flight) -> None:
        try:
            if flight.controls is not None:
                flight.controls.abort()
        except NoMigrationInProgress:
            return
        except MigrationError as exc:
            log.warning("migration %s: the abort asked before it started failed: %s", flight.migration_id, exc)
        flight.abort_requested = False  # done (or refused): do not try on every poll

    # --- the end ------------------------------------------------------------------------------------

    def finish(self, flight: Flight, ending: Ending) -> None:
        """Record the outcome, settle the destination's claim, tell the world (`.done`)."""
        last_phase = flight.phase  # where it ended, for the metrics (the record says "done")
        record = self._mark(
            flight,
            status=ending.status,
            phase="done",
            percent=100.0 if ending.status == "completed" else flight.percent,
            reason=None if ending.status == "completed" else ending.reason[:4096],
            ended_at=self.ctx.clock(),
            downtime_ms=ending.downtime_ms,
            total_s=ending.total_s,
            host_now=ending.host_now,
        )
        log.log(
            logging.INFO if ending.status == "completed" else logging.WARNING,
            "migration %s of %s: %s (%s)",
            record.migration_id,
            record.instance_name,
            ending.status,
            ending.reason,
        )
        record = self.settle_claim(record, ending)
        self.publish_done(record)
        self.ctx.metrics.migration_ended(ending.status, last_phase)
        self.ctx.changed(f"migration {record.migration_id} {ending.status}")

    def settle_claim(self, record: MigrationRecord, ending: Ending) -> MigrationRecord:
        """Confirm (completed) or release (failed, aborted) the destination's claim; leave it when the
        guest failed in post-copy (its state is split: the destination decides)."""
        if record.claim_host is None or record.claim_action != "pending":
            return record
        if ending.in_postcopy:
            log.error(
                "migration %s failed in post-copy: leaving the claim on %s", record.migration_id, record.claim_host
            )
            return self.store.update(record.migration_id, claim_action="left")
        if record.status == "completed":
            done = self._claim_call(record, "confirm_claim", {"migration_id": record.migration_id})
            action = "confirmed" if done else "failed"
        else:
            body = {"migration_id": record.migration_id, "reason": f"migration {record.status}: {ending.reason}"[:1000]}
            done = self._claim_call(record, "release_claim", body)
            action = "released" if done else "failed"
        return self.store.update(record.migration_id, claim_action=action)

    def _claim_call(self, record: MigrationRecord, method: str, body: dict[str, Any]) -> bool:
        """True once the claim host answered (NotFound on a release counts: nothing is held)."""
        host = record.claim_host or record.dest_host
        for attempt, delay in enumerate(CLAIM_CALL_DELAYS_S, 1):
            self._sleep(delay)
            try:
                self.ctx.peers().call(host, method, body, timeout=CLAIM_CALL_TIMEOUT_S, version="1.1")
                return True
            except RemoteNotFound:
                return method == "release_claim"
            except (RemoteConflict, RemoteRefused, RemoteInvalidRequest) as exc:
                log.error("migration %s: %s on %s refused: %s", record.migration_id, method, host, exc)
                return False
            except (BusError, RemoteError) as exc:
                log.warning("migration %s: %s on %s, attempt %d: %s", record.migration_id, method, host, attempt, exc)
        return False

    def publish_done(self, record: MigrationRecord) -> None:
        body = {
            "migration_id": record.migration_id,
            "status": record.status,
            "reason": record.reason,
            "downtime_ms": record.downtime_ms,
            "total_s": record.total_s or 0.0,
            "policy": {
                "auto_converge": bool(record.auto_converge),
                "post_copy": bool(record.post_copy),
                "decided_by": (record.decided_by or "not decided: the migration never started")[:4096],
            },
            "host_now": record.host_now or self.ctx.host,
        }
        self._publish(f"migration.{record.migration_id}.done", body, wait=True)

    def _publish(self, key: str, body: dict[str, Any], *, wait: bool) -> None:
        try:
            self.ctx.events.publish(key, body, wait=wait)
        except AgentError as exc:  # the broker is away: the record keeps the truth for migration_status
            log.warning("could not publish %s: %s", key, exc)

    def _publish_running(self, flight: Flight | None = None, progress: MigrationProgress | None = None) -> None:
        """Refresh the metrics' view of running migrations (remaining bytes, dirty rate)."""
        if flight is not None:
            flight.last_progress = progress
        with self._lock:
            seen = [(f, f.last_progress) for f in self._flights.values() if f.last_progress is not None]
        snapshot = [
            RunningMigration(f.migration_id, "source", f.phase, p.memory_remaining, float(p.dirty_rate_bps))
            for f, p in seen
        ]
        self.ctx.metrics.set_running_migrations(snapshot)

    # --- abort, force-complete, status --------------------------------------------------------------

    def _record(self, migration_id: str) -> MigrationRecord:
        record = self.store.get(migration_id)
        if record is None:
            raise RemoteNotFound(f"no migration {migration_id} on {self.ctx.host}", details={"code": "no_migration"})
        return record

    def migration_status(self, body: MigrationIdBody) -> dict[str, Any]:
        return self._record(body.migration_id).state()

    def abort_migration(self, body: MigrationIdBody) -> dict[str, Any]:
        with log_context(migration_id=body.migration_id):  # the runner's abort logs go to its story too
            return self._abort_migration(body)

    def _abort_migration(self, body: MigrationIdBody) -> dict[str, Any]:
        record = self._record(body.migration_id)
        with self._lock:
            flight = self._flights.get(body.migration_id)
            queued = body.migration_id in self._queue
            if queued:
                self._queue.remove(body.migration_id)
                self._running += 1  # its end runs on a thread of its own, like any migration
        if flight is None or not record.active:
            return record.state()
        flight.abort_requested = True
        self.store.update(flight.migration_id, abort_requested=True)
        if queued:
            self._execute_unstarted(flight)
        elif flight.controls is not None:
            self._abort_controls(flight)
        return self._record(body.migration_id).state()

    def _execute_unstarted(self, flight: Flight) -> None:
        threading.Thread(target=self._execute, args=(flight,), name=f"abort-{flight.migration_id}", daemon=True).start()
        flight.done.wait(1.0)  # usually ended by the time we answer (its claim release may take longer)

    def _abort_controls(self, flight: Flight) -> None:
        assert flight.controls is not None
        try:
            flight.controls.abort()
        except MigrationAbortRefused as exc:
            flight.abort_requested = False
            raise RemoteRefused(str(exc), details={"code": "postcopy"}) from None
        except NoMigrationInProgress:
            pass  # not started yet (the first progress applies it) or just ended
        except MigrationError as exc:
            raise RemoteConflict(f"abort failed: {exc}", details={"code": exc.code}) from None

    def force_complete(self, body: MigrationIdBody) -> dict[str, Any]:
        with log_context(migration_id=body.migration_id):
            return self._force_complete(body)

    def _force_complete(self, body: MigrationIdBody) -> dict[str, Any]:
        record = self._record(body.migration_id)
        with self._lock:
            flight = self._flights.get(body.migration_id)
        if flight is None or not record.active:
            return record.state()
        if flight.phase == "postcopy":
            raise RemoteRefused(
                f"migration {record.migration_id} is already in post-copy", details={"code": "postcopy"}
            )
        if flight.controls is None or not flight.started:
            raise RemoteRefused(f"migration {record.migration_id} has not started yet", details={"code": "not_started"})
        try:
            action = flight.controls.force_complete()
        except NoMigrationInProgress:
            return self._record(body.migration_id).state()
        except MigrationError as exc:
            raise RemoteConflict(f"force-complete failed: {exc}", details={"code": exc.code}) from None
        if action is ForceCompleteAction.ALREADY_POSTCOPY:  # the runner found it there (someone else switched)
            raise RemoteRefused(
                f"migration {record.migration_id} is already in post-copy: nothing to force",
                details={"code": "postcopy"},
            )
        # ALREADY_PAUSED: the guest is paused, pre-copy completes: what force-complete asks is under way
        log.info("migration %s: force-complete: %s", record.migration_id, action.value)
        return self._record(body.migration_id).state()


def _placement_of(body: LiveMigrateBodyV10) -> tuple[Placement | None, str | None]:
    """The 1.1 placement and claim host (None, None for the legacy move)."""
    if not isinstance(body, LiveMigrateBody):
        return None, None
    if body.placement is None:
        if body.claim_host is not None:
            raise RemoteInvalidRequest(
                "body.claim_host: a claim host without a placement", details={"field": "body.claim_host"}
            )
        return None, None
    try:
        placement = body.placement_value()
    except InvalidInput as exc:
        raise RemoteInvalidRequest(f"body.placement: {exc}", details={"field": "body.placement"}) from None
    if placement is None:  # pragma: no cover - placement_value() is None only without a placement
        return None, None
    return placement, body.claim_host or body.destination.host
