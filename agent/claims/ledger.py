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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence, TypeVar

from agent.claims.errors import (
    ClaimConflict,
    ClaimEnded,
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
from agent.numa.topology import SMALL_PAGE_KB

log = logging.getLogger("compute_agent.claims")

LEDGER_FILE = "ledger.db"
_DEFAULTS = ClaimsConfig()
MAX_TTL_S = 30 * 24 * 3600
_MIGRATION_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}", re.ASCII)

_F = TypeVar("_F", bound=Callable[..., Any])
Fitter = Callable[[InstanceRequest, HostState], "Placement | NoFit"]


class HostView(Protocol):
    """What a `host_state_fn` may return instead of a bare HostState (hoststate.HostStateReport
    does): the state, plus the UUIDs of the domains *active* on this host, so that `claim` can
    refuse an instance that already runs here. A bare HostState means "no domain is known to run"."""

    @property
    def state(self) -> HostState: ...

    @property
    def active_uuids(self) -> frozenset[str]: ...


HostStateFn = Callable[[Iterable["Claim"]], "HostState | HostView"]


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
    """Is this SQLite error about the *file* (damaged, not a database), rather than our code
    (ProgrammingError, InterfaceError: a bug, never a reason to move a ledger aside) or the
    environment (OperationalError: locked, I/O, disk full)?"""
    if isinstance(exc, (sqlite3.ProgrammingError, sqlite3.InterfaceError)):
        return False
    text = str(exc).lower()
    if any(w in text for w in ("not a database", "malformed", "corrupt")):
        return True
    # SQLITE_CORRUPT / SQLITE_NOTADB surface as DatabaseError proper (no subclass); so does our own
    # "quick_check: ..." in _check_existing
    return type(exc) is sqlite3.DatabaseError


