"""The destination's claim watcher: keeps each live claim in step with what arrives on this host.

Every `WATCH_INTERVAL_S`, and at once after a domain lifecycle event, for each live claim:

    its domain here            what it means                          what the watcher does
    none (or only defined)     the migration has not started          nothing: the expiry decides
    active, not running        the incoming copy, paused until done   progress (held -> migrating)
    running in post-copy       the guest runs here, pages still come  progress
    running, claim's placement the migration completed                confirm (also when the source is gone)
    running, other placement   not this migration's copy              nothing, a warning

and every live claim past its expiry is expired. Every `[claims] reconcile_interval_s` the ledger's
reconcile runs too, with the domains that arrived and a question to the source ("did this
migration fail?") for migrating claims whose domain is not here.

The decision is `arrival_of` (pure); the watcher only collects and acts.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import libvirt

from agent.bus.errors import RemoteError
from agent.claims.errors import IllegalTransition, UnknownClaim
from agent.claims.model import Claim
from agent.daemon.context import AgentContext, DomainLifecycle
from agent.errors import AgentError
from agent.libvirt_ops.domain_read import parse_domain
from agent.log import log_context
from agent.numa.placement import Placement

log = logging.getLogger("compute_agent.daemon.destination")

#: an arrival is confirmed within this even when no lifecycle event comes (libvirt's events can be lost)
WATCH_INTERVAL_S = 2.0
#: how long the watcher waits for a source's migration_status before it counts as "don't know"
SOURCE_ASK_TIMEOUT_S = 5.0

Announce = Callable[[Claim, str], None]


class Arrival(enum.Enum):
    ABSENT = "absent"
    INCOMING = "incoming"
    ARRIVED = "arrived"
    FOREIGN = "foreign"


@dataclass(frozen=True, slots=True)
class DomainSeen:
    """What this host's libvirt says about a claimed instance's domain."""

    active: bool
    state: int  # libvirt's VIR_DOMAIN_* state
    reason: int  # its reason (e.g. VIR_DOMAIN_RUNNING_POSTCOPY)
    placement: Placement | None  # the agent placement in its <metadata>


def arrival_of(seen: DomainSeen | None, claim: Claim) -> Arrival:
    """Where the claimed instance's migration stands, as seen from here."""
    if seen is None or not seen.active:
        return Arrival.ABSENT
    if seen.state != libvirt.VIR_DOMAIN_RUNNING or seen.reason == libvirt.VIR_DOMAIN_RUNNING_POSTCOPY:
        return Arrival.INCOMING
    return Arrival.ARRIVED if seen.placement == claim.placement else Arrival.FOREIGN


def look_at_domain(conn: Any, instance_uuid: str) -> DomainSeen | None:
    """The claimed instance's domain on `conn` (None when there is none)."""
    try:
        dom = conn.lookupByUUIDString(instance_uuid)
        active = bool(dom.isActive())
        state, reason = dom.state()
        xml = dom.XMLDesc(0) if active else ""
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            log.warning("domain %s: cannot look at it: %s", instance_uuid, exc)
        return None
    return DomainSeen(active, int(state), int(reason), _placement_of(xml, instance_uuid) if active else None)


def _placement_of(xml: str, instance_uuid: str) -> Placement | None:
    try:
        recorded = parse_domain(xml).agent_placement
        return Placement.from_json(dict(recorded)) if recorded is not None else None
    except AgentError as exc:
        log.warning("domain %s: unreadable placement metadata: %s", instance_uuid, exc)
        return None


def reconcile_at_start(ctx: AgentContext) -> int:
    """The ledger against what runs here, before the bus is up (no source to ask): returns the
    number of claims it changed."""
    decisions = ctx.ledger.reconcile(_arrived_uuids(ctx))
    for d in decisions:
        log.warning("claim %s at start: %s -> %s: %s", d.migration_id, d.from_state, d.to_state, d.reason)
    return len(decisions)


