"""The migrate flow: plan (describe, validate, candidates, cap), place (claim with alternates),
start (`live_migrate` on the source). Following the migration is agent.orchestrator.tracker.

    plan   describe_instance on the source -> InstancePlan (InvalidRequest on a conflict: nothing
           was asked of any destination) -> cap -> a NUMA instance below 1.1 refused here unless
           the workaround allows the legacy move -> candidates
    start  for each candidate, at most migrate_max_retries + 1 asked:
             NUMA-aware: claim; NoFit / Busy / no answer -> rejection, next alternate
             legacy:     nothing to claim (pinning copied as is), the warning logged
           live_migrate on the source (with the placement and the claim's host); if that call
           fails, the claim is released and MigrationFailed raised (the VM never left)
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Callable, Sequence

from agent.bus import schemas as s
from agent.bus.errors import BusError, CallTimeout, RemoteError, RemoteInvalidRequest, RemoteNotFound
from agent.orchestrator.agent_api import AgentAPI
from agent.orchestrator.candidates import Candidates, attempts_allowed, choose
from agent.orchestrator.errors import BadMigrationRequest, MigrationFailed, NoDestination, NumaMigrationRefused
from agent.orchestrator.fleet import FleetView
from agent.orchestrator.model import HostInfo, Rejection, Version
from agent.orchestrator.policy import InstancePlan, instance_need, plan_instance
from agent.orchestrator.settings import Settings
from agent.orchestrator.versions import (
    DEPRECATED,
    OWN_MAX,
    Move,
    MoveKind,
    decide_move,
    resolve_cap,
    workaround_ignored,
)

log = logging.getLogger("compute_agent.orchestrator")


@dataclass(frozen=True, slots=True)
class Plan:
    instance: InstancePlan
    source: HostInfo
    cap: Version
    candidates: Candidates


@dataclass(frozen=True, slots=True)
class Started:
    migration_id: str
    plan: Plan
    destination: HostInfo
    move: Move
    placement: s.PlacementDoc | None  # the destination's claim (None: the legacy move)
    rejections: tuple[Rejection, ...]  # every host that said no before this one, with its reason


@dataclass(frozen=True, slots=True)
class DryRunAnswer:
    host: str
    placement: s.PlacementDoc | None
    rejection: Rejection | None


def _rejection(host: str, exc: BaseException) -> Rejection:
    if isinstance(exc, RemoteError):
        return Rejection(host, exc.message, exc.type, dict(exc.details), exc.retry_after)
    return Rejection(host, str(exc), type(exc).__name__)


class Orchestrator:
    """The migrate flow over an AgentAPI and a FleetView (no state of its own)."""

    def __init__(
        self,
        api: AgentAPI,
        fleet: FleetView,
        settings: Settings,
        *,
        new_id: Callable[[], str] = lambda: f"mig-{uuid.uuid4().hex[:16]}",
    ) -> None:
        self.api, self.fleet, self.settings, self.new_id = api, fleet, settings, new_id

    # --- plan ---------------------------------------------------------------------------------------

    def live_hosts(self) -> list[HostInfo]:
        return self.fleet.live(self.settings.host_max_age_s)

    def cap(self, live: Sequence[HostInfo]) -> Version:
        cap = resolve_cap(self.settings.version_cap, live)
        self.api.cap = cap
        if workaround_ignored(cap, live, self.settings.numa_workaround):
            log.warning(DEPRECATED)
        return cap

    def source_host(self, source: str) -> HostInfo:
        info = self.fleet.get(source)
        if info is None:
            raise BadMigrationRequest(f"--from {source}: no agent of that name has been heard of")
        return info

    def describe(self, source: str, instance: str) -> InstancePlan:
        try:
            info = self.api.describe_instance(source, instance)
        except RemoteNotFound as exc:
            raise BadMigrationRequest(f"instance {instance!r} is not on {source}: {exc.message}") from None
        except RemoteInvalidRequest as exc:  # the source's own parser refused the instance's metadata
            raise BadMigrationRequest(f"instance {instance!r} on {source}: {exc.message}") from None
        return plan_instance(info)  # InvalidRequest: a conflict, before any destination is asked

    def plan(self, instance: str, source: str, named: Sequence[str] = ()) -> Plan:
        src = self.source_host(source)
        iplan = self.describe(source, instance)
        live = self.live_hosts()
        cap = self.cap(live)
        # the cap or the source alone may rule out the NUMA-aware move: refuse before any claim
        decide_move(cap, src.rpc_max, OWN_MAX, numa=iplan.numa, workaround=self.settings.numa_workaround)
        candidates = choose(
            instance_need(iplan.request),
            iplan.required_traits,
            live,
            source=source,
            named=named,
            preference=self.settings.preference,
            cap=cap,
        )
        if not named:
            candidates = self._by_move(candidates, cap, src, iplan.numa)
        return Plan(iplan, src, cap, candidates)

    def _by_move(self, c: Candidates, cap: Version, src: HostInfo, numa: bool) -> Candidates:
        """Destinations of the NUMA-aware move first, of the allowed legacy move after; those the
        versions rule out are filtered (with the reason) instead of being asked one by one."""
        aware: list[HostInfo] = []
        legacy: list[HostInfo] = []
        rejected = list(c.rejected)
        for host in c.hosts:
            try:
                move = decide_move(cap, src.rpc_max, host.rpc_max, numa=numa, workaround=self.settings.numa_workaround)
            except NumaMigrationRefused as exc:
                rejected.append(Rejection(host.name, exc.message))
                continue
            (aware if move.kind is MoveKind.NUMA_AWARE else legacy).append(host)
        return Candidates(tuple(aware + legacy), tuple(rejected))

    # --- place and start ----------------------------------------------------------------------------

    def start(self, plan: Plan, migration_id: str | None = None) -> Started:
        migration_id = migration_id or self.new_id()
        rejections = list(plan.candidates.rejected)
        budget = attempts_allowed(self.settings.max_retries, len(plan.candidates.hosts))
        for dest in plan.candidates.hosts:
            if budget <= 0:
                break
            move = self._move_to(plan, dest, rejections)
            if move is None:
                continue
            budget -= 1
            taken, placement = self._place(plan, dest, move, migration_id, rejections)
            if taken:
                return self._launch(plan, dest, move, placement, migration_id, tuple(rejections))
        raise NoDestination(
            f"no destination could take instance {plan.instance.info.name} ({len(rejections)} refused)",
            tuple(rejections),
        )

    def _move_to(self, plan: Plan, dest: HostInfo, rejections: list[Rejection]) -> Move | None:
        try:
            return decide_move(
                plan.cap,
                plan.source.rpc_max,
                dest.rpc_max,
                numa=plan.instance.numa,
                workaround=self.settings.numa_workaround,
            )
        except NumaMigrationRefused as exc:
            rejections.append(Rejection(dest.name, exc.message, "UnsupportedVersion"))
            return None

    def _place(
        self, plan: Plan, dest: HostInfo, move: Move, migration_id: str, rejections: list[Rejection]
    ) -> tuple[bool, s.PlacementDoc | None]:
        """(taken, the claim's placement): (True, None) for the legacy move, (False, None) refused."""
        if move.kind is MoveKind.LEGACY:
            if move.warning:
                log.warning("migration %s of %s to %s: %s", migration_id, plan.instance.uuid, dest.name, move.warning)
            return True, None
        try:
            claim = self.api.claim(
                dest.name, migration_id, plan.instance.doc, plan.source.name, ttl_s=self.settings.claim_ttl_s
            )
        except (RemoteError, BusError) as exc:  # NoFit, Busy, no answer, ...: the next alternate
            rejections.append(_rejection(dest.name, exc))
            if isinstance(exc, CallTimeout):  # the claim may have been taken: give it back
                self._release(dest.name, migration_id, "the orchestrator got no answer to its claim")
            return False, None
        return True, claim.placement

    def _launch(
        self,
        plan: Plan,
        dest: HostInfo,
        move: Move,
        placement: s.PlacementDoc | None,
        migration_id: str,
        rejections: tuple[Rejection, ...],
    ) -> Started:
        claim_host = dest.name if placement is not None else None
        try:
            self.api.live_migrate(
                plan.source.name,
                migration_id,
                plan.instance.uuid,
                dest.destination(),
                placement=placement,
                claim_host=claim_host,
            )
        except (RemoteError, BusError) as exc:
            if claim_host is not None and not isinstance(exc, CallTimeout):
                self._release(claim_host, migration_id, f"live_migrate refused by the source: {exc}")
            raise MigrationFailed(f"{plan.source.name} did not start migration {migration_id}: {exc}") from None
        log.info("migration %s: %s %s -> %s (%s)", migration_id, plan.instance.uuid, plan.source.name, dest.name, move)
        return Started(migration_id, plan, dest, move, placement, rejections)

    def _release(self, host: str, migration_id: str, reason: str) -> None:
        try:
            self.api.release_claim(host, migration_id, reason)
        except (RemoteNotFound, RemoteError, BusError) as exc:
            log.warning(
                "migration %s: releasing the claim on %s failed: %s (it expires on its own)", migration_id, host, exc
            )

    # --- dry run ------------------------------------------------------------------------------------

    def dry_run(self, plan: Plan) -> list[DryRunAnswer]:
        """`fit` on each candidate: its placement or why not; nothing is held."""
        answers = [DryRunAnswer(r.host, None, r) for r in plan.candidates.rejected]
        for dest in plan.candidates.hosts:
            try:
                answers.append(DryRunAnswer(dest.name, self.api.fit(dest.name, plan.instance.doc), None))
            except (RemoteError, BusError) as exc:
                answers.append(DryRunAnswer(dest.name, None, _rejection(dest.name, exc)))
        return answers
