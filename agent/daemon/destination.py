"""The destination side: what this host can take, and the claims that hold it for incoming migrations.

Served (docs/protocol.md, section 5): `describe_host`, `fit` (a dry run), `claim`, `extend_claim`,
`confirm_claim`, `release_claim`. The ledger (agent.claims.ledger) decides and records; this module
checks the inbound limit, maps the ledger's typed errors to the wire's, announces every change
(`claim.<host>` events, `ctx.changed()` for capabilities) and keeps claims in step with what
arrives.

A claim's life here, besides the calls:

* `extend_claim` from the source (its migration makes progress) moves a held claim to migrating
  and refreshes its expiry (`[claims] migrating_timeout_s`, or the call's `ttl_s` when longer).
* The watcher (a thread of its own, every `WATCH_INTERVAL_S` and at once on a lifecycle event of a
  claimed instance) looks at each live claim's domain here: the incoming copy (defined, not running
  yet, or running in post-copy) is progress; the domain running here with the claim's own placement
  in its `<metadata>` confirms the claim, so a destination confirms on its own when the source is
  gone. Claims past their expiry are expired (never started, or stalled), and every
  `[claims] reconcile_interval_s` the ledger's reconcile runs, asking the source whether a
  migrating claim's migration failed.
* Claims are idempotent by migration id: a repeated claim returns the stored one, and the inbound
  limit never refuses a repeat.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, TypeVar, cast

import msgspec

from agent.bus import schemas
from agent.bus.errors import (
    RemoteBusy,
    RemoteConflict,
    RemoteError,
    RemoteInvalidRequest,
    RemoteNoFit,
    RemoteNotFound,
    RemoteRefused,
)
from agent.claims.errors import ClaimConflict, IllegalTransition, NoFitError, UnknownClaim
from agent.claims.hoststate import host_state_fn
from agent.claims.model import LIVE_STATES, Claim, ClaimState
from agent.daemon.capabilities import Announcer, host_state_and_domains, host_state_now, running_instances
from agent.daemon.context import AgentContext, DomainLifecycle
from agent.daemon.destination_watch import ClaimWatcher
from agent.errors import InvalidInput, InvalidRequest
from agent.libvirt_ops.errors import LibvirtConnectionError
from agent.libvirt_ops.inventory import IncompleteInventory, read_domains
from agent.log import log_context
from agent.numa.fit import fit
from agent.numa.placement import NoFit

if TYPE_CHECKING:
    from agent.bus.rpc import RpcServer

log = logging.getLogger("compute_agent.daemon.destination")

#: a Busy answer asks again within this: a slot frees when a migration ends, typically in tens of seconds
MAX_RETRY_AFTER_S = 60.0
MIN_RETRY_AFTER_S = 1.0

_H = TypeVar("_H", bound=Callable[..., Any])


# --- typed errors -> wire errors ---------------------------------------------------------------------


def wire_error(exc: Exception) -> RemoteError | None:
    """The wire error for one of the ledger's or the request parser's typed errors (None: not ours)."""
    if isinstance(exc, NoFitError):
        return schemas.no_fit_error(exc.nofit) if isinstance(exc.nofit, NoFit) else RemoteNoFit(exc.reason)
    if isinstance(exc, UnknownClaim):
        return RemoteNotFound(exc.message, details={"code": exc.code})
    if isinstance(exc, (ClaimConflict, IllegalTransition)):  # ClaimEnded included: it holds nothing
        return RemoteConflict(exc.message, details={"code": exc.code})
    if isinstance(exc, (IncompleteInventory, LibvirtConnectionError)):  # not now: nothing is known to be wrong
        return RemoteRefused(exc.message, details={"code": exc.code})
    if isinstance(exc, InvalidRequest):
        return RemoteInvalidRequest(exc.message, details={"field": "body.instance", "keys": list(exc.keys)})
    if isinstance(exc, InvalidInput):
        return RemoteInvalidRequest(exc.message, details={"code": exc.code})
    return None


def _answers_on_the_wire(handler: _H) -> _H:
    """Raise the handler's typed errors as the wire errors of docs/protocol.md section 3, with the
    call's migration fields bound to every record it logs (journalctl MIGRATION_ID=...)."""

    @functools.wraps(handler)
    def wrapper(self: Destination, body: Any) -> Any:
        with log_context(**_log_fields(self.ctx.host, body)):
            try:
                return handler(self, body)
            except RemoteError:
                raise
            except Exception as exc:
                remote = wire_error(exc)
                if remote is None:
                    raise
                raise remote from None

    return cast(_H, wrapper)  # functools.wraps keeps the signature at run time, not for mypy


