"""A simulated fleet on the real bus: agents whose bus side, fitter and claim ledger are real and
whose libvirt side is modelled (a migration takes `migration_s` and then moves the domain).

For the orchestrator's tests and `bench/fleet_bench.py`. Each `SimAgent` is an `RpcServer` (its own
consumer connection and thread, a small worker pool) registering the agent's methods with the
protocol's body types; the agents share one publisher connection for replies and one
`EventPublisher` for `capabilities.<host>` and `migration.<id>.progress|done` (what a fleet of 200
separate processes would not share, but what the orchestrator sees is the same). A `SimWorld`
holds the agents and runs every modelled migration on one scheduler thread.

What the simulated agent does as the real one (issue 9, docs/protocol.md): claims through
`Ledger.claim` with the host state of its domains and live claims; an inbound limit answering Busy;
an outbound limit queueing the rest; live_migrate without a placement refused for a NUMA instance
unless the workaround is on; on completion the source confirms the destination's claim and the
domain moves, on failure the claim is released and the domain stays.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import msgspec

from agent.bus import schemas as s
from agent.bus.errors import RemoteBusy, RemoteConflict, RemoteInvalidRequest, RemoteNoFit, RemoteNotFound
from agent.bus.events import EventPublisher
from agent.bus.keys import Keyring
from agent.bus.rpc import RpcServer
from agent.bus.transport import PublisherThread
from agent.claims.errors import NoFitError
from agent.claims.hoststate import HostStateReport, compute_host_state
from agent.claims.ledger import Ledger
from agent.claims.model import Claim
from agent.config import BusConfig, ComputeConfig
from agent.daemon.capabilities import cells_free
from agent.libvirt_ops.domain_model import DomainPlacement
from agent.libvirt_ops.policy import TRAIT_AUTO_CONVERGE, TRAIT_POST_COPY
from agent.numa.fit import fit
from agent.numa.placement import NoFit, Placement
from agent.numa.request import parse_request
from agent.numa.topology import HostTopology
from agent.orchestrator.policy import has_numa_topology

log = logging.getLogger("compute_agent.simulation")

__all__ = [
    "ALL_TRAITS",
    "INBOUND_LIMIT",
    "OUTBOUND_LIMIT",
    "Scheduler",
    "SimAgent",
    "SimInstance",
    "SimMigration",
    "SimWorld",
]

ALL_TRAITS = (TRAIT_AUTO_CONVERGE, TRAIT_POST_COPY)
INBOUND_LIMIT = 2  # the daemon's [DEFAULT] max_concurrent_incoming_migrations default
OUTBOUND_LIMIT = 1  # the daemon's [DEFAULT] max_concurrent_live_migrations default (Nova's)
BUSY_RETRY_S = 0.2


@dataclass
class SimInstance:
    uuid: str
    name: str
    vcpus: int
    memory_mb: int
    extra_specs: dict[str, str]
    image_properties: dict[str, str] = field(default_factory=dict)
    placement: Placement | None = None

    def doc(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "vcpus": self.vcpus,
            "memory_mb": self.memory_mb,
            "extra_specs": self.extra_specs,
            "image_properties": self.image_properties,
        }

    def domain(self) -> DomainPlacement:
        meta = self.placement.to_json() if self.placement is not None else None
        return DomainPlacement(self.name, self.uuid, self.vcpus, self.memory_mb * 1024, agent_placement=meta)


@dataclass
class SimMigration:
    migration_id: str
    instance: SimInstance
    source: str
    destination: str
    placement: Placement | None
    claim_host: str | None
    status: str = "queued"
    phase: str = "queued"
    percent: float = 0.0
    reason: str | None = None
    started: float = 0.0
    abort: bool = False

    def state(self) -> dict[str, Any]:
        return {
            "migration_id": self.migration_id,
            "instance": self.instance.uuid,
            "status": self.status,
            "phase": self.phase,
            "percent": self.percent,
            "reason": self.reason,
        }


class Scheduler:
    """One thread running timed callbacks (every modelled migration of the world)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cv = threading.Condition()
        self._count = itertools.count()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="sim-scheduler", daemon=True)
        self._thread.start()

    def at(self, delay_s: float, fn: Callable[[], None]) -> None:
        with self._cv:
            heapq.heappush(self._heap, (time.monotonic() + delay_s, next(self._count), fn))
            self._cv.notify()

    def _next(self) -> Callable[[], None] | None:
        with self._cv:
            while not self._stop:
                if self._heap and self._heap[0][0] <= time.monotonic():
                    return heapq.heappop(self._heap)[2]
                self._cv.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
            return None

    def _run(self) -> None:
        while (fn := self._next()) is not None:
            try:
                fn()
            except Exception:
                log.exception("simulation: a scheduled step failed")

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(5)


