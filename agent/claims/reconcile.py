"""Reconciliation: bring the live claims in line with what runs on this host.

Run by `Ledger.reconcile` at start and periodically. Every decision is taken inside its own
transaction from the claim's fresh row, never from the snapshot that says which claims to look at
(a `progress` may have moved an expiry meanwhile).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from agent.claims.model import Claim, ClaimState, ReconcileDecision, uuid_key
from agent.claims.store import ClaimStore
from agent.errors import InvalidInput

log = logging.getLogger("compute_agent.claims")

SourceReportsFailed = Callable[[Claim], bool]


def running_keys(running_domains: Iterable[Any]) -> set[str]:
    """uuid_key of each running domain, given as DomainPlacement objects or instance UUIDs."""
    running = set()
    for d in running_domains:
        uuid = d if isinstance(d, str) else getattr(d, "uuid", None)
        if not isinstance(uuid, str):
            raise InvalidInput(f"reconcile: running domain {d!r} has no uuid")
        running.add(uuid_key(uuid))
    return running


@dataclass(frozen=True, slots=True)
class Reconciler:
    """One reconciliation pass over a ledger's store (see `Ledger.reconcile` for the rules)."""

    store: ClaimStore
    clock: Callable[[], float]
    migrating_timeout_s: float
    running: set[str]  # uuid_key of the domains running here
    when: float  # the time the expiries are compared with

    def run(self, live: Iterable[Claim], source_reports_failed: SourceReportsFailed | None) -> list[ReconcileDecision]:
        decisions: list[ReconcileDecision] = []
        ask_source: list[Claim] = []
        for snap in live:
            decision, ask = self._decide(snap.migration_id)
            if decision is not None:
                decisions.append(decision)
            elif ask is not None and source_reports_failed is not None:
                ask_source.append(ask)
        if source_reports_failed is not None:
            decisions += self._ask_sources(ask_source, source_reports_failed)
        return decisions

    def _ask_sources(self, claims: list[Claim], source_reports_failed: SourceReportsFailed) -> list[ReconcileDecision]:
        """Step 3 for each migrating claim kept by steps 1-2, in turn."""
        decisions = []
        for c in claims:
            decision = self._ask_source(c, source_reports_failed)
            if decision is not None:
                decisions.append(decision)
        return decisions

    # ---- steps 1-2: here, or past its expiry --------------------------------------------------

    def _verdict(self, c: Claim) -> tuple[ClaimState, str] | None:
        """Where a live claim goes by steps 1-2 (None: it stays as it is)."""
        if uuid_key(c.instance_uuid) in self.running:
            return ClaimState.CONFIRMED, f"reconcile: domain {c.instance_uuid} runs on this host"
        if c.expires_at > self.when:
            return None
        if c.state is ClaimState.HELD:
            return ClaimState.EXPIRED, f"reconcile: held past its TTL ({c.ttl_s:g}s) and the domain is not here"
        return ClaimState.EXPIRED, (
            f"reconcile: migrating with no progress for {self.migrating_timeout_s:g}s and the domain is not here"
        )

    def _decide(self, migration_id: str) -> tuple[ReconcileDecision | None, Claim | None]:
        """Steps 1-2 for one claim, decided from its fresh row in one transaction. Returns (the
        decision taken, None) or (None, the fresh claim when it is migrating: ask its source)."""
        with self.store.tx() as conn:
            c = self.store.get(conn, migration_id)
            if c is None or not c.is_live:
                return None, None  # pruned, released, confirmed... meanwhile
            verdict = self._verdict(c)
            if verdict is None:
                log.debug(
                    "reconcile: claim %s (%s) kept: expires in %.0fs", c.migration_id, c.state, c.expires_at - self.when
                )
                return None, c if c.state is ClaimState.MIGRATING else None
            to, why = verdict
            self.store.record(conn, c, to, self.clock(), why)
        log.info(
            "reconcile: claim %s (instance %s) %s -> %s: %s", c.migration_id, c.instance_uuid, c.state, to.value, why
        )
        return ReconcileDecision(c.migration_id, c.instance_uuid, c.state, to, why), None

    # ---- step 3: the source says the migration failed ------------------------------------------

    def _source_failed(self, c: Claim, source_reports_failed: SourceReportsFailed) -> bool:
        """Ask the source (outside the ledger lock); an exception counts as "don't know"."""
        try:
            failed = bool(source_reports_failed(c))
        except Exception as exc:  # any failure of the callback: it must not stop reconciliation
            log.warning("reconcile: claim %s kept: asking source %s failed: %s", c.migration_id, c.source_host, exc)
            return False
        if not failed:
            log.debug("reconcile: claim %s kept: source %s does not report failure", c.migration_id, c.source_host)
        return failed

    def _release_if_unchanged(self, c: Claim, why: str) -> bool:
        with self.store.tx() as conn:
            fresh = self.store.get(conn, c.migration_id)
            # the answer is about the claim as we asked: skip if it moved since (progress, confirm, ...)
            if (
                fresh is None
                or fresh.state is not c.state
                or fresh.updated_at != c.updated_at
                or uuid_key(fresh.instance_uuid) in self.running
            ):
                return False
            self.store.record(conn, fresh, ClaimState.RELEASED, self.clock(), why)
        return True

    def _ask_source(self, c: Claim, source_reports_failed: SourceReportsFailed) -> ReconcileDecision | None:
        if not self._source_failed(c, source_reports_failed):
            return None
        why = f"reconcile: source {c.source_host} reports the migration failed and the domain is not here"
        if not self._release_if_unchanged(c, why):
            log.info("reconcile: claim %s changed meanwhile, release skipped", c.migration_id)
            return None
        log.info("reconcile: claim %s (instance %s) %s -> released: %s", c.migration_id, c.instance_uuid, c.state, why)
        return ReconcileDecision(c.migration_id, c.instance_uuid, c.state, ClaimState.RELEASED, why)


__all__ = ["Reconciler", "SourceReportsFailed", "running_keys"]
