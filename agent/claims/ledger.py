"""The durable claim ledger: what this host promised to incoming migrations.

A destination agent answers a `claim` with a placement and must hold those pCPUs, MiB and pages from
that moment until the migration ends, across agent crashes and restarts. The ledger is one SQLite
file, `<state_dir>/ledger.db`:

* WAL journal, ``synchronous=FULL`` (a commit that returned is on disk), ``foreign_keys=ON``.
* Schema versioned with ``PRAGMA user_version`` and upgraded in order by `_MIGRATIONS`, each step in
  one transaction (the version bump included), so a crash mid-upgrade leaves the old version.
  A file from a newer agent is refused (`LedgerSchemaTooNew`) and left untouched.
* Checked at open (``PRAGMA quick_check``); a corrupt file (or one that is not a database) is renamed
  to ``ledger.db.corrupt-<UTC timestamp>`` with its -wal/-shm, logged at ERROR and reported:
  `LedgerCorrupt` by default, or (``on_corrupt="recreate"``) a fresh ledger whose
  `recovered_from_corrupt` names the moved file. It is never emptied in place.
* Every change is one transaction started with ``BEGIN IMMEDIATE`` (the write lock is taken before
  anything is read, so two processes on one file serialise), under a process-wide lock per file (so
  threads sharing or not sharing a `Ledger` object serialise too). `claim` reads the live claims,
  asks `host_state_fn` for the host state *including them*, fits and records inside that one
  transaction: no pCPU, page or MiB is promised twice.

States::

    held --start--> migrating --confirm--> confirmed        (the domain runs here)
      |  \\--confirm--------------------------^
      |--release / expire-->  released | expired           (from held or migrating)

`start` on a migrating claim is a progress report: it refreshes the expiry (no new transition).
`release` of an already released or expired claim and `confirm` of a confirmed one return the claim
unchanged (retries of the bus calls are harmless); every other move out of a terminal state raises
`IllegalTransition`. Held claims expire `ttl_s` after the claim, migrating ones
`migrating_timeout_s` after their last start/progress. Terminal claims are pruned `retention_s`
after their last change. Every transition is a row of `transitions` (time, from, to, reason).
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

from agent.claims.errors import (
    ClaimConflict,
    IllegalTransition,
    LedgerCorrupt,
    LedgerError,
    LedgerSchemaTooNew,
    NoFitError,
    UnknownClaim,
)
from agent.config import ClaimsConfig
from agent.errors import AgentError, InvalidInput
from agent.numa.placement import NoFit, Placement
from agent.numa.request import MAX_MEMORY_MB, MAX_VCPUS, InstanceRequest, parse_request, request_to_json
from agent.numa.state import HostState

log = logging.getLogger("compute_agent.claims")

LEDGER_FILE = "ledger.db"
_DEFAULTS = ClaimsConfig()
MAX_TTL_S = 30 * 24 * 3600
_MIGRATION_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}", re.ASCII)

_F = TypeVar("_F", bound=Callable[..., Any])
Fitter = Callable[[InstanceRequest, HostState], "Placement | NoFit"]
HostStateFn = Callable[[Iterable["Claim"]], HostState]


class ClaimState(str, enum.Enum):
    HELD = "held"
    MIGRATING = "migrating"
    CONFIRMED = "confirmed"
    RELEASED = "released"
    EXPIRED = "expired"

    def __str__(self) -> str:
        return self.value


LIVE_STATES = frozenset({ClaimState.HELD, ClaimState.MIGRATING})
TERMINAL_STATES = frozenset({ClaimState.CONFIRMED, ClaimState.RELEASED, ClaimState.EXPIRED})
_ALLOWED: Mapping[ClaimState, frozenset[ClaimState]] = {
    ClaimState.HELD: frozenset({ClaimState.MIGRATING, ClaimState.CONFIRMED, ClaimState.RELEASED, ClaimState.EXPIRED}),
    ClaimState.MIGRATING: frozenset({ClaimState.CONFIRMED, ClaimState.RELEASED, ClaimState.EXPIRED}),
    ClaimState.CONFIRMED: frozenset(),
    ClaimState.RELEASED: frozenset(),
    ClaimState.EXPIRED: frozenset(),
}
# asked transition -> states in which it is a harmless repeat (claim returned unchanged)
_NOOP: Mapping[ClaimState, frozenset[ClaimState]] = {
    ClaimState.CONFIRMED: frozenset({ClaimState.CONFIRMED}),
    ClaimState.RELEASED: frozenset({ClaimState.RELEASED, ClaimState.EXPIRED}),
    ClaimState.EXPIRED: frozenset({ClaimState.EXPIRED}),
}


@dataclass(frozen=True, slots=True)
class Claim:
    migration_id: str
    instance_uuid: str
    source_host: str
    request_json: str  # canonical JSON of the request (request_to_json, sorted keys)
    placement: Placement
    state: ClaimState
    created_at: float
    expires_at: float
    updated_at: float
    reason: str | None = None  # reason of the last transition
    ttl_s: float = 0.0

    @property
    def is_live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def request(self) -> dict[str, Any]:
        return json.loads(self.request_json)

    def to_json(self) -> dict[str, Any]:
        return {
            "migration_id": self.migration_id,
            "instance_uuid": self.instance_uuid,
            "source_host": self.source_host,
            "state": self.state.value,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "updated_at": self.updated_at,
            "ttl_s": self.ttl_s,
            "reason": self.reason,
            "request": self.request,
            "placement": self.placement.to_json(),
        }


@dataclass(frozen=True, slots=True)
class Transition:
    migration_id: str
    from_state: ClaimState | None  # None for the creation of the claim
    to_state: ClaimState
    at: float
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "from": self.from_state.value if self.from_state else None,
            "to": self.to_state.value,
            "at": self.at,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class ReconcileDecision:
    migration_id: str
    instance_uuid: str
    from_state: ClaimState
    to_state: ClaimState
    reason: str


# --- schema -------------------------------------------------------------------------------------

# _MIGRATIONS[i] takes a ledger from version i to i + 1. Never edit a released step: add one.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # v1
        """CREATE TABLE claims (
            migration_id   TEXT PRIMARY KEY NOT NULL,
            instance_uuid  TEXT NOT NULL,
            source_host    TEXT NOT NULL,
            request_json   TEXT NOT NULL,
            placement_json TEXT NOT NULL,
            state          TEXT NOT NULL
                           CHECK (state IN ('held','migrating','confirmed','released','expired')),
            created_at     REAL NOT NULL,
            expires_at     REAL NOT NULL,
            updated_at     REAL NOT NULL,
            reason         TEXT
        )""",
        """CREATE TABLE transitions (
            id            INTEGER PRIMARY KEY AUTOINCREMENT,
            migration_id  TEXT NOT NULL REFERENCES claims(migration_id) ON DELETE CASCADE,
            from_state    TEXT,
            to_state      TEXT NOT NULL,
            at            REAL NOT NULL,
            reason        TEXT
        )""",
    ),
    (  # v2: the TTL a claim was made with (for `show`), and indexes for the periodic scans
        "ALTER TABLE claims ADD COLUMN ttl_s REAL NOT NULL DEFAULT 0",
        "CREATE INDEX claims_state ON claims(state, expires_at)",
        "CREATE INDEX claims_instance ON claims(instance_uuid)",
        "CREATE INDEX transitions_claim ON transitions(migration_id, id)",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

_COLUMNS = (
    "migration_id, instance_uuid, source_host, request_json, placement_json, state, "
    "created_at, expires_at, updated_at, reason, ttl_s"
)

# one lock per ledger file in this process: Ledger objects on the same file share it
_FILE_LOCKS: dict[str, threading.RLock] = {}
_FILE_LOCKS_GUARD = threading.Lock()


def _file_lock(path: Path) -> threading.RLock:
    key = os.path.realpath(path)
    with _FILE_LOCKS_GUARD:
        lock = _FILE_LOCKS.get(key)
        if lock is None:
            lock = _FILE_LOCKS[key] = threading.RLock()
        return lock


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    if not isinstance(exc, sqlite3.OperationalError) and not isinstance(exc, sqlite3.IntegrityError):
        return True  # DatabaseError proper: "file is not a database", "database disk image is malformed"
    text = str(exc).lower()
    return any(w in text for w in ("not a database", "malformed", "corrupt"))


# --- validation ---------------------------------------------------------------------------------


def check_migration_id(migration_id: Any) -> str:
    if not isinstance(migration_id, str) or not _MIGRATION_ID_RE.fullmatch(migration_id):
        shown = repr(migration_id)[:80]
        raise InvalidInput(f"migration id {shown} must be 1-128 characters of [A-Za-z0-9._:-]")
    return migration_id


def _check_source_host(source_host: Any) -> str:
    if (
        not isinstance(source_host, str)
        or not 1 <= len(source_host) <= 255
        or not source_host.isprintable()
        or source_host != source_host.strip()
    ):
        raise InvalidInput(f"source host {repr(source_host)[:80]} must be 1-255 printable characters")
    return source_host


def _check_ttl(ttl_s: Any) -> float:
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not math.isfinite(ttl_s):
        raise InvalidInput(f"ttl_s {ttl_s!r} must be a number of seconds")
    if not 1 <= ttl_s <= MAX_TTL_S:
        raise InvalidInput(f"ttl_s {ttl_s} out of range 1-{MAX_TTL_S}")
    return float(ttl_s)


def _coerce_request(request: Any) -> InstanceRequest:
    if isinstance(request, InstanceRequest):
        req = request
    elif isinstance(request, (Mapping, str, bytes)):
        req = parse_request(request)  # InvalidRequest for anything malformed
    else:
        raise InvalidInput(f"instance request must be an InstanceRequest or a request document, not {type(request).__name__}")
    if not 1 <= req.vcpus <= MAX_VCPUS or not 1 <= req.memory_mb <= MAX_MEMORY_MB or not req.cells:
        raise InvalidInput(f"instance request {req.uuid}: vcpus={req.vcpus} memory_mb={req.memory_mb} out of range")
    return req


def _canonical(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def _default_fitter() -> Fitter:
    from agent.numa.fit import fit  # noqa: PLC0415 (the fitter imports nothing of ours)

    return fit


def _logged(method: _F) -> _F:
    """Log bad input (InvalidInput and its subclasses) once, at WARNING, before it propagates."""

    @functools.wraps(method)
    def wrapper(self: "Ledger", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except InvalidInput as exc:
            log.warning("claim ledger: %s refused: %s (%s)", method.__name__, exc, exc.code)
            raise

    return wrapper  # type: ignore[return-value]


# --- the ledger ---------------------------------------------------------------------------------


class Ledger:
    """See the module doc. Open with `Ledger.open`; thread-safe; one per process is enough."""

    def __init__(self, conn: sqlite3.Connection, path: Path, *, clock: Callable[[], float], fitter: Fitter | None,
                 migrating_timeout_s: float, retention_s: float, recovered_from_corrupt: Path | None,
                 corrupt_files: tuple[Path, ...]) -> None:
        self._conn: sqlite3.Connection | None = conn
        self.path = path
        self._clock = clock
        self._fitter = fitter
        self.migrating_timeout_s = float(migrating_timeout_s)
        self.retention_s = float(retention_s)
        self._lock = _file_lock(path)
        self._placements: dict[str, Placement] = {}  # stored placement JSON -> parsed (immutable)
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
    ) -> "Ledger":
        """Open (creating or upgrading) `<state_dir>/ledger.db`.

        Raises LedgerSchemaTooNew (file untouched), LedgerCorrupt (file moved aside first; with
        ``on_corrupt="recreate"`` a fresh ledger is returned instead), LedgerError (I/O).
        ``create=False`` raises LedgerError instead of creating a missing ledger.
        """
        if on_corrupt not in ("raise", "recreate"):
            raise InvalidInput(f"on_corrupt must be 'raise' or 'recreate', not {on_corrupt!r}")
        state_dir = Path(state_dir)
        path = state_dir / LEDGER_FILE
        if not create and not path.exists():
            raise LedgerError(f"{path}: no ledger here")
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise LedgerError(f"{state_dir}: cannot create the state directory: {exc}") from None
        lock = _file_lock(path)
        with lock:
            recovered: Path | None = None
            try:
                conn = cls._connect(path, busy_timeout_s)
            except LedgerCorrupt as exc:
                if on_corrupt == "raise":
                    raise
                recovered = exc.moved_to
                log.error("claim ledger %s was corrupt and moved to %s; starting an EMPTY ledger: "
                          "claims it held are no longer protected, check the running migrations", path, recovered)
                conn = cls._connect(path, busy_timeout_s)
            corrupt_files = tuple(sorted(state_dir.glob(LEDGER_FILE + ".corrupt-*")))
            corrupt_files = tuple(p for p in corrupt_files if not p.name.endswith(("-wal", "-shm")))
            if corrupt_files:
                log.warning("claim ledger: %d corrupt ledger file(s) kept aside in %s: %s", len(corrupt_files),
                            state_dir, ", ".join(p.name for p in corrupt_files))
            return cls(conn, path, clock=clock, fitter=fitter, migrating_timeout_s=migrating_timeout_s,
                       retention_s=retention_s, recovered_from_corrupt=recovered, corrupt_files=corrupt_files)

    @classmethod
    def from_config(cls, cfg: ClaimsConfig, **kwargs: Any) -> "Ledger":
        return cls.open(cfg.state_dir, migrating_timeout_s=cfg.migrating_timeout_s, retention_s=cfg.retention_s,
                        **kwargs)

    @staticmethod
    def _connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
        existed = path.exists() and path.stat().st_size > 0
        try:
            if existed:
                Ledger._check_existing(path, busy_timeout_s)
            try:
                conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
            except sqlite3.Error as exc:
                raise LedgerError(f"{path}: cannot open the claim ledger: {exc}") from None
            try:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise LedgerError(f"{path}: cannot switch the ledger to WAL mode (got {mode})")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                Ledger._migrate(conn, path)
            except BaseException:
                conn.close()
                raise
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise LedgerError(f"{path}: cannot open the claim ledger: {exc}") from None
            moved = _move_aside(path)
            err = LedgerCorrupt(path, str(exc), moved)
            log.error("claim ledger corrupt: %s", err)
            raise err from None
        if not existed:
            _fsync_dir(path.parent)
        return conn

    @staticmethod
    def _check_existing(path: Path, busy_timeout_s: float) -> None:
        """Integrity and version check on a READ-ONLY connection: closing it never checkpoints
        or deletes the WAL, so a damaged ledger is moved aside exactly as found."""
        uri = "file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro"
        try:
            ro = sqlite3.connect(uri, uri=True, timeout=busy_timeout_s, isolation_level=None)
        except sqlite3.Error as exc:
            raise LedgerError(f"{path}: cannot open the claim ledger: {exc}") from None
        try:
            check = [r[0] for r in ro.execute("PRAGMA quick_check").fetchall()]
            if check != ["ok"]:
                raise sqlite3.DatabaseError("quick_check: " + "; ".join(map(str, check[:5])))
            version = ro.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                exc_new = LedgerSchemaTooNew(path, version, SCHEMA_VERSION)
                log.error("%s", exc_new)
                raise exc_new
            if version == 0:
                tables = ro.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                if tables:
                    raise sqlite3.DatabaseError(f"schema version 0 but {tables} schema objects: not a claim ledger")
        finally:
            ro.close()

    @staticmethod
    def _migrate(conn: sqlite3.Connection, path: Path) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:  # another process upgraded it between check and lock
                raise LedgerSchemaTooNew(path, version, SCHEMA_VERSION)
            start = version
            while version < SCHEMA_VERSION:
                for stmt in _MIGRATIONS[version]:
                    conn.execute(stmt)
                version += 1
                conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if start != version:
            if start == 0:
                log.info("claim ledger %s created (schema version %d)", path, version)
            else:
                log.info("claim ledger %s upgraded from schema version %d to %d", path, start, version)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def checkpoint(self) -> None:
        """Fold the WAL into the database file now (PASSIVE: never blocks other writers)."""
        with self._lock:
            try:
                self._db().execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:
                log.warning("claim ledger %s: checkpoint failed: %s", self.path, exc)

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        with self._lock:
            return self._db().execute("PRAGMA user_version").fetchone()[0]

    # ---- plumbing ------------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LedgerError(f"{self.path}: the ledger is closed")
        return self._conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: process lock + BEGIN IMMEDIATE ... COMMIT (or ROLLBACK)."""
        with self._lock:
            conn = self._db()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise LedgerError(f"{self.path}: cannot start a ledger transaction: {exc}") from None
            try:
                yield conn
            except BaseException:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:  # pragma: no cover - the transaction is gone already
                    pass
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:  # pragma: no cover
                    pass
                raise LedgerError(f"{self.path}: ledger commit failed: {exc}") from None

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db()
            except sqlite3.Error as exc:
                raise LedgerError(f"{self.path}: ledger read failed: {exc}") from None

    def _row_to_claim(self, row: Sequence[Any]) -> Claim:
        (mid, uuid, source, req_json, placement_json, state, created, expires, updated, reason, ttl) = row
        try:
            placement = self._placements.get(placement_json)
            if placement is None:
                placement = Placement.from_json(json.loads(placement_json))
                if len(self._placements) >= 4096:
                    self._placements.clear()
                self._placements[placement_json] = placement
            state_enum = ClaimState(state)
        except (InvalidInput, ValueError) as exc:
            raise LedgerError(f"{self.path}: claim {mid!r} has an unreadable stored placement: {exc}") from None
        return Claim(mid, uuid, source, req_json, placement, state_enum, created, expires, updated, reason, ttl)

    def _select(self, conn: sqlite3.Connection, where: str = "", params: Sequence[Any] = ()) -> list[Claim]:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM claims {where}", params).fetchall()
        return [self._row_to_claim(r) for r in rows]

    def _get(self, conn: sqlite3.Connection, migration_id: str) -> Claim | None:
        found = self._select(conn, "WHERE migration_id = ?", (migration_id,))
        return found[0] if found else None

    def _record(self, conn: sqlite3.Connection, claim: Claim, to: ClaimState, now: float, reason: str,
                expires_at: float | None = None) -> Claim:
        new_expiry = claim.expires_at if expires_at is None else expires_at
        conn.execute(
            "UPDATE claims SET state = ?, updated_at = ?, expires_at = ?, reason = ? WHERE migration_id = ?",
            (to.value, now, new_expiry, reason, claim.migration_id),
        )
        conn.execute(
            "INSERT INTO transitions (migration_id, from_state, to_state, at, reason) VALUES (?, ?, ?, ?, ?)",
            (claim.migration_id, claim.state.value, to.value, now, reason),
        )
        return Claim(claim.migration_id, claim.instance_uuid, claim.source_host, claim.request_json,
                     claim.placement, to, claim.created_at, new_expiry, now, reason, claim.ttl_s)

    def _transition(self, migration_id: str, to: ClaimState, reason: str,
                    expect: frozenset[ClaimState] | None = None) -> Claim | None:
        """Move one claim to `to`. With `expect`, silently skip (None) when it is no longer there."""
        check_migration_id(migration_id)
        with self._tx() as conn:
            now = self._clock()
            claim = self._get(conn, migration_id)
            if claim is None:
                raise UnknownClaim(migration_id)
            if expect is not None and claim.state not in expect:
                return None
            if claim.state in _NOOP.get(to, frozenset()):
                log.info("claim %s: already %s, %s ignored (%s)", migration_id, claim.state, to.value, reason)
                return claim
            if to not in _ALLOWED[claim.state]:
                raise IllegalTransition(migration_id, claim.state.value, to.value, reason)
            expires = now + self.migrating_timeout_s if to is ClaimState.MIGRATING else None
            new = self._record(conn, claim, to, now, reason, expires)
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
        claim (whatever its state now); anything else under that id raises ClaimConflict, as does
        a second live claim for an instance that already has one. NoFitError when it does not fit.
        """
        check_migration_id(migration_id)
        req = _coerce_request(request)
        _check_source_host(source_host)
        ttl = _check_ttl(ttl_s)
        req_json = _canonical(request_to_json(req))
        fitter = self._fitter or _default_fitter()
        nofit: NoFit | None = None
        expired: list[Claim] = []
        with self._tx() as conn:
            now = self._clock()
            existing = self._get(conn, migration_id)
            if existing is not None:
                if existing.request_json == req_json and existing.source_host == source_host:
                    log.info("claim %s: repeated request, returning the stored %s claim", migration_id, existing.state)
                    return existing
                what = "request" if existing.request_json != req_json else f"source host ({existing.source_host})"
                raise ClaimConflict(f"migration {migration_id!r} already has a claim with a different {what}")
            expired = self._expire_due_locked(conn, now)
            live = self._select(conn, "WHERE state IN ('held', 'migrating')")
            other = [c for c in live if c.instance_uuid == req.uuid]
            if other:
                raise ClaimConflict(
                    f"claim {migration_id}: instance {req.uuid} already has a live claim "
                    f"({other[0].migration_id}, {other[0].state}); release it first")
            state = host_state_fn(live)
            result = fitter(req, state)
            if isinstance(result, NoFit) or not getattr(result, "fits", False):
                nofit = result if isinstance(result, NoFit) else NoFit(str(getattr(result, "reason", result)))
            elif (starved := _starved_floating(result, state)) is not None:
                nofit = NoFit(starved)
            else:
                _verify_no_double_booking(result, state, migration_id)
                conn.execute(
                    f"INSERT INTO claims ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (migration_id, req.uuid, source_host, req_json, _canonical(result.to_json()),
                     ClaimState.HELD.value, now, now + ttl, now, f"claimed for {source_host}", ttl),
                )
                conn.execute(
                    "INSERT INTO transitions (migration_id, from_state, to_state, at, reason) VALUES (?, NULL, ?, ?, ?)",
                    (migration_id, ClaimState.HELD.value, now, f"claimed for {source_host}, ttl {ttl:g}s"),
                )
                claim = Claim(migration_id, req.uuid, source_host, req_json, result, ClaimState.HELD, now, now + ttl,
                              now, f"claimed for {source_host}", ttl)
        self._log_expired(expired, "claim")
        if nofit is not None:
            log.info("claim %s (instance %s) from %s: does not fit: %s", migration_id, req.uuid, source_host,
                     nofit.reason)
            raise NoFitError(nofit.reason, nofit)
        log.info("claim %s (instance %s) from %s: held until %.0f on cells %s, pinned CPUs %s", migration_id,
                 req.uuid, source_host, claim.expires_at, list(claim.placement.host_nodeset),
                 sorted(claim.placement.pinned_cpus))
        return claim

    @_logged
    def start(self, migration_id: str, reason: str = "source reported the migration started") -> Claim:
        """held -> migrating; on a migrating claim, a progress report that refreshes its expiry."""
        check_migration_id(migration_id)
        with self._tx() as conn:
            claim = self._get(conn, migration_id)
            if claim is None:
                raise UnknownClaim(migration_id)
            if claim.state is ClaimState.MIGRATING:
                now = self._clock()
                expires = now + self.migrating_timeout_s
                conn.execute("UPDATE claims SET updated_at = ?, expires_at = ? WHERE migration_id = ?",
                             (now, expires, migration_id))
                log.debug("claim %s: progress, expiry moved to %.0f", migration_id, expires)
                return Claim(claim.migration_id, claim.instance_uuid, claim.source_host, claim.request_json,
                             claim.placement, claim.state, claim.created_at, expires, now, claim.reason,
                             claim.ttl_s)
        new = self._transition(migration_id, ClaimState.MIGRATING, reason)
        assert new is not None
        return new

    progress = start

    @_logged
    def confirm(self, migration_id: str, reason: str = "the domain runs here") -> Claim:
        new = self._transition(migration_id, ClaimState.CONFIRMED, reason)
        assert new is not None
        return new

    @_logged
    def release(self, migration_id: str, reason: str) -> Claim:
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 1000:
            raise InvalidInput("release needs a reason of 1-1000 characters")
        new = self._transition(migration_id, ClaimState.RELEASED, reason.strip())
        assert new is not None
        return new

    def _expire_due_locked(self, conn: sqlite3.Connection, now: float) -> list[Claim]:
        due = self._select(conn, "WHERE state IN ('held', 'migrating') AND expires_at <= ?", (now,))
        out = []
        for c in due:
            if c.state is ClaimState.HELD:
                why = f"held past its TTL ({c.ttl_s:g}s) without the migration starting"
            else:
                why = f"migrating with no progress for {self.migrating_timeout_s:g}s"
            out.append(self._record(conn, c, ClaimState.EXPIRED, now, why))
        return out

    def _log_expired(self, expired: Iterable[Claim], where: str) -> None:
        for c in expired:
            log.warning("claim %s (instance %s): expired (%s): %s", c.migration_id, c.instance_uuid, where, c.reason)

    @_logged
    def expire_due(self, now: float | None = None) -> list[Claim]:
        """Expire every live claim past its expiry; returns the expired claims."""
        with self._tx() as conn:
            expired = self._expire_due_locked(conn, self._clock() if now is None else now)
        self._log_expired(expired, "expire_due")
        return expired

    @_logged
    def get(self, migration_id: str) -> Claim:
        check_migration_id(migration_id)
        with self._read() as conn:
            claim = self._get(conn, migration_id)
        if claim is None:
            raise UnknownClaim(migration_id)
        return claim

    @_logged
    def list(self, states: Iterable[ClaimState | str] | None = None) -> list[Claim]:
        with self._read() as conn:
            if states is None:
                return self._select(conn, "ORDER BY created_at, migration_id")
            try:
                wanted = sorted({ClaimState(s).value for s in states})
            except ValueError as exc:
                raise InvalidInput(f"unknown claim state: {exc}") from None
            if not wanted:
                return []
            marks = ",".join("?" * len(wanted))
            return self._select(conn, f"WHERE state IN ({marks}) ORDER BY created_at, migration_id", wanted)

    def live_claims(self) -> list[Claim]:
        return self.list(LIVE_STATES)

    @_logged
    def transitions(self, migration_id: str) -> list[Transition]:
        check_migration_id(migration_id)
        with self._read() as conn:
            rows = conn.execute(
                "SELECT migration_id, from_state, to_state, at, reason FROM transitions "
                "WHERE migration_id = ? ORDER BY id", (migration_id,)).fetchall()
            if not rows and self._get(conn, migration_id) is None:
                raise UnknownClaim(migration_id)
        return [Transition(m, ClaimState(f) if f else None, ClaimState(t), at, r) for m, f, t, at, r in rows]

    @_logged
    def prune(self, now: float | None = None) -> int:
        """Delete terminal claims (and their transitions) last changed more than retention_s ago."""
        with self._tx() as conn:
            cutoff = (self._clock() if now is None else now) - self.retention_s
            ids = [r[0] for r in conn.execute(
                "SELECT migration_id FROM claims WHERE state IN ('confirmed', 'released', 'expired') "
                "AND updated_at <= ?", (cutoff,)).fetchall()]
            for mid in ids:
                conn.execute("DELETE FROM transitions WHERE migration_id = ?", (mid,))
                conn.execute("DELETE FROM claims WHERE migration_id = ?", (mid,))
        if ids:
            log.info("claim ledger: pruned %d terminal claim(s) older than %gs", len(ids), self.retention_s)
        return len(ids)

    # ---- reconciliation ------------------------------------------------------------------------

    @_logged
    def reconcile(
        self,
        running_domains: Iterable[Any],
        now: float | None = None,
        source_reports_failed: Callable[[Claim], bool] | None = None,
        *,
        prune: bool = True,
    ) -> list[ReconcileDecision]:
        """Bring live claims in line with what runs here (at start and periodically).

        `running_domains`: DomainPlacement objects or instance UUIDs of the domains *running* on
        this host (not the paused incoming domain of a migration in progress: that one would be
        confirmed too early). For each held/migrating claim, in this order:

        1. its instance runs here -> confirmed;
        2. past its expiry -> expired;
        3. migrating, its domain is not here, and `source_reports_failed(claim)` says True ->
           released. The callback runs outside the ledger lock (it may ask the source over the
           bus); an exception from it counts as "don't know" and the claim is kept.

        Every change is logged with its reason and returned; terminal claims past retention are
        pruned afterwards (``prune=False`` to skip).
        """
        when = self._clock() if now is None else now
        running = set()
        for d in running_domains:
            uuid = d if isinstance(d, str) else getattr(d, "uuid", None)
            if not isinstance(uuid, str):
                raise InvalidInput(f"reconcile: running domain {d!r} has no uuid")
            running.add(_uuid_key(uuid))
        decisions: list[ReconcileDecision] = []

        def apply(c: Claim, to: ClaimState, why: str) -> None:
            try:
                new = self._transition(c.migration_id, to, why, expect=frozenset({c.state}))
            except UnknownClaim:
                new = None
            if new is None:
                log.info("reconcile: claim %s changed meanwhile, %s skipped", c.migration_id, to.value)
                return
            decisions.append(ReconcileDecision(c.migration_id, c.instance_uuid, c.state, to, why))
            log.info("reconcile: claim %s (instance %s) %s -> %s: %s", c.migration_id, c.instance_uuid, c.state,
                     to.value, why)

        ask_source: list[Claim] = []
        for c in self.live_claims():
            if _uuid_key(c.instance_uuid) in running:
                apply(c, ClaimState.CONFIRMED, f"reconcile: domain {c.instance_uuid} runs on this host")
            elif c.expires_at <= when:
                if c.state is ClaimState.HELD:
                    why = f"reconcile: held past its TTL ({c.ttl_s:g}s) and the domain is not here"
                else:
                    why = (f"reconcile: migrating with no progress for {self.migrating_timeout_s:g}s "
                           "and the domain is not here")
                apply(c, ClaimState.EXPIRED, why)
            elif c.state is ClaimState.MIGRATING and source_reports_failed is not None:
                ask_source.append(c)
            else:
                log.debug("reconcile: claim %s (%s) kept: expires in %.0fs", c.migration_id, c.state,
                          c.expires_at - when)
        for c in ask_source:
            try:
                failed = bool(source_reports_failed(c))  # type: ignore[misc]
            except Exception as exc:  # noqa: BLE001 - a failing callback must not stop reconciliation
                log.warning("reconcile: claim %s kept: asking source %s failed: %s", c.migration_id, c.source_host,
                            exc)
                continue
            if failed:
                apply(c, ClaimState.RELEASED,
                      f"reconcile: source {c.source_host} reports the migration failed and the domain is not here")
            else:
                log.debug("reconcile: claim %s kept: source %s does not report failure", c.migration_id,
                          c.source_host)
        if prune:
            self.prune(when)
        return decisions


def _uuid_key(value: str) -> str:
    return value.strip().lower().replace("-", "")


def _starved_floating(placement: Placement, state: HostState) -> str | None:
    """Pinning CPUs shrinks a cell's shared pool when no cpu_shared_set separates them; refuse a
    placement after which the floating vCPUs already on a cell (its own included) would exceed
    ``len(shared) * cpu_allocation_ratio``."""
    for cell in state.topology.cells:
        mine = [c for c in placement.cells if c.host_cell == cell.id]
        mine_pinned = {cpu for cpu in placement.pinned_cpus if cpu in cell.cpus}
        if not mine and not mine_pinned:
            continue
        usage = state.cell_usage(cell.id)
        online = cell.cpus & state.topology.online_cpus
        pool = online if state.cpu_shared_set is None else online & state.cpu_shared_set
        shared_after = pool - usage.pinned_cpus - mine_pinned
        floating_after = usage.floating_vcpus + sum(c.floating_vcpu_count for c in mine)
        capacity = int(len(shared_after) * state.cpu_allocation_ratio)
        if floating_after > capacity:
            return (f"host cell {cell.id}: the placement would leave {floating_after} floating vCPUs on "
                    f"{len(shared_after)} shared CPUs (capacity {capacity})")
    return None


def _verify_no_double_booking(placement: Placement, state: HostState, migration_id: str) -> None:
    """Belt and braces: the fitter's placement must not take a pinned CPU or more pages than free."""
    taken: set[int] = set()
    for u in state.usage.values():
        taken |= u.pinned_cpus
    clash = placement.pinned_cpus & taken
    offline = placement.pinned_cpus - state.topology.online_cpus
    if clash or offline:
        raise AgentError(
            f"claim {migration_id}: the fitter returned a placement that takes CPUs already pinned "
            f"{sorted(clash)} or offline {sorted(offline)}; refusing to record it")
    need: dict[tuple[int, int], int] = {}
    for c in placement.cells:
        if c.pagesize_kb != 4:
            need[(c.host_cell, c.pagesize_kb)] = need.get((c.host_cell, c.pagesize_kb), 0) + -(
                -c.memory_mb * 1024 // c.pagesize_kb)
    for (cell, size), n in need.items():
        try:
            free = state.resources(cell).free_pages.get(size, 0)
        except KeyError:
            free = 0
        if n > free:
            raise AgentError(
                f"claim {migration_id}: the fitter placed {n} pages of {size} KiB on cell {cell}, "
                f"which has {free} free; refusing to record it")


def _move_aside(path: Path) -> Path | None:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}.{n}")
        n += 1
    moved: Path | None = None
    try:
        if path.exists():
            os.replace(path, target)
            moved = target
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            if side.exists():
                os.replace(side, target.with_name(target.name + suffix))
        _fsync_dir(path.parent)
    except OSError as exc:
        raise LedgerCorrupt(path, f"could not move the corrupt ledger aside: {exc}", None) from None
    return moved


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


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
]
