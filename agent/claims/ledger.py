"""The durable claim ledger: what this host promised to incoming migrations.

The package, by concern: `model` (claim values, states, input checks), `store` (the SQLite file:
schema, opening, transactions, rows), `reconcile` (claims against the running domains), and this
module, `Ledger`, the public entry point that moves claims between states.

A destination agent answers a `claim` with a placement and must hold those pCPUs, MiB and pages from
that moment until the migration ends, across agent crashes and restarts. The ledger is one SQLite
file, `<state_dir>/ledger.db`:

* WAL journal, ``synchronous=FULL`` (a commit that returned is on disk), ``foreign_keys=ON``.
* Schema versioned with ``PRAGMA user_version`` and upgraded in order by `store.MIGRATIONS`, each step in
  one transaction (the version bump included), so a crash mid-upgrade leaves the old version.
  A file from a newer agent is refused (`LedgerSchemaTooNew`) and left untouched.
* Checked at open (``PRAGMA integrity_check``, indexes included, then every row's checksum and
  columns); a damaged file is renamed to ``ledger.db.corrupt-<UTC timestamp>`` with its -wal/-shm
  (never emptied in place), what is readable is salvaged into a new ledger, and new claims are
  refused until the longest a lost claim could still matter has passed or an operator accepts the
  damage (`LedgerDamaged`, ``Ledger.damage``): agent.claims.opening and agent.claims.damage.
* Every row carries a checksum of its content, verified on read (agent.claims.rows): a bad row is
  never used as data (`LedgerCorrupt` where it would decide something, skipped and reported in
  listings), and rows are checked before they are stored.
* Every change is one transaction started with ``BEGIN IMMEDIATE`` (the write lock is taken before
  anything is read, so two processes on one file serialise), under a process-wide lock per file (so
  threads sharing or not sharing a `Ledger` object serialise too). `claim` reads the live claims,
  asks `host_state_fn` for the host state *including them*, fits and records inside that one
  transaction: no pCPU, page or MiB is promised twice. Any SQLite error inside a transaction rolls
  it back and is raised as `LedgerError` (logged at ERROR).
* ``Ledger.open(..., readonly=True)`` (operator commands that only look): SQLite ``mode=ro``,
  nothing created, upgraded or moved aside; writes raise `LedgerError`.
* The ledger has no placement rule of its own: what fits is the fitter's decision
  (agent.numa.fit); the ledger only re-checks that a placement takes no pinned CPU or missing page.

States::

    held --start--> migrating --confirm--> confirmed        (the domain runs here)
      |  \\--confirm--------------------------^
      |--release / expire-->  released | expired           (from held or migrating)

`start` on a migrating claim is a progress report: it refreshes the expiry (no new transition).
`release` of an already released or expired claim and `confirm` of a confirmed one return the claim
unchanged (retries of the bus calls are harmless); every other move out of a terminal state raises
`IllegalTransition` (`ClaimEnded` out of released/expired). Held claims expire `ttl_s` after the
claim, migrating ones `migrating_timeout_s` after their last start/progress; `start`, `progress`
or `confirm` of a live claim already past its expiry records that expiry ("expired before start",
"expired before confirm") and raises `ClaimEnded`, and so does a retried `claim` of a claim that
ended (released or expired): an ended claim is never handed out as if it still held anything.
Terminal claims are pruned `retention_s` after their last change. Every transition is a row of
`transitions` (time, from, to, reason).
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar, cast

from agent.claims.damage import DEFAULT_MAX_TTL_S, LedgerDamage, damage_status
from agent.claims.errors import (
    ClaimConflict,
    ClaimEnded,
    IllegalTransition,
    LedgerCorrupt,
    LedgerDamaged,
    NoFitError,
    UnknownClaim,
)
from agent.claims.model import (
    ALLOWED,
    LIVE_STATES,
    NOOP,
    TERMINAL_STATES,
    Claim,
    ClaimState,
    Fitter,
    HostStateFn,
    HostView,
    ReconcileDecision,
    Transition,
    canonical_json,
    check_migration_id,
    check_source_host,
    check_ttl,
    coerce_request,
    uuid_key,
)
from agent.claims.opening import damage_in_open_ledger, open_store
from agent.claims.reconcile import Reconciler, SourceReportsFailed, running_keys
from agent.claims.rows import BadRow
from agent.claims.store import LEDGER_FILE, SCHEMA_VERSION, ClaimStore
from agent.config import ClaimsConfig
from agent.errors import AgentError, InvalidHostState, InvalidInput
from agent.numa.fit import fit
from agent.numa.placement import NoFit, Placement
from agent.numa.request import InstanceRequest, request_to_json
from agent.numa.state import HostState
from agent.numa.topology import SMALL_PAGE_KB

log = logging.getLogger("compute_agent.claims")

_DEFAULTS = ClaimsConfig()

_F = TypeVar("_F", bound=Callable[..., Any])


def _logged(method: _F) -> _F:
    """Log bad input (InvalidInput and its subclasses) once, at WARNING, before it propagates."""

    @functools.wraps(method)
    def wrapper(self: "Ledger", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except InvalidInput as exc:
            log.warning("claim ledger: %s refused: %s (%s)", method.__name__, exc, exc.code)
            raise

    return cast(_F, wrapper)  # functools.wraps keeps the signature at run time, not for mypy


@dataclass(frozen=True, slots=True)
class _ClaimAsked:
    """A checked `claim` call."""

    migration_id: str
    request: InstanceRequest
    request_json: str  # canonical JSON of the request (what a repeated call must match)
    source_host: str
    ttl_s: float

    def held(self, placement: Placement, now: float) -> Claim:
        return Claim(
            self.migration_id,
            self.request.uuid,
            self.source_host,
            self.request_json,
            placement,
            ClaimState.HELD,
            now,
            now + self.ttl_s,
            now,
            f"claimed for {self.source_host}",
            self.ttl_s,
        )


def _host_view(view: HostState | HostView) -> tuple[HostState, frozenset[str]]:
    """(state, uuid_key of the active domains) of what a host_state_fn returned."""
    if isinstance(view, HostState):
        return view, frozenset()
    return view.state, frozenset(uuid_key(u) for u in getattr(view, "active_uuids", ()))


class Ledger:
    """See the module doc. Open with `Ledger.open`; thread-safe; one per process is enough."""

    def __init__(
        self,
        store: ClaimStore,
        *,
        clock: Callable[[], float],
        fitter: Fitter | None,
        migrating_timeout_s: float,
        retention_s: float,
        recovered_from_corrupt: Path | None = None,
        corrupt_files: tuple[Path, ...] = (),
        max_ttl_s: float = DEFAULT_MAX_TTL_S,
    ) -> None:
        self._store = store
        self.max_ttl_s = float(max_ttl_s)
        self._clock = clock
        self._fitter = fitter
        self.migrating_timeout_s = float(migrating_timeout_s)
        self.retention_s = float(retention_s)
        #: set when open moved a corrupt ledger aside and started a fresh one (on_corrupt="recreate")
        self.recovered_from_corrupt = recovered_from_corrupt
        #: every `ledger.db.corrupt-*` file in the state directory (for the daemon to surface)
        self.corrupt_files = corrupt_files

    # ---- opening -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        state_dir: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        fitter: Fitter | None = None,
        migrating_timeout_s: float = _DEFAULTS.migrating_timeout_s,
        retention_s: float = _DEFAULTS.retention_s,
        on_corrupt: str = "raise",
        busy_timeout_s: float = 30.0,
        create: bool = True,
        readonly: bool = False,
        max_ttl_s: float = DEFAULT_MAX_TTL_S,
    ) -> "Ledger":
        """Open (creating or upgrading) `<state_dir>/ledger.db`.

        Raises LedgerSchemaTooNew (file untouched), LedgerCorrupt (``on_corrupt="raise"``, the
        default: a damaged file is moved aside first, and the next open salvages it),
        LedgerAccessDenied, LedgerBusy, LedgerError (I/O). ``on_corrupt="salvage"`` (what the
        agent uses) salvages at once and returns the salvaged ledger, naming the kept file in
        `recovered_from_corrupt`; ``"recreate"`` does the same but carries nothing over.
        ``create=False`` raises LedgerError instead of creating a missing ledger.

        ``readonly=True`` (operator commands that only look): the file is opened through SQLite's
        ``mode=ro``; nothing is created, upgraded, checkpointed or moved aside. A missing ledger
        or one of an older schema raises LedgerError, a damaged one LedgerCorrupt with
        ``moved_to=None`` (left where it is, for the agent to deal with); every write raises
        LedgerError.

        Damage (see agent.claims.opening): what is readable is salvaged into a new ledger that
        refuses new claims for ``max(max_ttl_s, migrating_timeout_s)`` (the longest a lost claim
        can still hold resources) unless `accept_damage` is called; ``Ledger.damage`` says so.
        ``max_ttl_s``: the longest TTL `claim` accepts. ``busy_timeout_s``: how long a write waits
        for another process's transaction before LedgerBusy (operator commands: about a second).
        """
        if on_corrupt not in ("raise", "salvage", "recreate"):
            raise InvalidInput(f"on_corrupt must be 'raise', 'salvage' or 'recreate', not {on_corrupt!r}")
        opened = open_store(
            Path(state_dir),
            busy_timeout_s=busy_timeout_s,
            on_corrupt=on_corrupt,
            create=create,
            readonly=readonly,
            clock=clock,
            hold_s=max(float(max_ttl_s), float(migrating_timeout_s)),
        )
        return cls(
            opened.store,
            clock=clock,
            fitter=fitter,
            migrating_timeout_s=migrating_timeout_s,
            retention_s=retention_s,
            recovered_from_corrupt=opened.recovered_from_corrupt,
            corrupt_files=opened.corrupt_files,
            max_ttl_s=max_ttl_s,
        )

    @classmethod
    def from_config(cls, cfg: ClaimsConfig, **kwargs: Any) -> "Ledger":
        return cls.open(
            cfg.state_dir,
            migrating_timeout_s=cfg.migrating_timeout_s,
            retention_s=cfg.retention_s,
            max_ttl_s=cfg.claim_ttl_max_s,
            **kwargs,
        )

    @property
    def path(self) -> Path:
        return self._store.path

    @property
    def readonly(self) -> bool:
        """Opened with ``readonly=True``: every write raises LedgerError."""
        return self._store.readonly

    @property
    def _conn(self) -> sqlite3.Connection | None:
        """The open SQLite connection (None once closed); for tests and crash checks that look at rows."""
        return self._store.conn

    def close(self) -> None:
        self._store.close()

    def checkpoint(self) -> None:
        """Fold the WAL into the database file now (PASSIVE: never blocks other writers)."""
        self._store.checkpoint()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return self._store.schema_version()

    # ---- transitions ---------------------------------------------------------------------------

    def _expire_before(self, conn: sqlite3.Connection, claim: Claim, now: float, action: str) -> ClaimEnded:
        """A live claim past its expiry was asked to `action`: record the expiry (the caller
        commits it) and return the error to raise once committed."""
        if claim.state is ClaimState.HELD:
            detail = f"held past its TTL ({claim.ttl_s:g}s)"
        else:
            detail = f"migrating with no progress for {self.migrating_timeout_s:g}s"
        expired = self._store.record(conn, claim, ClaimState.EXPIRED, now, f"expired before {action} ({detail})")
        to = ClaimState.MIGRATING if action == "start" else ClaimState.CONFIRMED
        return ClaimEnded(claim.migration_id, expired.state.value, expired.reason, to.value)

    @staticmethod
    def _check_allowed(claim: Claim, to: ClaimState, reason: str) -> None:
        """Raise ClaimEnded / IllegalTransition unless `claim` may move to `to` (or report progress)."""
        progress = to is ClaimState.MIGRATING and claim.state is ClaimState.MIGRATING
        if progress or to in ALLOWED[claim.state]:
            return
        if claim.state in (ClaimState.RELEASED, ClaimState.EXPIRED):
            raise ClaimEnded(claim.migration_id, claim.state.value, claim.reason, to.value)
        raise IllegalTransition(claim.migration_id, claim.state.value, to.value, reason)

    def _move(self, conn: sqlite3.Connection, claim: Claim, to: ClaimState, reason: str) -> Claim | ClaimEnded:
        """The allowed move of a live claim: expired if past its expiry (the error to raise),
        a progress report (new expiry, no transition), or a recorded transition."""
        now = self._clock()
        if to in (ClaimState.MIGRATING, ClaimState.CONFIRMED) and claim.is_live and claim.expires_at <= now:
            return self._expire_before(conn, claim, now, "start" if to is ClaimState.MIGRATING else "confirm")
        if to is ClaimState.MIGRATING and claim.state is ClaimState.MIGRATING:
            return self._store.refresh_expiry(conn, claim, now, now + self.migrating_timeout_s)
        expires = now + self.migrating_timeout_s if to is ClaimState.MIGRATING else None
        return self._store.record(conn, claim, to, now, reason, expires)

    def _transition(self, migration_id: str, to: ClaimState, reason: str) -> Claim:
        """Move one claim to `to` (see the module doc for what is allowed and what is a no-op).

        A live claim already past its expiry is expired instead of moved to migrating or
        confirmed (that expiry is committed) and ClaimEnded is raised.
        """
        check_migration_id(migration_id)
        with self._store.tx() as conn:
            claim = self._store.get(conn, migration_id)
            if claim is None:
                raise UnknownClaim(migration_id)
            if claim.state in NOOP.get(to, frozenset()):
                log.info("claim %s: already %s, %s ignored (%s)", migration_id, claim.state, to.value, reason)
                return claim
            self._check_allowed(claim, to, reason)
            new = self._move(conn, claim, to, reason)
        if isinstance(new, ClaimEnded):
            raise new  # committed first; logged (WARNING) by @_logged on start/confirm
        if new.state is claim.state:
            log.debug("claim %s: progress, expiry moved to %.0f", migration_id, new.expires_at)
        else:
            log.info("claim %s (instance %s): %s -> %s: %s", migration_id, claim.instance_uuid, claim.state, to, reason)
        return new

    # ---- claims --------------------------------------------------------------------------------

    @_logged
    def claim(
        self,
        migration_id: str,
        request: InstanceRequest | Mapping[str, Any] | str | bytes,
        source_host: str,
        ttl_s: float,
        host_state_fn: HostStateFn,
    ) -> Claim:
        """Fit `request` on the host state (live claims included) and hold the placement.

        Idempotent by `migration_id`: the same request from the same source returns the stored
        claim while it is held, migrating or confirmed; once it ended (released, expired - also
        when it expires at this very call) ClaimEnded is raised: it holds nothing any more.
        Anything else under that id raises ClaimConflict, as does a claim for an instance that
        already has a live claim or (when `host_state_fn` returns a HostView such as
        hoststate.HostStateReport) already runs on this host. NoFitError when it does not fit.

        Steps: check the input -> the existing claim under that id (idempotency) -> expire what is
        due -> the host state with the live claims -> fit -> verify no double booking -> record.
        """
        asked = self._check_claim(migration_id, request, source_host, ttl_s)
        with self._store.tx() as conn:
            now = self._clock()
            existing = self._existing(conn, asked)
            expired = self._expire_due_locked(conn, now)
            outcome: Claim | ClaimEnded | NoFit
            if existing is not None:
                outcome = self._repeated(asked, existing, expired)
            else:
                outcome = self._hold(conn, asked, host_state_fn, now)
        self._log_expired(expired, "claim")  # committed, even when the claim is refused below
        return self._claim_result(asked, outcome, new=existing is None)

    def _check_claim(self, migration_id: Any, request: Any, source_host: Any, ttl_s: Any) -> _ClaimAsked:
        check_migration_id(migration_id)
        req = coerce_request(request)
        check_source_host(source_host)
        ttl = check_ttl(ttl_s)
        if ttl > self.max_ttl_s:  # the bound that makes the hold after damage long enough
            raise InvalidInput(f"ttl_s {ttl:g} is over this ledger's longest TTL ({self.max_ttl_s:g}s)")
        return _ClaimAsked(migration_id, req, canonical_json(request_to_json(req)), source_host, ttl)

    def _existing(self, conn: sqlite3.Connection, asked: _ClaimAsked) -> Claim | None:
        """The claim already stored under this id; ClaimConflict if it was asked differently."""
        existing = self._store.get(conn, asked.migration_id)
        if existing is None:
            return None
        if existing.request_json != asked.request_json or existing.source_host != asked.source_host:
            what = "request" if existing.request_json != asked.request_json else f"source host ({existing.source_host})"
            raise ClaimConflict(f"migration {asked.migration_id!r} already has a claim with a different {what}")
        return existing

    @staticmethod
    def _repeated(asked: _ClaimAsked, existing: Claim, expired: list[Claim]) -> Claim | ClaimEnded:
        """A repeated claim: the stored claim, or the error to raise once any expiry is committed."""
        existing = next((c for c in expired if c.migration_id == asked.migration_id), existing)
        if existing.state in (ClaimState.RELEASED, ClaimState.EXPIRED):
            return ClaimEnded(asked.migration_id, existing.state.value, existing.reason, ClaimState.HELD.value)
        log.info("claim %s: repeated request, returning the stored %s claim", asked.migration_id, existing.state)
        return existing

    def _hold(
        self, conn: sqlite3.Connection, asked: _ClaimAsked, host_state_fn: HostStateFn, now: float
    ) -> Claim | NoFit:
        """A new claim: fit on the host state (live claims included) and record it, or NoFit."""
        self._refuse_if_damaged(conn, now)
        live = self._store.live(conn)
        _refuse_second_live_claim(asked, live)
        state, active = _host_view(host_state_fn(live))
        _check_cell_ids(state)
        if uuid_key(asked.request.uuid) in active:
            raise ClaimConflict(
                f"claim {asked.migration_id}: instance {asked.request.uuid} already runs on this host; "
                "a migration cannot bring it here"
            )
        placement = self._fit(asked.request, state)
        if isinstance(placement, NoFit):
            return placement
        _verify_no_double_booking(placement, state, asked.migration_id)
        claim = asked.held(placement, now)
        self._store.insert(conn, claim, f"claimed for {asked.source_host}, ttl {asked.ttl_s:g}s")
        return claim

    def _refuse_if_damaged(self, conn: sqlite3.Connection, now: float) -> None:
        """No new claim while a damage may have lost claims that still hold resources."""
        if self._store.bad_rows and not self.readonly:
            raise LedgerCorrupt(
                self.path,
                f"damaged rows met since open ({self._store.bad_rows[0]}); reopen the ledger to salvage it",
                None,
            )
        status = damage_status(self._store.damage_records(conn), now, None)
        if status is not None and status.refusing_new_claims and status.hold_until is not None:
            raise LedgerDamaged(self.path, status.records[-1].detail, status.hold_until)

    def _fit(self, request: InstanceRequest, state: HostState) -> Placement | NoFit:
        result = (self._fitter or fit)(request, state)
        if isinstance(result, NoFit):
            return result
        if not getattr(result, "fits", False):  # a fitter's own "no" that is not a NoFit
            return NoFit(str(getattr(result, "reason", result)))
        return result

    @staticmethod
    def _claim_result(asked: _ClaimAsked, outcome: Claim | ClaimEnded | NoFit, *, new: bool) -> Claim:
        if isinstance(outcome, ClaimEnded):
            raise outcome
        if isinstance(outcome, NoFit):
            log.info(
                "claim %s (instance %s) from %s: does not fit: %s",
                asked.migration_id,
                asked.request.uuid,
                asked.source_host,
                outcome.reason,
            )
            raise NoFitError(outcome.reason, outcome)
        if new and log.isEnabledFor(logging.INFO):  # its arguments cost ~5 % of a claim: only when logged
            log.info(
                "claim %s (instance %s) from %s: held until %.0f on cells %s, pinned CPUs %s",
                asked.migration_id,
                asked.request.uuid,
                asked.source_host,
                outcome.expires_at,
                list(outcome.placement.host_nodeset),
                sorted(outcome.placement.pinned_cpus),
            )
        return outcome

    @_logged
    def start(self, migration_id: str, reason: str = "source reported the migration started") -> Claim:
        """held -> migrating; on a migrating claim, a progress report that refreshes its expiry.

        One transaction. A claim past its expiry is expired (recorded) and ClaimEnded raised."""
        return self._transition(migration_id, ClaimState.MIGRATING, reason)

    progress = start

    @_logged
    def extend(
        self, migration_id: str, ttl_s: float, reason: str = "the source extends the claim for its migration"
    ) -> Claim:
        """`progress` (held -> migrating, or a migrating claim's expiry refreshed) that keeps the
        claim `ttl_s` from now instead of `migrating_timeout_s` when that is longer (a progress
        report is never worth less than the plain one).

        `ttl_s` is bounded by `max_ttl_s` (as a claim's: the hold after damage covers it); InvalidInput
        beyond. The progress is one transaction (its expiry rules, ClaimEnded, ...), the longer
        expiry a second one, only while the claim is still migrating."""
        ttl = check_ttl(ttl_s)
        if ttl > self.max_ttl_s:  # the bound that makes the hold after damage long enough
            raise InvalidInput(f"ttl_s {ttl:g} is over this ledger's longest TTL ({self.max_ttl_s:g}s)")
        claim = self._transition(migration_id, ClaimState.MIGRATING, reason)
        with self._store.tx() as conn:
            now = self._clock()
            current = self._store.get(conn, migration_id)
            if current is None or current.state is not ClaimState.MIGRATING or current.expires_at >= now + ttl:
                return current or claim
            return self._store.refresh_expiry(conn, current, now, now + ttl)

    @_logged
    def confirm(self, migration_id: str, reason: str = "the domain runs here") -> Claim:
        """held/migrating -> confirmed (confirmed: no-op). A claim past its expiry is expired
        (recorded) and ClaimEnded raised: it was not holding anything any more."""
        return self._transition(migration_id, ClaimState.CONFIRMED, reason)

    @_logged
    def release(self, migration_id: str, reason: str) -> Claim:
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 1000:
            raise InvalidInput("release needs a reason of 1-1000 characters")
        return self._transition(migration_id, ClaimState.RELEASED, reason.strip())

    def _expire_due_locked(self, conn: sqlite3.Connection, now: float) -> list[Claim]:
        out = []
        for c in self._store.due(conn, now):
            if c.state is ClaimState.HELD:
                why = f"held past its TTL ({c.ttl_s:g}s) without the migration starting"
            else:
                why = f"migrating with no progress for {self.migrating_timeout_s:g}s"
            out.append(self._store.record(conn, c, ClaimState.EXPIRED, now, why))
        return out

    @staticmethod
    def _log_expired(expired: Iterable[Claim], where: str) -> None:
        for c in expired:
            log.warning("claim %s (instance %s): expired (%s): %s", c.migration_id, c.instance_uuid, where, c.reason)

    @_logged
    def expire_due(self, now: float | None = None) -> list[Claim]:
        """Expire every live claim past its expiry; returns the expired claims."""
        with self._store.tx() as conn:
            expired = self._expire_due_locked(conn, self._clock() if now is None else now)
        self._log_expired(expired, "expire_due")
        return expired

    # ---- reading -------------------------------------------------------------------------------

    @_logged
    def get(self, migration_id: str) -> Claim:
        check_migration_id(migration_id)
        with self._store.read() as conn:
            claim = self._store.get(conn, migration_id)
        if claim is None:
            raise UnknownClaim(migration_id)
        return claim

    @_logged
    def list_claims(
        self, states: Iterable[ClaimState | str] | None = None, *, ended_limit: int | None = None
    ) -> list[Claim]:
        """Claims in `states` (every claim by default), oldest first; a damaged row is skipped and
        kept in `unreadable_rows`. ``ended_limit``: of the ended (terminal) claims, only that many
        changed last (a listing stays fast with a long history; `count_claims` says how many)."""
        wanted = [s.value for s in ClaimState] if states is None else _state_values(states)
        with self._store.read() as conn:
            if ended_limit is None:
                return self._store.in_states(conn, None if states is None else wanted, strict=False)
            live = self._store.in_states(conn, [s for s in wanted if ClaimState(s) in LIVE_STATES], strict=False)
            ended = [s for s in wanted if ClaimState(s) in TERMINAL_STATES]
            claims = live + self._store.latest_ended(conn, ended, ended_limit)
        return sorted(claims, key=lambda c: (c.created_at, c.migration_id))

    def count_claims(self, states: Iterable[ClaimState | str] | None = None) -> int:
        wanted = [s.value for s in ClaimState] if states is None else _state_values(states)
        with self._store.read() as conn:
            return self._store.count(conn, wanted) if wanted else 0

    def live_claims(self) -> list[Claim]:
        """Held and migrating claims; a damaged row among them raises LedgerCorrupt (what holds
        resources must never be skipped)."""
        with self._store.read() as conn:
            return self._store.live(conn)

    @property
    def unreadable_rows(self) -> tuple[BadRow, ...]:
        """Damaged rows met since open (skipped by `list_claims` and `transitions`, logged at ERROR)."""
        return tuple(self._store.bad_rows)

    # ---- damage --------------------------------------------------------------------------------

    @property
    def damage(self) -> LedgerDamage | None:
        """The damage status: None when this ledger was never found damaged (see agent.claims.damage).
        For `describe_host` and the capability report to carry, and `claims list` to show."""
        with self._store.read() as conn:
            records = self._store.damage_records(conn)
        seen = None
        if self._store.bad_rows and not self.readonly:
            seen = f"damaged row(s) met since open: {self._store.bad_rows[0]}"
        return damage_status(records, self._clock(), seen)

    def verify(self) -> LedgerDamage | None:
        """Check the ledger in use as at open (integrity_check with its indexes, schema, every
        claim's checksum, live claims in full): ~0.1 s for 20,000 claims, run by every `reconcile`.
        Damage found makes new claims refused until the ledger is reopened (which salvages it)."""
        with self._store.read() as conn:
            detail = damage_in_open_ledger(conn)
        if detail is not None:
            self._store.note_bad(BadRow("ledger", "check", detail))
        return self.damage

    def accept_damage(self, by: str) -> LedgerDamage | None:
        """An operator accepts the recorded damage: new claims are allowed again (recorded durably)."""
        if not isinstance(by, str) or not by.strip() or len(by) > 1000:
            raise InvalidInput("accept_damage needs who and why, 1-1000 characters")
        with self._store.tx() as conn:
            n = self._store.accept_damage(conn, self._clock(), by.strip())
        log.warning("claim ledger %s: %d damage record(s) accepted by %s: new claims allowed", self.path, n, by)
        return self.damage

    @_logged
    def transitions(self, migration_id: str) -> list[Transition]:
        check_migration_id(migration_id)
        with self._store.read() as conn:
            found = self._store.transitions(conn, migration_id)
            if not found and self._store.get(conn, migration_id) is None:
                raise UnknownClaim(migration_id)
        return found

    # ---- housekeeping --------------------------------------------------------------------------

    @_logged
    def prune(self, now: float | None = None) -> int:
        """Delete terminal claims (and their transitions) last changed more than retention_s ago."""
        with self._store.tx() as conn:
            cutoff = (self._clock() if now is None else now) - self.retention_s
            n = self._store.delete_ended_before(conn, cutoff)
        if n:
            log.info("claim ledger: pruned %d terminal claim(s) older than %gs", n, self.retention_s)
        return n

    @_logged
    def reconcile(
        self,
        running_domains: Iterable[Any],
        now: float | None = None,
        source_reports_failed: SourceReportsFailed | None = None,
        *,
        prune: bool = True,
    ) -> list[ReconcileDecision]:
        """Bring live claims in line with what runs here (at start and periodically).

        `running_domains`: DomainPlacement objects or instance UUIDs of the domains *running* on
        this host (not the paused incoming domain of a migration in progress: that one would be
        confirmed too early). For each held/migrating claim, in this order, decided inside one
        transaction from the claim's current row (not from a snapshot a `progress` may have
        overtaken):

        1. its instance runs here -> confirmed;
        2. past its expiry -> expired;
        3. migrating, its domain is not here, and `source_reports_failed(claim)` says True ->
           released, unless the claim changed while the source was asked. The callback runs
           outside the ledger lock (it may ask the source over the bus); an exception from it
           counts as "don't know" and the claim is kept.

        Every change is logged with its reason and returned; terminal claims past retention are
        pruned afterwards (``prune=False`` to skip). The steps are in agent.claims.reconcile.
        The ledger is verified first (`verify`).
        """
        self.verify()  # damage met in use stops new claims now, not at the next restart
        when = self._clock() if now is None else now
        running = running_keys(running_domains)
        reconciler = Reconciler(self._store, self._clock, self.migrating_timeout_s, running, when)
        # the snapshot only says which claims to look at: each is decided from its fresh row
        decisions = reconciler.run(self.live_claims(), source_reports_failed)
        if prune:
            self.prune(when)
        return decisions


def _state_values(states: Iterable[ClaimState | str]) -> list[str]:
    try:
        return sorted({ClaimState(s).value for s in states})
    except ValueError as exc:
        raise InvalidInput(f"unknown claim state: {exc}") from None


def _check_cell_ids(state: HostState) -> None:
    """Cell ids are what a placement is stored with: a negative one would make the stored claim
    unreadable, so such a host state is refused before anything is fitted or stored."""
    bad = sorted(c.id for c in state.topology.cells if not isinstance(c.id, int) or c.id < 0)
    if bad:
        raise InvalidHostState(f"host state has cell ids {bad}: cell ids must be >= 0; refusing to claim on it")


def _refuse_second_live_claim(asked: _ClaimAsked, live: list[Claim]) -> None:
    key = uuid_key(asked.request.uuid)
    other = [c for c in live if uuid_key(c.instance_uuid) == key]
    if other:
        raise ClaimConflict(
            f"claim {asked.migration_id}: instance {asked.request.uuid} already has a live claim "
            f"({other[0].migration_id}, {other[0].state}); release it first"
        )


def _verify_no_double_booking(placement: Placement, state: HostState, migration_id: str) -> None:
    """Belt and braces: the fitter's placement must not take a pinned CPU or more pages than free."""
    _verify_cpus(placement, state, migration_id)
    _verify_pages(placement, state, migration_id)


def _verify_cpus(placement: Placement, state: HostState, migration_id: str) -> None:
    taken: set[int] = set()
    for u in state.usage.values():
        taken |= u.pinned_cpus
    clash = placement.pinned_cpus & taken
    offline = placement.pinned_cpus - state.topology.online_cpus
    if clash or offline:
        raise AgentError(
            f"claim {migration_id}: the fitter returned a placement that takes CPUs already pinned "
            f"{sorted(clash)} or offline {sorted(offline)}; refusing to record it"
        )


def _hugepages_needed(placement: Placement) -> dict[tuple[int, int], int]:
    """(host cell, page size KiB) -> pages the placement takes, hugepages only."""
    need: dict[tuple[int, int], int] = {}
    for c in placement.cells:
        if c.pagesize_kb != SMALL_PAGE_KB:
            key = (c.host_cell, c.pagesize_kb)
            need[key] = need.get(key, 0) - (-c.memory_mb * 1024 // c.pagesize_kb)
    return need


def _verify_pages(placement: Placement, state: HostState, migration_id: str) -> None:
    for (cell, size), n in _hugepages_needed(placement).items():
        try:
            free = state.resources(cell).free_pages.get(size, 0)
        except KeyError:
            free = 0
        if n > free:
            raise AgentError(
                f"claim {migration_id}: the fitter placed {n} pages of {size} KiB on cell {cell}, "
                f"which has {free} free; refusing to record it"
            )


# The claims package's public surface, as before the split: the model and the store's names are
# re-exported here so that callers keep importing from agent.claims.ledger.
__all__ = [
    "Claim",
    "ClaimState",
    "LIVE_STATES",
    "Ledger",
    "LEDGER_FILE",
    "ReconcileDecision",
    "SCHEMA_VERSION",
    "TERMINAL_STATES",
    "Transition",
    "check_migration_id",
    "uuid_key",
]