def uuid_key(value: str) -> str:
    """An instance UUID as compared everywhere in claims: lower case, no dashes, no blanks."""
    return value.strip().lower().replace("-", "")


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
        raise InvalidInput(
            f"instance request must be an InstanceRequest or a request document, not {type(request).__name__}"
        )
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

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        *,
        clock: Callable[[], float],
        fitter: Fitter | None,
        migrating_timeout_s: float,
        retention_s: float,
        recovered_from_corrupt: Path | None,
        corrupt_files: tuple[Path, ...],
        readonly: bool = False,
    ) -> None:
        self._conn: sqlite3.Connection | None = conn
        #: opened with ``readonly=True``: every write raises LedgerError
        self.readonly = readonly
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
        readonly: bool = False,
    ) -> "Ledger":
        """Open (creating or upgrading) `<state_dir>/ledger.db`.

        Raises LedgerSchemaTooNew (file untouched), LedgerCorrupt (file moved aside first; with
        ``on_corrupt="recreate"`` a fresh ledger is returned instead), LedgerError (I/O).
        ``create=False`` raises LedgerError instead of creating a missing ledger.

        ``readonly=True`` (operator commands that only look): the file is opened through SQLite's
        ``mode=ro``; nothing is created, upgraded, checkpointed or moved aside. A missing ledger
        or one of an older schema raises LedgerError, a damaged one LedgerCorrupt with
        ``moved_to=None`` (left where it is, for the agent to deal with); every write raises
        LedgerError.
        """
        if on_corrupt not in ("raise", "recreate"):
            raise InvalidInput(f"on_corrupt must be 'raise' or 'recreate', not {on_corrupt!r}")
        state_dir = Path(state_dir)
        path = state_dir / LEDGER_FILE
        if (readonly or not create) and not path.exists():
            raise LedgerError(f"{path}: no ledger here")
        if readonly:
            with _file_lock(path):
                conn = cls._connect_readonly(path, busy_timeout_s)
            return cls(
                conn,
                path,
                clock=clock,
                fitter=fitter,
                migrating_timeout_s=migrating_timeout_s,
                retention_s=retention_s,
                recovered_from_corrupt=None,
                corrupt_files=(),
                readonly=True,
            )
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
                log.error(
                    "claim ledger %s was corrupt and moved to %s; starting an EMPTY ledger: "
                    "claims it held are no longer protected, check the running migrations",
                    path,
                    recovered,
                )
                conn = cls._connect(path, busy_timeout_s)
            corrupt_files = tuple(sorted(state_dir.glob(LEDGER_FILE + ".corrupt-*")))
            corrupt_files = tuple(p for p in corrupt_files if not p.name.endswith(("-wal", "-shm")))
            if corrupt_files:
                log.warning(
                    "claim ledger: %d corrupt ledger file(s) kept aside in %s: %s",
                    len(corrupt_files),
                    state_dir,
                    ", ".join(p.name for p in corrupt_files),
                )
            return cls(
                conn,
                path,
                clock=clock,
                fitter=fitter,
                migrating_timeout_s=migrating_timeout_s,
                retention_s=retention_s,
                recovered_from_corrupt=recovered,
                corrupt_files=corrupt_files,
            )

    @classmethod
    def from_config(cls, cfg: ClaimsConfig, **kwargs: Any) -> "Ledger":
        return cls.open(
            cfg.state_dir, migrating_timeout_s=cfg.migrating_timeout_s, retention_s=cfg.retention_s, **kwargs
        )

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
    def _connect_readonly(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
        uri = "file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise LedgerError(f"{path}: cannot open the claim ledger read-only: {exc}") from None
        try:
            conn.execute("PRAGMA query_only=ON")
            check = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
            if check != ["ok"]:
                raise sqlite3.DatabaseError("quick_check: " + "; ".join(map(str, check[:5])))
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise LedgerSchemaTooNew(path, version, SCHEMA_VERSION)
            if version < SCHEMA_VERSION:
                raise LedgerError(
                    f"{path}: ledger schema version {version} is older than this agent's ({SCHEMA_VERSION}); "
                    "a read-only open does not upgrade it (the agent does when it starts)"
                )
        except sqlite3.DatabaseError as exc:
            conn.close()
            if _is_corruption(exc):
                err = LedgerCorrupt(path, str(exc), None)
                log.error("claim ledger corrupt (opened read-only, left in place): %s", err)
                raise err from None
            raise LedgerError(f"{path}: cannot read the claim ledger: {exc}") from None
        except BaseException:
            conn.close()
            raise
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
        if self.readonly:
            return
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

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:  # SQLite may have rolled back already (disk full, I/O error)
            pass

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: process lock + BEGIN IMMEDIATE ... COMMIT (or ROLLBACK).

        Any SQLite error inside it (disk full, I/O error, ...) rolls the whole transaction back and
        is raised as LedgerError (logged at ERROR); other exceptions roll back and propagate as is.
        """
        if self.readonly:
            raise LedgerError(f"{self.path}: the ledger was opened read-only")
        with self._lock:
            conn = self._db()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                log.error("claim ledger %s: cannot start a transaction: %s", self.path, exc)
                raise LedgerError(f"{self.path}: cannot start a ledger transaction: {exc}") from None
            try:
                yield conn
            except sqlite3.Error as exc:
                self._rollback(conn)
                log.error("claim ledger %s: transaction rolled back: %s: %s", self.path, type(exc).__name__, exc)
                raise LedgerError(f"{self.path}: ledger write failed (rolled back): {exc}") from exc
            except BaseException:
                self._rollback(conn)
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback(conn)
                log.error("claim ledger %s: commit failed, rolled back: %s", self.path, exc)
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

    def _record(
        self,
        conn: sqlite3.Connection,
        claim: Claim,
        to: ClaimState,
        now: float,
        reason: str,
        expires_at: float | None = None,
    ) -> Claim:
        new_expiry = claim.expires_at if expires_at is None else expires_at
        conn.execute(
            "UPDATE claims SET state = ?, updated_at = ?, expires_at = ?, reason = ? WHERE migration_id = ?",
            (to.value, now, new_expiry, reason, claim.migration_id),
        )
        conn.execute(
            "INSERT INTO transitions (migration_id, from_state, to_state, at, reason) VALUES (?, ?, ?, ?, ?)",
            (claim.migration_id, claim.state.value, to.value, now, reason),
        )
        return replace(claim, state=to, expires_at=new_expiry, updated_at=now, reason=reason)

    def _expire_before(self, conn: sqlite3.Connection, claim: Claim, now: float, action: str) -> ClaimEnded:
        """A live claim past its expiry was asked to `action`: record the expiry (the caller
        commits it) and return the error to raise once committed."""
        if claim.state is ClaimState.HELD:
            detail = f"held past its TTL ({claim.ttl_s:g}s)"
        else:
            detail = f"migrating with no progress for {self.migrating_timeout_s:g}s"
        expired = self._record(conn, claim, ClaimState.EXPIRED, now, f"expired before {action} ({detail})")
        to = ClaimState.MIGRATING if action == "start" else ClaimState.CONFIRMED
        return ClaimEnded(claim.migration_id, expired.state.value, expired.reason, to.value)

    def _transition(self, migration_id: str, to: ClaimState, reason: str) -> Claim:
        """Move one claim to `to` (see the module doc for what is allowed and what is a no-op).

        A live claim already past its expiry is expired instead of moved to migrating or
        confirmed (that expiry is committed) and ClaimEnded is raised.
        """
        check_migration_id(migration_id)
        ended: ClaimEnded | None = None
        with self._tx() as conn:
            now = self._clock()
            claim = self._get(conn, migration_id)
            if claim is None:
                raise UnknownClaim(migration_id)
            if claim.state in _NOOP.get(to, frozenset()):
                log.info("claim %s: already %s, %s ignored (%s)", migration_id, claim.state, to.value, reason)
                return claim
            progress = to is ClaimState.MIGRATING and claim.state is ClaimState.MIGRATING
            if not progress and to not in _ALLOWED[claim.state]:
                if claim.state in (ClaimState.RELEASED, ClaimState.EXPIRED):
                    raise ClaimEnded(migration_id, claim.state.value, claim.reason, to.value)
                raise IllegalTransition(migration_id, claim.state.value, to.value, reason)
            if to in (ClaimState.MIGRATING, ClaimState.CONFIRMED) and claim.is_live and claim.expires_at <= now:
                ended = self._expire_before(conn, claim, now, "start" if to is ClaimState.MIGRATING else "confirm")
                new = claim
            elif progress:
                # a progress report: refresh the expiry, no transition row
                expires = now + self.migrating_timeout_s
                conn.execute(
                    "UPDATE claims SET updated_at = ?, expires_at = ? WHERE migration_id = ?",
                    (now, expires, migration_id),
                )
                new = replace(claim, expires_at=expires, updated_at=now)
            else:
                expires = now + self.migrating_timeout_s if to is ClaimState.MIGRATING else None
                new = self._record(conn, claim, to, now, reason, expires)
        if ended is not None:
            raise ended  # committed first; logged (WARNING) by @_logged on start/confirm
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
        """
        check_migration_id(migration_id)
        req = _coerce_request(request)
        _check_source_host(source_host)
        ttl = _check_ttl(ttl_s)
        req_json = _canonical(request_to_json(req))
        fitter = self._fitter or _default_fitter()
        nofit: NoFit | None = None
        refused: AgentError | None = None
        expired: list[Claim] = []
        claim: Claim | None = None
        with self._tx() as conn:
            now = self._clock()
            existing = self._get(conn, migration_id)
            if existing is not None:
                if existing.request_json != req_json or existing.source_host != source_host:
                    what = "request" if existing.request_json != req_json else f"source host ({existing.source_host})"
                    raise ClaimConflict(f"migration {migration_id!r} already has a claim with a different {what}")
            expired = self._expire_due_locked(conn, now)
            if existing is not None:
                existing = next((c for c in expired if c.migration_id == migration_id), existing)
                if existing.state in (ClaimState.RELEASED, ClaimState.EXPIRED):
                    # committed below (with any expiry just recorded), raised after
                    refused = ClaimEnded(migration_id, existing.state.value, existing.reason, ClaimState.HELD.value)
                else:
                    log.info("claim %s: repeated request, returning the stored %s claim", migration_id, existing.state)
                    claim = existing
            else:
                live = self._select(conn, "WHERE state IN ('held', 'migrating')")
                key = uuid_key(req.uuid)
                other = [c for c in live if uuid_key(c.instance_uuid) == key]
                if other:
                    raise ClaimConflict(
                        f"claim {migration_id}: instance {req.uuid} already has a live claim "
                        f"({other[0].migration_id}, {other[0].state}); release it first"
                    )
                view = host_state_fn(live)
                if isinstance(view, HostState):
                    state, active = view, frozenset()
                else:
                    state = view.state
                    active = frozenset(uuid_key(u) for u in getattr(view, "active_uuids", ()))
                if key in active:
                    raise ClaimConflict(
                        f"claim {migration_id}: instance {req.uuid} already runs on this host; "
                        "a migration cannot bring it here"
                    )
                result = fitter(req, state)
                if isinstance(result, NoFit) or not getattr(result, "fits", False):
                    nofit = result if isinstance(result, NoFit) else NoFit(str(getattr(result, "reason", result)))
                else:
                    _verify_no_double_booking(result, state, migration_id)
                    claim = Claim(
                        migration_id,
                        req.uuid,
                        source_host,
                        req_json,
                        result,
                        ClaimState.HELD,
                        now,
                        now + ttl,
                        now,
                        f"claimed for {source_host}",
                        ttl,
                    )
                    conn.execute(
                        f"INSERT INTO claims ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            migration_id,
                            req.uuid,
                            source_host,
                            req_json,
                            _canonical(result.to_json()),
                            ClaimState.HELD.value,
                            now,
                            now + ttl,
                            now,
                            claim.reason,
                            ttl,
                        ),
                    )
                    conn.execute(
                        "INSERT INTO transitions (migration_id, from_state, to_state, at, reason) "
                        "VALUES (?, NULL, ?, ?, ?)",
                        (migration_id, ClaimState.HELD.value, now, f"claimed for {source_host}, ttl {ttl:g}s"),
                    )
        self._log_expired(expired, "claim")
        if refused is not None:
            raise refused
        if nofit is not None:
            log.info(
                "claim %s (instance %s) from %s: does not fit: %s", migration_id, req.uuid, source_host, nofit.reason
            )
            raise NoFitError(nofit.reason, nofit)
        assert claim is not None
        if existing is None:
            log.info(
                "claim %s (instance %s) from %s: held until %.0f on cells %s, pinned CPUs %s",
                migration_id,
                req.uuid,
                source_host,
                claim.expires_at,
                list(claim.placement.host_nodeset),
                sorted(claim.placement.pinned_cpus),
            )
        return claim

    @_logged
    def start(self, migration_id: str, reason: str = "source reported the migration started") -> Claim:
        """held -> migrating; on a migrating claim, a progress report that refreshes its expiry.

        One transaction. A claim past its expiry is expired (recorded) and ClaimEnded raised."""
        return self._transition(migration_id, ClaimState.MIGRATING, reason)

    progress = start

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
                "WHERE migration_id = ? ORDER BY id",
                (migration_id,),
            ).fetchall()
            if not rows and self._get(conn, migration_id) is None:
                raise UnknownClaim(migration_id)
        return [Transition(m, ClaimState(f) if f else None, ClaimState(t), at, r) for m, f, t, at, r in rows]

    @_logged
    def prune(self, now: float | None = None) -> int:
        """Delete terminal claims (and their transitions) last changed more than retention_s ago."""
        with self._tx() as conn:
            cutoff = (self._clock() if now is None else now) - self.retention_s
            # transitions go with their claim: ON DELETE CASCADE (foreign_keys=ON on every connection)
            n = conn.execute(
                "DELETE FROM claims WHERE state IN ('confirmed', 'released', 'expired') AND updated_at <= ?", (cutoff,)
            ).rowcount
        if n:
            log.info("claim ledger: pruned %d terminal claim(s) older than %gs", n, self.retention_s)
        return n

    # ---- reconciliation ------------------------------------------------------------------------

    def _reconcile_claim(
        self, migration_id: str, running: set[str], when: float
    ) -> tuple[ReconcileDecision | None, Claim | None]:
        """Steps 1-2 of `reconcile` for one claim, decided from its fresh row in one transaction.
        Returns (the decision taken, None) or (None, the fresh claim when it is migrating: ask its
        source)."""
        with self._tx() as conn:
            c = self._get(conn, migration_id)
            if c is None or not c.is_live:
                return None, None  # pruned, released, confirmed... meanwhile
            if uuid_key(c.instance_uuid) in running:
                to, why = ClaimState.CONFIRMED, f"reconcile: domain {c.instance_uuid} runs on this host"
            elif c.expires_at <= when:
                to = ClaimState.EXPIRED
                if c.state is ClaimState.HELD:
                    why = f"reconcile: held past its TTL ({c.ttl_s:g}s) and the domain is not here"
                else:
                    why = (
                        f"reconcile: migrating with no progress for {self.migrating_timeout_s:g}s "
                        "and the domain is not here"
                    )
            else:
                log.debug(
                    "reconcile: claim %s (%s) kept: expires in %.0fs", c.migration_id, c.state, c.expires_at - when
                )
                return None, c if c.state is ClaimState.MIGRATING else None
            self._record(conn, c, to, self._clock(), why)
        log.info(
            "reconcile: claim %s (instance %s) %s -> %s: %s", c.migration_id, c.instance_uuid, c.state, to.value, why
        )
        return ReconcileDecision(c.migration_id, c.instance_uuid, c.state, to, why), None

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
        pruned afterwards (``prune=False`` to skip).
        """
        when = self._clock() if now is None else now
        running = set()
        for d in running_domains:
            uuid = d if isinstance(d, str) else getattr(d, "uuid", None)
            if not isinstance(uuid, str):
                raise InvalidInput(f"reconcile: running domain {d!r} has no uuid")
            running.add(uuid_key(uuid))
        decisions: list[ReconcileDecision] = []
        ask_source: list[Claim] = []
        # The snapshot only says which claims to look at: every decision is taken inside its own
        # transaction from the claim's fresh row (a `progress` may have moved its expiry meanwhile).
        for snap in self.live_claims():
            decision, ask = self._reconcile_claim(snap.migration_id, running, when)
            if decision is not None:
                decisions.append(decision)
            elif ask is not None and source_reports_failed is not None:
                ask_source.append(ask)
        for c in ask_source:
            try:
                failed = bool(source_reports_failed(c))  # type: ignore[misc]
            except Exception as exc:  # noqa: BLE001 - a failing callback must not stop reconciliation
                log.warning("reconcile: claim %s kept: asking source %s failed: %s", c.migration_id, c.source_host, exc)
                continue
            if not failed:
                log.debug("reconcile: claim %s kept: source %s does not report failure", c.migration_id, c.source_host)
                continue
            why = f"reconcile: source {c.source_host} reports the migration failed and the domain is not here"
            with self._tx() as conn:
                fresh = self._get(conn, c.migration_id)
                # the answer is about the claim as we asked: skip if it moved since (progress, confirm, ...)
                unchanged = (
                    fresh is not None
                    and fresh.state is c.state
                    and fresh.updated_at == c.updated_at
                    and uuid_key(fresh.instance_uuid) not in running
                )
                if unchanged:
                    self._record(conn, fresh, ClaimState.RELEASED, self._clock(), why)
            if not unchanged:
                log.info("reconcile: claim %s changed meanwhile, release skipped", c.migration_id)
                continue
            decisions.append(ReconcileDecision(c.migration_id, c.instance_uuid, c.state, ClaimState.RELEASED, why))
            log.info(
                "reconcile: claim %s (instance %s) %s -> released: %s", c.migration_id, c.instance_uuid, c.state, why
            )
        if prune:
            self.prune(when)
        return decisions


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
            f"{sorted(clash)} or offline {sorted(offline)}; refusing to record it"
        )
    need: dict[tuple[int, int], int] = {}
    for c in placement.cells:
        if c.pagesize_kb != SMALL_PAGE_KB:
            need[(c.host_cell, c.pagesize_kb)] = need.get((c.host_cell, c.pagesize_kb), 0) + -(
                -c.memory_mb * 1024 // c.pagesize_kb
            )
    for (cell, size), n in need.items():
        try:
            free = state.resources(cell).free_pages.get(size, 0)
        except KeyError:
            free = 0
        if n > free:
            raise AgentError(
                f"claim {migration_id}: the fitter placed {n} pages of {size} KiB on cell {cell}, "
                f"which has {free} free; refusing to record it"
            )


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
