"""The source role's values and pure rules (agent.daemon.source is the role itself): the seams it
drives libvirt through (`Runner`, `Controls`), what it knows of an instance (`InstanceView`), a
migration in memory (`Flight`) and how one ended (`Ending`), and the pure pieces: the progress
event's body, an outcome as an ending, whether an instance has a NUMA topology.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, cast

from agent.daemon.migrations import MigrationRecord
from agent.errors import InvalidInput
from agent.libvirt_ops.domain_model import DomainPlacement
from agent.libvirt_ops.instance_metadata import InstanceMetadata
from agent.libvirt_ops.migration import (
    ForceCompleteAction,
    MigrationOutcome,
    MigrationProgress,
    MigrationRunner,
    MigrationTarget,
)
from agent.libvirt_ops.policy import MigrationPolicy
from agent.numa.placement import Placement
from agent.numa.request import InstanceRequest, parse_request
from agent.units import mib_from_kib

log = logging.getLogger("compute_agent.source")

STATE_WORDS = ("nostate", "running", "blocked", "paused", "shutdown", "shutoff", "crashed", "pmsuspended")
WIRE_PHASES = {"paused-precopy": "paused"}  # the runner's phase names -> docs/protocol.md 6.2


# --- seams ----------------------------------------------------------------------------------------


class Controls(Protocol):
    """What abort_migration / force_complete act on: the runner of a job, started here or attached
    after a restart."""

    def abort(self) -> None: ...

    def force_complete(self) -> ForceCompleteAction: ...


class Runner(Controls, Protocol):
    def run(
        self,
        domain_name_or_uuid: str,
        target: MigrationTarget,
        placement: Placement | None,
        request: InstanceRequest | Mapping[str, Any],
        on_progress: Callable[[MigrationProgress], None] | None = None,
        on_policy: Callable[[MigrationPolicy], None] | None = None,
    ) -> MigrationOutcome: ...

    def attach(
        self,
        domain_name_or_uuid: str,
        target: MigrationTarget,
        policy: MigrationPolicy,
        on_progress: Callable[[MigrationProgress], None] | None = None,
    ) -> MigrationOutcome: ...


RunnerFactory = Callable[[Any, Any], Runner]  # (libvirt connection, LibvirtConfig) -> Runner


def default_runner(conn: Any, cfg: Any) -> Runner:
    return cast(Runner, MigrationRunner(conn, cfg))


# --- values ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InstanceView:
    """A domain as the source sees it: libvirt's facts plus the metadata recorded with it."""

    uuid: str
    name: str
    state: int
    domain: DomainPlacement
    metadata: InstanceMetadata

    @property
    def memory_mb(self) -> int:
        return mib_from_kib(self.domain.memory_kib)

    def request(self) -> InstanceRequest:
        """The instance request (InvalidRequest naming the keys when the metadata contradicts itself)."""
        return parse_request(
            self.metadata.request_doc(uuid=self.uuid, vcpus=self.domain.vcpus, memory_mb=self.memory_mb)
        )

    def placement(self) -> Placement | None:
        """Where it runs now: the placement the agent recorded, None when there is none (or it is unreadable)."""
        if self.domain.agent_placement is None:
            return None
        try:
            return Placement.from_json(dict(self.domain.agent_placement))
        except InvalidInput as exc:
            log.warning("domain %s: unreadable placement record (%s)", self.name, exc)
            return None


@dataclass(frozen=True, slots=True)
class Ending:
    """How a migration ended, whatever ended it (the runner, an abort while queued, recovery)."""

    status: str  # completed | failed | aborted
    reason: str
    host_now: str
    downtime_ms: int | None = None
    total_s: float = 0.0
    in_postcopy: bool = False  # failed after the switch: the guest's state is split, the claim stays


@dataclass
class Flight:
    """One accepted migration in memory (its durable twin is the MigrationRecord)."""

    migration_id: str
    instance_uuid: str
    target: MigrationTarget
    placement: Placement | None
    claim_host: str | None
    policy: MigrationPolicy | None = None
    controls: Controls | None = None
    abort_requested: bool = False
    percent: float = 0.0
    phase: str = "queued"
    started: bool = False  # libvirt's job was seen (first progress)
    last_published: float = float("-inf")
    last_progress: MigrationProgress | None = None
    done: threading.Event = field(default_factory=threading.Event)
    progress_lock: threading.Lock = field(default_factory=threading.Lock)  # events leave in order


def state_word(state: int) -> str:
    return STATE_WORDS[state] if 0 <= state < len(STATE_WORDS) else "unknown"


def policy_view(policy: MigrationPolicy) -> dict[str, Any]:
    return {"auto_converge": policy.auto_converge, "post_copy": policy.post_copy, "decided_by": policy.reason[:4096]}


def has_numa_topology(request: InstanceRequest, domain: DomainPlacement) -> bool:
    """Nova's "instance has a NUMA topology": pinning, guest cells, a page size, or pins in the XML."""
    asked = request.is_pinned or not request.numa_implicit or request.page_size is not None
    return asked or bool(domain.vcpu_pins or domain.guest_cells or domain.numatune_nodeset)


def numa_workaround(cfg: Any) -> bool:
    """`[workarounds] enable_numa_live_migration` (False until the config reads that section)."""
    return bool(getattr(getattr(cfg, "workarounds", None), "enable_numa_live_migration", False))


def progress_body(
    flight: Flight, record: MigrationRecord, progress: MigrationProgress, source: str, now: float
) -> dict[str, Any]:
    """The `migration.<id>.progress` body (docs/protocol.md 6.2): the runner's numbers as they are
    (rates: `bandwidth_bps`)."""
    return {
        "migration_id": flight.migration_id,
        "instance": record.instance,
        "source": source,
        "destination": flight.target.host,
        "phase": flight.phase,
        "percent": flight.percent,
        "eta_s": progress.eta_s,  # the runner's: remaining against transfer minus dirty rate
        "memory_total": progress.memory_total,
        "memory_remaining": progress.memory_remaining,
        "dirty_rate_bps": max(progress.dirty_rate_bps, 0),
        "bandwidth_bps": bandwidth_bps(progress),
        "iteration": progress.iteration,
        "throttle_pct": min(max(progress.throttle_pct, 0), 100),
        "max_downtime_ms": progress.max_downtime_ms,
        "ts": now,
    }


def bandwidth_bps(progress: MigrationProgress) -> int:
    """The event's `bandwidth_bps` (bytes sent per second): the runner's smoothed transfer rate,
    libvirt's own memory bandwidth until the runner has measured one (its first poll)."""
    return max(progress.transfer_rate_bps or progress.memory_bps, 0)


def ending_from_outcome(outcome: MigrationOutcome, source: str, destination: str) -> Ending:
    here = destination if outcome.status == "completed" or outcome.switched_to_postcopy else source
    return Ending(
        status=outcome.status,
        reason=outcome.reason,
        host_now=here,
        downtime_ms=outcome.downtime_ms,
        total_s=outcome.elapsed_s,
        in_postcopy=outcome.switched_to_postcopy and outcome.status != "completed",
    )