class SimWorld:
    """The simulated fleet: its agents, their shared publishers and the migration scheduler."""

    def __init__(
        self,
        cfg: BusConfig,
        keyring: Keyring,
        state_dir: Path,
        *,
        migration_s: float = 0.05,
        model: Callable[[SimInstance], float] | None = None,
    ) -> None:
        self.cfg, self.keyring, self.state_dir, self.migration_s = cfg, keyring, state_dir, migration_s
        self.model = model  # the modelled time of one instance's migration (default: migration_s)
        self.agents: dict[str, SimAgent] = {}
        self.scheduler = Scheduler()
        self.events = EventPublisher(cfg, keyring, sender="sim-fleet")
        self.replies = PublisherThread(cfg, "sim-fleet-replies", time.time)
        self.replies.start()
        self.capability_events = 0
        self._lock = threading.Lock()

    def add(self, name: str, topology: HostTopology, **kw: Any) -> SimAgent:
        agent = SimAgent(self, name, topology, **kw)
        self.agents[name] = agent
        return agent

    def start(self) -> None:
        for agent in self.agents.values():
            agent.server.start()
        for agent in self.agents.values():
            agent.publish_capabilities()

    def publish(self, key: str, body: Any) -> None:
        if key.startswith("capabilities."):
            with self._lock:
                self.capability_events += 1
        self.events.publish(key, body, wait=False)

    def stop(self) -> None:
        self.scheduler.stop()
        for agent in self.agents.values():
            agent.server.stop(5)
            agent.ledger.close()
        self.events.close(5)
        self.replies.stop(5)

    def duration(self, instance: SimInstance) -> float:
        return self.model(instance) if self.model is not None else self.migration_s

    def where(self, uuid: str) -> list[str]:
        return [a.name for a in self.agents.values() if uuid in a.instances]