def _log_fields(host: str, body: Any) -> dict[str, str]:
    fields = {"dest_host": host}
    migration_id = getattr(body, "migration_id", None)
    if migration_id is not None:
        fields["migration_id"] = fields["claim_id"] = migration_id
    if getattr(body, "source_host", None) is not None:
        fields["source_host"] = body.source_host
    instance = getattr(body, "instance", None)
    if isinstance(instance, dict) and isinstance(instance.get("uuid"), str):
        fields["instance_uuid"] = instance["uuid"][:255]  # unchecked yet: bounded for the journal
    return fields


def _claim_fields(claim: Claim) -> contextlib.AbstractContextManager[None]:
    """The claim's own fields on the records of a call that names only its migration id."""
    return log_context(source_host=claim.source_host, instance_uuid=claim.instance_uuid)


def retry_after_s(live: list[Claim], now: float) -> float:
    """When a full inbound limit may have room: the earliest live claim's expiry, within bounds."""
    soonest = min((c.expires_at for c in live), default=now)
    return max(MIN_RETRY_AFTER_S, min(MAX_RETRY_AFTER_S, soonest - now))


# --- the role ----------------------------------------------------------------------------------------


class Destination:
    """The destination role (agent.daemon.context.Role)."""

    def __init__(self, ctx: AgentContext, announcer: Announcer | None = None) -> None:
        self.ctx = ctx
        self.announcer = announcer
        self._claim_lock = threading.Lock()  # the inbound limit is checked and the claim taken at once
        self._live = 0  # live claims as last counted (status() must not read SQLite on the control loop)
        self.watcher = ClaimWatcher(ctx, self._announce, self._count_live)

    # -- Role -------------------------------------------------------------------------------------

    def register(self, server: RpcServer) -> None:
        server.register("describe_host", self.describe_host, since="1.0", body_type=schemas.Empty)
        server.register("fit", self.fit, since="1.1", body_type=schemas.FitBody)
        server.register("claim", self.claim, since="1.1", body_type=schemas.ClaimBody)
        server.register("extend_claim", self.extend_claim, since="1.1", body_type=schemas.ExtendClaimBody)
        server.register("confirm_claim", self.confirm_claim, since="1.1", body_type=schemas.ConfirmClaimBody)
        server.register("release_claim", self.release_claim, since="1.1", body_type=schemas.ReleaseClaimBody)

    def start(self) -> None:
        self.ctx.domain_events.subscribe(self._on_domain_event)
        self._count_live()
        self.watcher.start()

    def stop(self) -> None:
        self.watcher.stop()

    def status(self) -> str:
        n = self._live
        return f"{n} claim{'' if n == 1 else 's'} held"

    # -- methods ----------------------------------------------------------------------------------

    @_answers_on_the_wire
    def describe_host(self, _: schemas.Empty) -> dict[str, Any]:
        if self.announcer is None:
            raise RemoteRefused("this agent has not read its host facts yet", details={"code": "starting"})
        report, domains = host_state_and_domains(self.ctx)
        doc = msgspec.to_builtins(self.announcer.current(report.state))
        doc["host_state"] = report.state.to_json()
        doc["host_state"]["problems"] = [*report.unreadable, *report.overlaps, *report.notes]
        doc["instances"] = running_instances(domains)  # what `compute-agent drain` moves
        doc["host_load"] = _host_load_doc()
        doc["ledger"] = self._ledger_doc()
        return doc

    @_answers_on_the_wire
    def fit(self, body: schemas.FitBody) -> dict[str, Any]:
        request = body.request()
        report = host_state_now(self.ctx)
        if report.unreadable:
            raise IncompleteInventory("cannot account for every domain on this host: " + "; ".join(report.unreadable))
        result = fit(request, report.state, preference=self.ctx.cfg.compute.placement_preference)
        if isinstance(result, NoFit):
            raise schemas.no_fit_error(result)
        return result.to_json()

    @_answers_on_the_wire
    def claim(self, body: schemas.ClaimBody) -> dict[str, Any]:
        request = body.request()
        cfg = self.ctx.cfg
        ttl = body.ttl_s if body.ttl_s is not None else float(cfg.claims.claim_ttl_s)
        with self._claim_lock:
            live = self._check_inbound_limit(body.migration_id, cfg.max_concurrent_incoming_migrations)
            claim = self.ctx.ledger.claim(
                body.migration_id,
                request,
                body.source_host,
                ttl,
                host_state_fn(self.ctx.topology.fresh, self._inventory, cfg.compute),
            )
        if claim.state is ClaimState.HELD and all(c.migration_id != claim.migration_id for c in live):
            self._announce(claim, "claim taken")  # new: a repeat of a held or ended claim says nothing
        return {"placement": claim.placement.to_json(), "expires_at": claim.expires_at}

    @_answers_on_the_wire
    def extend_claim(self, body: schemas.ExtendClaimBody) -> dict[str, Any]:
        # progress: [claims] migrating_timeout_s from now; with ttl_s, that long when it is longer
        # (bounded by [claims] claim_ttl_max_s: InvalidRequest beyond)
        before = self.ctx.ledger.get(body.migration_id)
        reason = "the source reports its migration makes progress"
        with _claim_fields(before):
            if body.ttl_s is None:
                claim = self.ctx.ledger.progress(body.migration_id, reason)
            else:
                claim = self.ctx.ledger.extend(body.migration_id, body.ttl_s, reason)
        if claim.state is not before.state:
            self._announce(claim, "migration started")
        return claim.to_json()

    @_answers_on_the_wire
    def confirm_claim(self, body: schemas.ConfirmClaimBody) -> dict[str, Any]:
        return self._end(body.migration_id, ClaimState.CONFIRMED, "the source reports its migration completed")

    @_answers_on_the_wire
    def release_claim(self, body: schemas.ReleaseClaimBody) -> dict[str, Any]:
        return self._end(body.migration_id, ClaimState.RELEASED, body.reason)

    # -- helpers ----------------------------------------------------------------------------------

    def _end(self, migration_id: str, to: ClaimState, reason: str) -> dict[str, Any]:
        before = self.ctx.ledger.get(migration_id)
        with _claim_fields(before):
            if to is ClaimState.CONFIRMED:
                claim = self.ctx.ledger.confirm(migration_id, reason)
            else:
                claim = self.ctx.ledger.release(migration_id, reason)
        if claim.state is not before.state:
            self._announce(claim, f"claim {claim.state}")
        return claim.to_json()

    def _inventory(self) -> Any:
        return read_domains(self.ctx.libvirt.get())

    def _check_inbound_limit(self, migration_id: str, limit: int) -> list[Claim]:
        """The live claims; Busy when `limit` are live already (a repeat of one is never refused)."""
        live = self.ctx.ledger.live_claims()
        if len(live) < limit or any(c.migration_id == migration_id for c in live):
            return live
        wait = retry_after_s(live, self.ctx.clock())
        log.info("claim %s refused: %d incoming migrations held (limit %d)", migration_id, len(live), limit)
        raise RemoteBusy(
            f"{len(live)} incoming migrations are held here (limit {limit}); ask again in {wait:.0f} s",
            retry_after=wait,
        )

    def _count_live(self) -> None:
        claims = self.ctx.ledger.list_claims()
        by_state = Counter(c.state.value for c in claims)
        self._live = sum(by_state[s.value] for s in LIVE_STATES)
        self.ctx.metrics.set_claims({s.value: by_state[s.value] for s in ClaimState})

    def _announce(self, claim: Claim, why: str) -> None:
        """A claim changed state: the `claim.<host>` event, the counts, capabilities soon."""
        event = schemas.ClaimEvent(
            host=self.ctx.host,
            migration_id=claim.migration_id,
            instance_uuid=claim.instance_uuid,
            state=claim.state.value,
            reason=(claim.reason or "")[:4096] or None,
            ts=self.ctx.clock(),
        )
        try:
            self.ctx.events.publish(f"claim.{self.ctx.host}", event, wait=False)
        except Exception as exc:  # the claim is recorded; a lost event only delays listeners
            log.warning("claim %s: cannot publish its %s event: %s", claim.migration_id, claim.state, exc)
        self._count_live()
        self.ctx.changed(f"{why} ({claim.migration_id})")

    def _on_domain_event(self, event: DomainLifecycle) -> None:
        self.watcher.domain_changed(event)

    def _ledger_doc(self) -> dict[str, Any]:
        ledger = self.ctx.ledger
        recovered = ledger.recovered_from_corrupt
        return {
            "path": str(ledger.path),
            "schema_version": ledger.schema_version,
            "corrupt_files": [str(p) for p in ledger.corrupt_files],
            "recovered_from_corrupt": str(recovered) if recovered is not None else None,
            "damage": damage.to_json() if (damage := ledger.damage) is not None else None,
        }


def _host_load_doc() -> dict[str, Any]:
    from agent.daemon.host_load import read_host_load  # psutil: loaded on the first describe_host, not at start

    load = read_host_load()
    return {
        "load_1m": load.load_1m,
        "load_5m": load.load_5m,
        "load_15m": load.load_15m,
        "cpus_online": load.cpus_online,
        "memory_total_bytes": load.memory_total_bytes,
        "memory_available_bytes": load.memory_available_bytes,
        "memory_used_percent": round(load.memory_used_percent, 1),
        "swap_used_bytes": load.swap_used_bytes,
    }