def _arrived_uuids(ctx: AgentContext) -> list[str]:
    """Instances of live claims that arrived here (running with their claim's placement)."""
    conn = ctx.libvirt.get()
    return [
        c.instance_uuid
        for c in ctx.ledger.live_claims()
        if arrival_of(look_at_domain(conn, c.instance_uuid), c) is Arrival.ARRIVED
    ]


class ClaimWatcher:
    """The thread that follows live claims (see the module doc); `announce(claim, why)` is told of
    every change it makes, `recount()` after every pass."""

    def __init__(self, ctx: AgentContext, announce: Announce, recount: Callable[[], None]) -> None:
        self.ctx = ctx
        self._announce, self._recount = announce, recount
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_reconcile = time.monotonic()

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name=f"claims-{self.ctx.host}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def domain_changed(self, event: DomainLifecycle) -> None:
        """A lifecycle event: look again now (cheap; most events concern no claim)."""
        log.debug("domain %s %s: looking at the claims again", event.name, event.event)
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(WATCH_INTERVAL_S)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self.pass_once()
            except Exception:  # a bad pass must not end the watch: the next one tries again
                log.exception("claim watcher pass failed")

    def pass_once(self) -> None:
        """One look at every live claim (also called by tests)."""
        live = self.ctx.ledger.live_claims()
        if any(c.expires_at <= self.ctx.clock() for c in live):
            for claim in self.ctx.ledger.expire_due():
                self._announce(claim, "claim expired")
        conn = self.ctx.libvirt.get()
        for claim in self.ctx.ledger.live_claims():
            self._follow(claim, arrival_of(look_at_domain(conn, claim.instance_uuid), claim))
        if time.monotonic() - self._last_reconcile >= self.ctx.cfg.claims.reconcile_interval_s:
            self._reconcile()
        self._recount()

    def _follow(self, claim: Claim, arrival: Arrival) -> None:
        fields = {"migration_id": claim.migration_id, "claim_id": claim.migration_id, "dest_host": self.ctx.host}
        with log_context(instance_uuid=claim.instance_uuid, source_host=claim.source_host, **fields):
            self._act(claim, arrival)

    def _act(self, claim: Claim, arrival: Arrival) -> None:
        try:
            if arrival is Arrival.INCOMING:
                self._changed(claim, self.ctx.ledger.progress(claim.migration_id, "the incoming migration runs here"))
            elif arrival is Arrival.ARRIVED:
                self._changed(claim, self.ctx.ledger.confirm(claim.migration_id, "the domain runs here, as claimed"))
            elif arrival is Arrival.FOREIGN:
                log.warning(
                    "claim %s: instance %s runs here without the claim's placement: not confirming it",
                    claim.migration_id,
                    claim.instance_uuid,
                )
        except (IllegalTransition, UnknownClaim) as exc:  # it ended (expired, released) meanwhile
            log.info("claim %s: %s", claim.migration_id, exc)
            self._announce_current(claim.migration_id)

    def _changed(self, before: Claim, after: Claim) -> None:
        if after.state is not before.state:
            self._announce(after, f"claim {after.state} by the destination")

    def _announce_current(self, migration_id: str) -> None:
        try:
            claim = self.ctx.ledger.get(migration_id)
        except UnknownClaim:
            return
        self._announce(claim, f"claim {claim.state}")

    def _reconcile(self) -> None:
        self._last_reconcile = time.monotonic()
        for d in self.ctx.ledger.reconcile(_arrived_uuids(self.ctx), source_reports_failed=self._source_failed):
            self._announce_current(d.migration_id)

    def _source_failed(self, claim: Claim) -> bool:
        """Does the claim's source say its migration failed or was aborted? (Raises: don't know.)"""
        try:
            status = self.ctx.peers().call(
                claim.source_host,
                "migration_status",
                {"migration_id": claim.migration_id},
                timeout=SOURCE_ASK_TIMEOUT_S,
            )
        except RemoteError as exc:
            log.info("claim %s: its source %s answers %s", claim.migration_id, claim.source_host, exc)
            return False
        return status.get("status") in ("failed", "aborted")


__all__ = ["Arrival", "ClaimWatcher", "DomainSeen", "arrival_of", "look_at_domain", "reconcile_at_start"]