class SimAgent:
    def __init__(
        self,
        world: SimWorld,
        name: str,
        topology: HostTopology,
        *,
        rpc_max: str = "1.1",
        traits: tuple[str, ...] = ALL_TRAITS,
        numa_workaround: bool = False,
        fail_migrations: bool = False,
    ) -> None:
        self.world, self.name, self.topology, self.traits = world, name, topology, traits
        self.rpc_max, self.numa_workaround, self.fail_migrations = rpc_max, numa_workaround, fail_migrations
        self.compute = ComputeConfig()
        self.instances: dict[str, SimInstance] = {}
        self.migrations: dict[str, SimMigration] = {}
        self.outbound: list[SimMigration] = []  # queued behind the outbound limit
        self.running_out = 0
        self.seq = 0
        self.lock = threading.RLock()
        self.claims_refused = 0
        self.ledger = Ledger.open(world.state_dir / name)
        self.server = RpcServer(
            world.cfg, name, world.keyring, max_version=rpc_max, max_workers=2, publisher=world.replies
        )
        self._register()

    def _register(self) -> None:
        reg = self.server.register
        reg("describe_host", self.describe_host, since="1.0", body_type=s.Empty)
        reg("describe_instance", self.describe_instance, since="1.0", body_type=s.DescribeInstanceBody)
        reg("live_migrate", self.live_migrate, since="1.0", body_type=s.LiveMigrateBodyV10)
        reg("abort_migration", self.abort_migration, since="1.0", body_type=s.MigrationIdBody)
        reg("force_complete", self.migration_status, since="1.0", body_type=s.MigrationIdBody)
        reg("migration_status", self.migration_status, since="1.0", body_type=s.MigrationIdBody)
        reg("list_migrations", self.list_migrations, since="1.0", body_type=s.Empty)
        if self.rpc_max == "1.1":
            reg("live_migrate", self.live_migrate, since="1.1", body_type=s.LiveMigrateBody)
            reg("fit", self.fit, since="1.1", body_type=s.FitBody)
            reg("claim", self.claim, since="1.1", body_type=s.ClaimBody)
            reg("release_claim", self.release_claim, since="1.1", body_type=s.ReleaseClaimBody)
            reg("confirm_claim", self.confirm_claim, since="1.1", body_type=s.ConfirmClaimBody)
            reg("extend_claim", self.extend_claim, since="1.1", body_type=s.ExtendClaimBody)

    # --- host state ---------------------------------------------------------------------------------

    def report(self, claims: list[Claim] | None = None) -> HostStateReport:
        with self.lock:
            domains = [i.domain() for i in self.instances.values()]
        held = self.ledger.live_claims() if claims is None else claims
        return compute_host_state(self.topology, domains, held, self.compute)

    def _state_fn(self, claims: Any) -> HostStateReport:
        return self.report(list(claims))

    def capabilities(self) -> s.Capabilities:
        state = self.report().state
        cells = cells_free(state)
        with self.lock:
            self.seq += 1
            seq = self.seq
        return s.Capabilities(
            host=self.name,
            seq=seq,
            agent_version="sim",
            rpc_versions=s.RpcVersions(min="1.0", max=self.rpc_max),
            traits=list(self.traits),
            libvirt_version="9.0.0",
            qemu_version="7.2.0",
            migration_uri=f"tcp://{self.name}",
            libvirt_uri=f"qemu+tcp://{self.name}/system",
            cells=cells,
            ts=time.time(),
        )

    def publish_capabilities(self) -> None:
        self.world.publish(f"capabilities.{self.name}", self.capabilities())

    # --- destination --------------------------------------------------------------------------------

    def describe_host(self, _: s.Empty) -> dict[str, Any]:
        doc = msgspec.to_builtins(self.capabilities())
        doc["host_state"] = self.report().state.to_json()
        with self.lock:
            doc["instances"] = sorted(self.instances)
        return doc

    def fit(self, body: s.FitBody) -> dict[str, Any]:
        result = fit(body.request(), self.report().state)
        if isinstance(result, NoFit):
            raise s.no_fit_error(result)
        return result.to_json()

    def claim(self, body: s.ClaimBody) -> dict[str, Any]:
        request = body.request()
        with self.lock:
            live = [c for c in self.ledger.live_claims() if c.migration_id != body.migration_id]
            if len(live) >= INBOUND_LIMIT:
                raise RemoteBusy(f"{self.name}: {len(live)} incoming migrations", retry_after=BUSY_RETRY_S)
            try:
                claim = self.ledger.claim(
                    body.migration_id, request, body.source_host, body.ttl_s or 300, self._state_fn
                )
            except NoFitError as exc:
                self.claims_refused += 1
                nofit = exc.nofit
                raise (s.no_fit_error(nofit) if isinstance(nofit, NoFit) else RemoteNoFit(exc.reason)) from None
        self.publish_capabilities()
        return {"placement": claim.placement.to_json(), "expires_at": claim.expires_at}

    def release_claim(self, body: s.ReleaseClaimBody) -> dict[str, Any]:
        claim = self._claim_op(lambda: self.ledger.release(body.migration_id, body.reason))
        self.publish_capabilities()
        return claim

    def confirm_claim(self, body: s.ConfirmClaimBody) -> dict[str, Any]:
        return self._claim_op(lambda: self.ledger.confirm(body.migration_id, "confirmed by the source"))

    def extend_claim(self, body: s.ExtendClaimBody) -> dict[str, Any]:
        return self._claim_op(lambda: self.ledger.start(body.migration_id))

    def _claim_op(self, op: Callable[[], Claim]) -> dict[str, Any]:
        try:
            return op().to_json()
        except Exception as exc:  # UnknownClaim, ClaimEnded: what the daemon answers NotFound/Conflict
            raise RemoteNotFound(str(exc)) from None

    def arrive(self, instance: SimInstance, placement: Placement | None, migration_id: str | None) -> None:
        """The modelled libvirt side: the domain now runs here (with the claimed pinning, or as it was)."""
        moved = replace(instance, placement=placement or instance.placement)
        with self.lock:
            self.instances[instance.uuid] = moved
            if migration_id is not None:
                self.ledger.confirm(migration_id, "the domain runs here")
        self.publish_capabilities()

    def boot(self, instance: SimInstance, *, publish: bool = True) -> SimInstance:
        """Start `instance` here, pinned where the fitter puts it (ValueError when it does not fit)."""
        request = parse_request(instance.doc())
        with self.lock:
            result = fit(request, self.report().state)
            if isinstance(result, NoFit):
                raise ValueError(f"{instance.name} does not fit on {self.name}: {result.reason}")
            pinned = replace(instance, placement=result if has_numa_topology(request, None) else None)
            self.instances[instance.uuid] = pinned
        if publish:
            self.publish_capabilities()
        return pinned

    # --- source -------------------------------------------------------------------------------------

    def _instance(self, name: str) -> SimInstance:
        with self.lock:
            found = self.instances.get(name) or next((i for i in self.instances.values() if i.name == name), None)
        if found is None:
            raise RemoteNotFound(f"no instance {name!r} on {self.name}", details={"code": "no_instance"})
        return found

    def describe_instance(self, body: s.DescribeInstanceBody) -> dict[str, Any]:
        inst = self._instance(body.instance)
        return {
            **inst.doc(),
            "name": inst.name,
            "state": "running",
            "placement": inst.placement.to_json() if inst.placement is not None else None,
            "policy": {"auto_converge": False, "post_copy": False, "decided_by": "host config"},
        }

    def live_migrate(self, body: s.LiveMigrateBodyV10) -> dict[str, Any]:
        with self.lock:
            if body.migration_id in self.migrations:
                return {"migration_id": body.migration_id, "accepted": True}
            mig = self._plan(body)
            self.migrations[mig.migration_id] = mig
            self.outbound.append(mig)
        self._next_out()
        return {"migration_id": mig.migration_id, "accepted": True}

    def _plan(self, body: s.LiveMigrateBodyV10) -> SimMigration:
        inst = self._instance(body.instance)
        if any(m.instance.uuid == inst.uuid and m.status in ("queued", "running") for m in self.migrations.values()):
            raise RemoteConflict(f"{inst.name} is already migrating", details={"code": "busy_instance"})
        placement = body.placement_value() if isinstance(body, s.LiveMigrateBody) else None
        claim_host = body.claim_host if isinstance(body, s.LiveMigrateBody) else None
        numa = has_numa_topology(parse_request(inst.doc()), None)
        if placement is None and numa and not self.numa_workaround:
            raise RemoteInvalidRequest(f"{inst.name} has a NUMA topology: no legacy move without the workaround")
        return SimMigration(body.migration_id, inst, self.name, body.destination.host, placement, claim_host)

    def _next_out(self) -> None:
        with self.lock:
            if self.running_out >= OUTBOUND_LIMIT or not self.outbound:
                return
            mig = self.outbound.pop(0)
            self.running_out += 1
            mig.status, mig.phase, mig.started = "running", "precopy", time.monotonic()
        took = self.world.duration(mig.instance)
        self.world.scheduler.at(took / 2, lambda: self._progress(mig, took / 2))
        self.world.scheduler.at(took, lambda: self._finish(mig))

    def _progress(self, mig: SimMigration, eta_s: float) -> None:
        mig.percent = 50.0
        body = {
            "migration_id": mig.migration_id,
            "instance": mig.instance.uuid,
            "source": self.name,
            "destination": mig.destination,
            "phase": "precopy",
            "percent": 50.0,
            "eta_s": eta_s,
            "memory_total": mig.instance.memory_mb << 20,
            "memory_remaining": mig.instance.memory_mb << 19,
            "dirty_rate_bps": 1 << 20,
            "bandwidth_bps": 1 << 30,
            "iteration": 1,
            "throttle_pct": 0,
            "max_downtime_ms": 500,
            "ts": time.time(),
        }
        self.world.publish(f"migration.{mig.migration_id}.progress", body)

    def _finish(self, mig: SimMigration) -> None:
        failed = self.fail_migrations or mig.abort
        dest = self.world.agents[mig.destination]
        if failed:
            mig.status, mig.reason = ("aborted" if mig.abort else "failed"), "modelled failure"
            if mig.claim_host is not None:
                self.world.agents[mig.claim_host].ledger.release(mig.migration_id, "the migration failed")
        else:
            dest.arrive(mig.instance, mig.placement, mig.migration_id if mig.claim_host else None)
            with self.lock:
                self.instances.pop(mig.instance.uuid, None)
            mig.status = "completed"
        mig.phase, mig.percent = "done", 100.0 if not failed else mig.percent
        self._done_event(mig, dest.name if not failed else self.name)
        with self.lock:
            self.running_out -= 1
        self.publish_capabilities()
        self._next_out()

    def _done_event(self, mig: SimMigration, host_now: str) -> None:
        body = {
            "migration_id": mig.migration_id,
            "status": mig.status,
            "reason": mig.reason,
            "downtime_ms": 20 if mig.status == "completed" else None,
            "total_s": time.monotonic() - mig.started,
            "policy": {"auto_converge": False, "post_copy": False, "decided_by": "host config"},
            "host_now": host_now,
        }
        self.world.publish(f"migration.{mig.migration_id}.done", body)

    def _migration(self, migration_id: str) -> SimMigration:
        with self.lock:
            mig = self.migrations.get(migration_id)
        if mig is None:
            raise RemoteNotFound(f"no migration {migration_id} on {self.name}", details={"code": "no_migration"})
        return mig

    def migration_status(self, body: s.MigrationIdBody) -> dict[str, Any]:
        return self._migration(body.migration_id).state()

    def abort_migration(self, body: s.MigrationIdBody) -> dict[str, Any]:
        mig = self._migration(body.migration_id)
        mig.abort = True
        return mig.state()

    def list_migrations(self, _: s.Empty) -> dict[str, Any]:
        with self.lock:
            rows = [{**m.state(), "source": m.source, "destination": m.destination} for m in self.migrations.values()]
        return {"migrations": rows}
