"""The SQLite file behind the claim ledger: schema, opening, transactions and claim rows.

One home for everything that touches ``<state_dir>/ledger.db`` (the guarantees are listed in
`agent.claims.ledger`'s module doc): the versioned schema and its upgrades (`MIGRATIONS`), the
writable open (integrity check, move-aside of a damaged file, WAL, upgrade, fsync of the
directory), the one read-only open, the per-file process lock, ``BEGIN IMMEDIATE`` transactions,
and the mapping between rows and `Claim` values. No claim rule lives here.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from agent.claims.errors import LedgerCorrupt, LedgerError, LedgerSchemaTooNew
from agent.claims.model import Claim, ClaimState, Transition, canonical_json
from agent.errors import InvalidInput
from agent.numa.placement import Placement

log = logging.getLogger("compute_agent.claims")

LEDGER_FILE = "ledger.db"
_PLACEMENT_CACHE_MAX = 4096  # parsed placements kept per open ledger: a few MiB at most

# --- schema -------------------------------------------------------------------------------------

# MIGRATIONS[i] takes a ledger from version i to i + 1. Never edit a released step: add one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
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
SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = (
    "migration_id, instance_uuid, source_host, request_json, placement_json, state, "
    "created_at, expires_at, updated_at, reason, ttl_s"
)


# one lock per ledger file in this process: Ledger objects on the same file share it
_FILE_LOCKS: dict[str, threading.RLock] = {}
_FILE_LOCKS_GUARD = threading.Lock()


def file_lock(path: Path) -> threading.RLock:
    key = os.path.realpath(path)
    with _FILE_LOCKS_GUARD:
        lock = _FILE_LOCKS.get(key)
        if lock is None:
            lock = _FILE_LOCKS[key] = threading.RLock()
        return lock


def is_corruption(exc: sqlite3.DatabaseError) -> bool:
    """Is this SQLite error about the *file* (damaged, not a database), rather than our code
    (ProgrammingError, InterfaceError: a bug, never a reason to move a ledger aside) or the
    environment (OperationalError: locked, I/O, disk full)?"""
    if isinstance(exc, (sqlite3.ProgrammingError, sqlite3.InterfaceError)):
        return False
    text = str(exc).lower()
    if any(w in text for w in ("not a database", "malformed", "corrupt")):
        return True
    # SQLITE_CORRUPT / SQLITE_NOTADB surface as DatabaseError proper (no subclass); so does our own
    # "quick_check: ..." in _open_checked
    return type(exc) is sqlite3.DatabaseError


# --- opening --------------------------------------------------------------------------------------


def _open_checked(path: Path, busy_timeout_s: float) -> tuple[sqlite3.Connection, int]:
    """The one read-only open (SQLite ``mode=ro``, ``query_only``): closing it never creates,
    checkpoints or deletes a WAL, so a damaged ledger stays exactly as found. Runs ``quick_check``
    and returns the connection with its schema version. Raises sqlite3.DatabaseError for a
    damaged file (the caller decides what that means), LedgerSchemaTooNew, LedgerError."""
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
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise LedgerSchemaTooNew(path, version, SCHEMA_VERSION)
    except BaseException:
        conn.close()
        raise
    return conn, version


def connect_readonly(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """A connection for operator commands that only look: nothing created, upgraded or moved
    aside. A damaged ledger raises LedgerCorrupt with ``moved_to=None``, an older one LedgerError."""
    try:
        conn, version = _open_checked(path, busy_timeout_s)
    except sqlite3.DatabaseError as exc:
        if is_corruption(exc):
            err = LedgerCorrupt(path, str(exc), None)
            log.error("claim ledger corrupt (opened read-only, left in place): %s", err)
            raise err from None
        raise LedgerError(f"{path}: cannot read the claim ledger: {exc}") from None
    if version < SCHEMA_VERSION:
        conn.close()
        raise LedgerError(
            f"{path}: ledger schema version {version} is older than this agent's ({SCHEMA_VERSION}); "
            "a read-only open does not upgrade it (the agent does when it starts)"
        )
    return conn


def _check_existing(path: Path, busy_timeout_s: float) -> None:
    """Integrity and version check of an existing file before it is opened for writing."""
    try:
        conn, version = _open_checked(path, busy_timeout_s)
    except LedgerSchemaTooNew as exc:
        log.error("%s", exc)
        raise
    try:
        if version == 0:
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables:
                raise sqlite3.DatabaseError(f"schema version 0 but {tables} schema objects: not a claim ledger")
    finally:
        conn.close()


def _configure(conn: sqlite3.Connection, path: Path) -> None:
    """WAL, synchronous=FULL, foreign keys, and the schema upgraded to SCHEMA_VERSION."""
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise LedgerError(f"{path}: cannot switch the ledger to WAL mode (got {mode})")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    migrate(conn, path)


def _connect_checked(path: Path, existed: bool, busy_timeout_s: float) -> sqlite3.Connection:
    if existed:
        _check_existing(path, busy_timeout_s)
    try:
        conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise LedgerError(f"{path}: cannot open the claim ledger: {exc}") from None
    try:
        _configure(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """The writable connection: checked, WAL, upgraded. A damaged file is moved aside first
    (LedgerCorrupt names where); a new file's directory entry is fsynced."""
    existed = path.exists() and path.stat().st_size > 0
    try:
        conn = _connect_checked(path, existed, busy_timeout_s)
    except sqlite3.DatabaseError as exc:
        if not is_corruption(exc):
            raise LedgerError(f"{path}: cannot open the claim ledger: {exc}") from None
        moved = move_aside(path)
        err = LedgerCorrupt(path, str(exc), moved)
        log.error("claim ledger corrupt: %s", err)
        raise err from None
    if not existed:
        fsync_dir(path.parent)
    return conn


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Upgrade to SCHEMA_VERSION, every step and its version bump in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = start = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:  # another process upgraded it between check and lock
            raise LedgerSchemaTooNew(path, version, SCHEMA_VERSION)
        while version < SCHEMA_VERSION:
            for stmt in MIGRATIONS[version]:
                conn.execute(stmt)
            version += 1
            conn.execute(f"PRAGMA user_version = {version}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    if start == version:
        return
    if start == 0:
        log.info("claim ledger %s created (schema version %d)", path, version)
    else:
        log.info("claim ledger %s upgraded from schema version %d to %d", path, start, version)


def _connect_or_recreate(path: Path, busy_timeout_s: float, on_corrupt: str) -> tuple[sqlite3.Connection, Path | None]:
    """(connection, where a corrupt ledger was moved when ``on_corrupt="recreate"`` started afresh)."""
    try:
        return connect(path, busy_timeout_s), None
    except LedgerCorrupt as exc:
        if on_corrupt == "raise":
            raise
        log.error(
            "claim ledger %s was corrupt and moved to %s; starting an EMPTY ledger: "
            "claims it held are no longer protected, check the running migrations",
            path,
            exc.moved_to,
        )
        return connect(path, busy_timeout_s), exc.moved_to


def _corrupt_files(state_dir: Path) -> tuple[Path, ...]:
    """Every moved-aside ledger in the state directory (not their -wal/-shm), logged once."""
    found = sorted(state_dir.glob(LEDGER_FILE + ".corrupt-*"))
    kept = tuple(p for p in found if not p.name.endswith(("-wal", "-shm")))
    if kept:
        log.warning(
            "claim ledger: %d corrupt ledger file(s) kept aside in %s: %s",
            len(kept),
            state_dir,
            ", ".join(p.name for p in kept),
        )
    return kept


@dataclass(frozen=True, slots=True)
class Opened:
    """What `open_store` found besides the store itself."""

    store: "ClaimStore"
    recovered_from_corrupt: Path | None = None  # a corrupt ledger moved aside for a fresh one
    corrupt_files: tuple[Path, ...] = ()


def open_store(state_dir: Path, *, busy_timeout_s: float, on_corrupt: str, create: bool, readonly: bool) -> Opened:
    """Open `<state_dir>/ledger.db` (see `Ledger.open` for what each option does)."""
    path = state_dir / LEDGER_FILE
    if (readonly or not create) and not path.exists():
        raise LedgerError(f"{path}: no ledger here")
    if readonly:
        with file_lock(path):
            return Opened(ClaimStore(connect_readonly(path, busy_timeout_s), path, readonly=True))
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise LedgerError(f"{state_dir}: cannot create the state directory: {exc}") from None
    with file_lock(path):
        conn, recovered = _connect_or_recreate(path, busy_timeout_s, on_corrupt)
        return Opened(ClaimStore(conn, path), recovered, _corrupt_files(state_dir))


def move_aside(path: Path) -> Path | None:
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
        fsync_dir(path.parent)
    except OSError as exc:
        raise LedgerCorrupt(path, f"could not move the corrupt ledger aside: {exc}", None) from None
    return moved


def fsync_dir(directory: Path) -> None:
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


class ClaimStore:
    """One open ledger file: its connection, the process-wide lock of that file, transactions, and
    claims read from and written to rows. Thread-safe through the lock."""

    def __init__(self, conn: sqlite3.Connection, path: Path, *, readonly: bool = False) -> None:
        self.conn: sqlite3.Connection | None = conn
        self.path = path
        self.readonly = readonly
        self.lock = file_lock(path)
        self._placements: dict[str, Placement] = {}  # stored placement JSON -> parsed (immutable)

    def close(self) -> None:
        with self.lock:
            if self.conn is not None:
                self.conn.close()
                self.conn = None

    def checkpoint(self) -> None:
        """Fold the WAL into the database file now (PASSIVE: never blocks other writers)."""
        if self.readonly:
            return
        with self.lock:
            try:
                self._db().execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:
                log.warning("claim ledger %s: checkpoint failed: %s", self.path, exc)

    def schema_version(self) -> int:
        with self.lock:
            return int(self._db().execute("PRAGMA user_version").fetchone()[0])

    def _db(self) -> sqlite3.Connection:
        if self.conn is None:
            raise LedgerError(f"{self.path}: the ledger is closed")
        return self.conn

    # ---- transactions --------------------------------------------------------------------------

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:  # SQLite may have rolled back already (disk full, I/O error)
            pass

    def _begin(self) -> sqlite3.Connection:
        conn = self._db()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            log.error("claim ledger %s: cannot start a transaction: %s", self.path, exc)
            raise LedgerError(f"{self.path}: cannot start a ledger transaction: {exc}") from None
        return conn

    def _commit(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(conn)
            log.error("claim ledger %s: commit failed, rolled back: %s", self.path, exc)
            raise LedgerError(f"{self.path}: ledger commit failed: {exc}") from None

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: process lock + BEGIN IMMEDIATE ... COMMIT (or ROLLBACK).

        Any SQLite error inside it (disk full, I/O error, ...) rolls the whole transaction back and
        is raised as LedgerError (logged at ERROR); other exceptions roll back and propagate as is.
        """
        if self.readonly:
            raise LedgerError(f"{self.path}: the ledger was opened read-only")
        with self.lock:
            conn = self._begin()
            try:
                yield conn
            except sqlite3.Error as exc:
                self._rollback(conn)
                log.error("claim ledger %s: transaction rolled back: %s: %s", self.path, type(exc).__name__, exc)
                raise LedgerError(f"{self.path}: ledger write failed (rolled back): {exc}") from exc
            except BaseException:
                self._rollback(conn)
                raise
            self._commit(conn)

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        with self.lock:
            try:
                yield self._db()
            except sqlite3.Error as exc:
                raise LedgerError(f"{self.path}: ledger read failed: {exc}") from None

    # ---- rows <-> claims -----------------------------------------------------------------------

    def _placement(self, placement_json: str) -> Placement:
        placement = self._placements.get(placement_json)
        if placement is None:
            placement = Placement.from_json(json.loads(placement_json))
            if len(self._placements) >= _PLACEMENT_CACHE_MAX:
                self._placements.clear()
            self._placements[placement_json] = placement
        return placement

    def _row_to_claim(self, row: Sequence[Any]) -> Claim:
        (mid, uuid, source, req_json, placement_json, state, created, expires, updated, reason, ttl) = row
        try:
            placement = self._placement(placement_json)
            state_enum = ClaimState(state)
        except (InvalidInput, ValueError) as exc:
            raise LedgerError(f"{self.path}: claim {mid!r} has an unreadable stored placement: {exc}") from None
        return Claim(mid, uuid, source, req_json, placement, state_enum, created, expires, updated, reason, ttl)

    def select(self, conn: sqlite3.Connection, where: str = "", params: Sequence[Any] = ()) -> list[Claim]:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM claims {where}", params).fetchall()
        return [self._row_to_claim(r) for r in rows]

    def get(self, conn: sqlite3.Connection, migration_id: str) -> Claim | None:
        found = self.select(conn, "WHERE migration_id = ?", (migration_id,))
        return found[0] if found else None

    def live(self, conn: sqlite3.Connection) -> list[Claim]:
        return self.select(conn, "WHERE state IN ('held', 'migrating')")

    def in_states(self, conn: sqlite3.Connection, states: Sequence[str] | None) -> list[Claim]:
        """Claims in `states` (every claim for None), oldest first."""
        if states is None:
            return self.select(conn, "ORDER BY created_at, migration_id")
        if not states:
            return []
        marks = ",".join("?" * len(states))
        return self.select(conn, f"WHERE state IN ({marks}) ORDER BY created_at, migration_id", states)

    def due(self, conn: sqlite3.Connection, now: float) -> list[Claim]:
        """Live claims whose expiry is `now` or earlier."""
        return self.select(conn, "WHERE state IN ('held', 'migrating') AND expires_at <= ?", (now,))

    def insert(self, conn: sqlite3.Connection, claim: Claim, creation_reason: str) -> None:
        """A new claim and its creation transition (from NULL)."""
        conn.execute(
            f"INSERT INTO claims ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                claim.migration_id,
                claim.instance_uuid,
                claim.source_host,
                claim.request_json,
                canonical_json(claim.placement.to_json()),
                claim.state.value,
                claim.created_at,
                claim.expires_at,
                claim.updated_at,
                claim.reason,
                claim.ttl_s,
            ),
        )
        conn.execute(
            "INSERT INTO transitions (migration_id, from_state, to_state, at, reason) VALUES (?, NULL, ?, ?, ?)",
            (claim.migration_id, claim.state.value, claim.created_at, creation_reason),
        )

    def record(
        self,
        conn: sqlite3.Connection,
        claim: Claim,
        to: ClaimState,
        now: float,
        reason: str,
        expires_at: float | None = None,
    ) -> Claim:
        """Move `claim` to `to` and write the transition row; returns the moved claim."""
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

    def refresh_expiry(self, conn: sqlite3.Connection, claim: Claim, now: float, expires_at: float) -> Claim:
        """A progress report: a new expiry, no transition row."""
        conn.execute(
            "UPDATE claims SET updated_at = ?, expires_at = ? WHERE migration_id = ?",
            (now, expires_at, claim.migration_id),
        )
        return replace(claim, expires_at=expires_at, updated_at=now)

    def transitions(self, conn: sqlite3.Connection, migration_id: str) -> list[Transition]:
        rows = conn.execute(
            "SELECT migration_id, from_state, to_state, at, reason FROM transitions WHERE migration_id = ? ORDER BY id",
            (migration_id,),
        ).fetchall()
        return [Transition(m, ClaimState(f) if f else None, ClaimState(t), at, r) for m, f, t, at, r in rows]

    def delete_ended_before(self, conn: sqlite3.Connection, cutoff: float) -> int:
        """Delete terminal claims last changed at `cutoff` or earlier; returns how many."""
        # transitions go with their claim: ON DELETE CASCADE (foreign_keys=ON on every connection)
        return conn.execute(
            "DELETE FROM claims WHERE state IN ('confirmed', 'released', 'expired') AND updated_at <= ?", (cutoff,)
        ).rowcount


__all__ = [
    "LEDGER_FILE",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "ClaimStore",
    "Opened",
    "connect",
    "connect_readonly",
    "file_lock",
    "fsync_dir",
    "is_corruption",
    "migrate",
    "move_aside",
    "open_store",
]
