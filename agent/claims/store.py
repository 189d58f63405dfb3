"""The SQLite file behind the claim ledger: schema, connections, transactions and claim rows.

The versioned schema and its upgrades (`MIGRATIONS`, `migrate`), the setup every connection gets
(text decoding that never raises, the row-checksum SQL functions), the per-file process lock,
``BEGIN IMMEDIATE`` transactions, and the mapping between rows and `Claim` values, every row's
checksum verified as it is read (`agent.claims.rows`). Opening a file - checks, damage, salvage - is
`agent.claims.opening`. No claim rule lives here.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from agent.claims.damage import DamageRecord
from agent.claims.errors import LedgerBusy, LedgerCorrupt, LedgerError, LedgerSchemaTooNew
from agent.claims.model import Claim, ClaimState, Transition, canonical_json
from agent.claims.rows import (
    CLAIM_COLUMNS,
    DAMAGE_COLUMNS,
    TRANSITION_COLUMNS,
    BadRow,
    claim_row_problem,
    decode_text,
    row_sum,
    verify_row,
)
from agent.errors import AgentError, InvalidInput
from agent.numa.placement import Placement

log = logging.getLogger("compute_agent.claims")

LEDGER_FILE = "ledger.db"
_PLACEMENT_CACHE_MAX = 4096  # parsed placements kept per open ledger: a few MiB at most
_ROW_CACHE_MAX = 1024  # whole stored rows already verified and decoded: ~3 KiB each, a few MiB at most

# --- schema -------------------------------------------------------------------------------------

_CLAIM_SUM = f"claim_sum({', '.join(CLAIM_COLUMNS)})"
_TRANSITION_SUM = f"transition_sum({', '.join(TRANSITION_COLUMNS)})"
_DAMAGE_SUM = f"damage_sum({', '.join(DAMAGE_COLUMNS)})"

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
    (  # v3: a checksum of every row's content (old rows get theirs here), and the damage record
        "ALTER TABLE claims ADD COLUMN row_sum TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE transitions ADD COLUMN row_sum TEXT NOT NULL DEFAULT ''",
        f"UPDATE claims SET row_sum = {_CLAIM_SUM}",
        f"UPDATE transitions SET row_sum = {_TRANSITION_SUM}",
        """CREATE TABLE damage (
            id            INTEGER PRIMARY KEY AUTOINCREMENT,
            found_at      REAL NOT NULL,
            detail        TEXT NOT NULL,
            moved_to      TEXT,
            salvaged      INTEGER NOT NULL,
            live_salvaged INTEGER NOT NULL,
            unreadable    INTEGER NOT NULL,
            hold_until    REAL NOT NULL,
            accepted_at   REAL,
            accepted_by   TEXT,
            row_sum       TEXT NOT NULL
        )""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = ", ".join(CLAIM_COLUMNS)
_TERMINAL_SQL = "('confirmed', 'released', 'expired')"


def prepare(conn: sqlite3.Connection) -> sqlite3.Connection:
    """What every ledger connection gets: damaged text decodes (to U+FFFD) instead of raising,
    and the row-checksum functions the schema upgrade and the updates use."""
    conn.text_factory = decode_text
    conn.create_function("claim_sum", len(CLAIM_COLUMNS), lambda *v: row_sum(v), deterministic=True)
    conn.create_function("transition_sum", len(TRANSITION_COLUMNS), lambda *v: row_sum(v), deterministic=True)
    conn.create_function("damage_sum", len(DAMAGE_COLUMNS), lambda *v: row_sum(v), deterministic=True)
    return conn


def user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Upgrade to SCHEMA_VERSION, every step and its version bump in one transaction. A current
    ledger is left alone without taking the write lock (an operator command must not wait)."""
    if user_version(conn) == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = start = user_version(conn)
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
    if start == 0:
        log.info("claim ledger %s created (schema version %d)", path, version)
    elif start != version:
        log.info("claim ledger %s upgraded from schema version %d to %d", path, start, version)


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
    # "integrity_check: ..." in opening
    return type(exc) is sqlite3.DatabaseError


@contextmanager
def decoded_errors() -> Iterator[None]:
    """SQLite's own messages about a damaged schema may not be UTF-8 (the sqlite3 module decodes
    them strictly): that is damage, raised as the DatabaseError it is, never UnicodeDecodeError."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise sqlite3.DatabaseError(f"SQLite reported undecodable text (a damaged schema?): {exc}") from None


def is_busy(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class ClaimStore:
    """One open ledger file: its connection, the process-wide lock of that file, transactions, and
    claims read from and written to rows (each row's checksum verified as it is read: a bad row is
    never used, it is reported in `bad_rows` and logged at ERROR). Thread-safe through the lock."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        *,
        readonly: bool = False,
        busy_timeout_s: float = 30.0,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.conn: sqlite3.Connection | None = prepare(conn)
        self.path = path
        self.readonly = readonly
        self.busy_timeout_s = busy_timeout_s
        self.lock = file_lock(path)
        self.bad_rows: list[BadRow] = []  # damaged rows met since open (not used as data)
        self._on_close = on_close
        self._placements: dict[str, Placement] = {}  # stored placement JSON -> parsed (immutable)
        # a whole stored row (every column and its checksum) -> the Claim it decoded to: the same
        # bytes decode the same way, so a live claim is verified once, not at every later claim
        self._rows: dict[tuple[Any, ...], Claim] = {}

    def close(self) -> None:
        with self.lock:
            if self.conn is not None:
                self.conn.close()
                self.conn = None
            if self._on_close is not None:
                self._on_close()
                self._on_close = None

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
            return user_version(self._db())

    def _db(self) -> sqlite3.Connection:
        if self.conn is None:
            raise LedgerError(f"{self.path}: the ledger is closed")
        return self.conn

    # ---- damaged rows --------------------------------------------------------------------------

    def note_bad(self, bad: BadRow) -> None:
        if bad not in self.bad_rows and len(self.bad_rows) < 1000:  # bounded: a report, not a copy
            self.bad_rows.append(bad)
            log.error("claim ledger %s: damaged row, not used: %s", self.path, bad)

    def corrupt(self, bad: BadRow) -> LedgerCorrupt:
        self.note_bad(bad)
        return LedgerCorrupt(
            self.path, f"{bad}; the row is not used (the agent salvages the ledger when it next opens it)", None
        )

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
            if is_busy(exc):
                raise LedgerBusy(self.path, self.busy_timeout_s) from None
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
                with decoded_errors():
                    yield conn
            except sqlite3.Error as exc:
                self._rollback(conn)
                log.error("claim ledger %s: transaction rolled back: %s: %s", self.path, type(exc).__name__, exc)
                if isinstance(exc, sqlite3.DatabaseError) and is_corruption(exc):
                    raise LedgerCorrupt(self.path, f"{exc} (transaction rolled back)", None) from None
                raise LedgerError(f"{self.path}: ledger write failed (rolled back): {exc}") from exc
            except BaseException:
                self._rollback(conn)
                raise
            self._commit(conn)

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        with self.lock:
            try:
                with decoded_errors():
                    yield self._db()
            except sqlite3.Error as exc:
                if is_busy(exc):
                    raise LedgerBusy(self.path, self.busy_timeout_s) from None
                if isinstance(exc, sqlite3.DatabaseError) and is_corruption(exc):
                    raise LedgerCorrupt(self.path, str(exc), None) from None
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

    def _decode(self, row: Sequence[Any]) -> Claim | BadRow:
        """A stored row (claim columns, then row_sum) as a Claim, or why it cannot be one."""
        whole = tuple(row)
        known = self._rows.get(whole)
        if known is not None:
            return known
        got = self._decode_row(whole)
        if isinstance(got, Claim):  # a bad row is never remembered: it is reported at every read
            if len(self._rows) >= _ROW_CACHE_MAX:
                self._rows.clear()
            self._rows[whole] = got
        return got

    def _decode_row(self, row: tuple[Any, ...]) -> Claim | BadRow:
        values, stored = row[:-1], row[-1]
        key = repr(values[0])[:80]
        if stored != row_sum(values):
            return BadRow("claims", key, "checksum mismatch (the row changed on disk)")
        (mid, uuid, source, req_json, placement_json, state, created, expires, updated, reason, ttl) = values
        try:
            placement = self._placement(placement_json)
            state_enum = ClaimState(state)
        except (InvalidInput, ValueError, TypeError) as exc:
            return BadRow("claims", key, f"unreadable stored placement or state: {exc}")
        return Claim(mid, uuid, source, req_json, placement, state_enum, created, expires, updated, reason, ttl)

    def select(
        self, conn: sqlite3.Connection, where: str = "", params: Sequence[Any] = (), *, strict: bool = True
    ) -> list[Claim]:
        """Claims of the rows matched. A damaged row raises LedgerCorrupt (`strict`, for anything
        that decides) or is skipped and kept in `bad_rows` (a listing for people)."""
        rows = conn.execute(f"SELECT {_COLUMNS}, row_sum FROM claims {where}", params).fetchall()
        out = []
        for r in rows:
            got = self._decode(r)
            if isinstance(got, Claim):
                out.append(got)
            elif strict:
                raise self.corrupt(got)
            else:
                self.note_bad(got)
        return out

    def get(self, conn: sqlite3.Connection, migration_id: str) -> Claim | None:
        found = self.select(conn, "WHERE migration_id = ?", (migration_id,))
        return found[0] if found else None

    def live(self, conn: sqlite3.Connection) -> list[Claim]:
        """Held and migrating claims (through the state index: a claim stays fast with a long
        history). That the index and the table agree is checked when the ledger is opened and at
        every `Ledger.verify` (each reconcile), by integrity_check and a scan of the table itself."""
        return self.select(conn, "WHERE state IN ('held', 'migrating')")

    def in_states(self, conn: sqlite3.Connection, states: Sequence[str] | None, *, strict: bool = True) -> list[Claim]:
        """Claims in `states` (every claim for None), oldest first."""
        if states is None:
            return self.select(conn, "ORDER BY created_at, migration_id", strict=strict)
        if not states:
            return []
        marks = ",".join("?" * len(states))
        order = f"WHERE state IN ({marks}) ORDER BY created_at, migration_id"
        return self.select(conn, order, states, strict=strict)

    def latest_ended(self, conn: sqlite3.Connection, states: Sequence[str], limit: int) -> list[Claim]:
        """The `limit` ended claims in `states` changed last (a listing for people: damaged rows
        skipped), oldest first. Costs the count of ended claims in SQLite, `limit` rows in Python."""
        if not states or limit <= 0:
            return []
        marks = ",".join("?" * len(states))
        where = f"WHERE state IN ({marks}) ORDER BY updated_at DESC, migration_id LIMIT ?"
        return self.select(conn, where, (*states, limit), strict=False)[::-1]

    def count(self, conn: sqlite3.Connection, states: Sequence[str]) -> int:
        marks = ",".join("?" * len(states))
        return int(conn.execute(f"SELECT count(*) FROM claims WHERE state IN ({marks})", states).fetchone()[0])

    def due(self, conn: sqlite3.Connection, now: float) -> list[Claim]:
        """Live claims whose expiry is `now` or earlier."""
        return self.select(conn, "WHERE state IN ('held', 'migrating') AND expires_at <= ?", (now,))

    def _check_placement(self, claim: Claim, placement_json: str) -> None:
        try:
            again = Placement.from_json(json.loads(placement_json))
        except (InvalidInput, ValueError) as exc:
            raise InvalidInput(
                f"claim {claim.migration_id}: refusing to store a placement that reads back bad: {exc}"
            ) from None
        if again != claim.placement:
            raise AgentError(f"claim {claim.migration_id}: the placement does not read back as stored; not storing it")

    def insert(self, conn: sqlite3.Connection, claim: Claim, creation_reason: str) -> None:
        """A new claim and its creation transition (from NULL), both checked before they are stored."""
        placement_json = canonical_json(claim.placement.to_json())
        values = (
            claim.migration_id,
            claim.instance_uuid,
            claim.source_host,
            claim.request_json,
            placement_json,
            claim.state.value,
            claim.created_at,
            claim.expires_at,
            claim.updated_at,
            claim.reason,
            claim.ttl_s,
        )
        problem = claim_row_problem(values)
        if problem is not None:
            raise InvalidInput(f"claim {claim.migration_id}: refusing to store an invalid row: {problem}")
        self._check_placement(claim, placement_json)
        conn.execute(
            f"INSERT INTO claims ({_COLUMNS}, row_sum) VALUES ({', '.join('?' * 12)})", (*values, row_sum(values))
        )
        self._add_transition(conn, (claim.migration_id, None, claim.state.value, claim.created_at, creation_reason))

    @staticmethod
    def _add_transition(conn: sqlite3.Connection, values: tuple[Any, ...]) -> None:
        conn.execute(
            "INSERT INTO transitions (migration_id, from_state, to_state, at, reason, row_sum) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (*values, row_sum(values)),
        )

    @staticmethod
    def _resum(conn: sqlite3.Connection, migration_id: str) -> None:
        """The checksum of a claim row just updated (read and verified in this same transaction)."""
        conn.execute(f"UPDATE claims SET row_sum = {_CLAIM_SUM} WHERE migration_id = ?", (migration_id,))

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
        self._resum(conn, claim.migration_id)
        self._add_transition(conn, (claim.migration_id, claim.state.value, to.value, now, reason))
        return replace(claim, state=to, expires_at=new_expiry, updated_at=now, reason=reason)

    def refresh_expiry(self, conn: sqlite3.Connection, claim: Claim, now: float, expires_at: float) -> Claim:
        """A progress report: a new expiry, no transition row."""
        conn.execute(
            "UPDATE claims SET updated_at = ?, expires_at = ? WHERE migration_id = ?",
            (now, expires_at, claim.migration_id),
        )
        self._resum(conn, claim.migration_id)
        return replace(claim, expires_at=expires_at, updated_at=now)

    def transitions(self, conn: sqlite3.Connection, migration_id: str) -> list[Transition]:
        """The claim's history; a damaged transition row is skipped (kept in `bad_rows`)."""
        rows = conn.execute(
            "SELECT id, migration_id, from_state, to_state, at, reason, row_sum FROM transitions "
            "WHERE migration_id = ? ORDER BY id",
            (migration_id,),
        ).fetchall()
        out = []
        for r in rows:
            bad = verify_row("transitions", str(r[0]), r[1:-1], r[-1])
            if bad is not None:
                self.note_bad(bad)
                continue
            m, f, t, at, reason = r[1:-1]
            out.append(Transition(m, ClaimState(f) if f else None, ClaimState(t), at, reason))
        return out

    def delete_ended_before(self, conn: sqlite3.Connection, cutoff: float) -> int:
        """Delete terminal claims last changed at `cutoff` or earlier; returns how many."""
        # transitions go with their claim: ON DELETE CASCADE (foreign_keys=ON on every connection)
        return conn.execute(
            f"DELETE FROM claims WHERE state IN {_TERMINAL_SQL} AND updated_at <= ?", (cutoff,)
        ).rowcount

    # ---- damage records ------------------------------------------------------------------------

    def damage_records(self, conn: sqlite3.Connection) -> tuple[DamageRecord, ...]:
        """Every recorded damage, oldest first; a damaged record raises LedgerCorrupt."""
        rows = conn.execute(f"SELECT id, {', '.join(DAMAGE_COLUMNS)}, row_sum FROM damage ORDER BY id").fetchall()
        out = []
        for r in rows:
            bad = verify_row("damage", str(r[0]), r[1:-1], r[-1])
            if bad is not None:
                raise self.corrupt(bad)
            out.append(DamageRecord(*r[1:-1]))
        return tuple(out)

    def accept_damage(self, conn: sqlite3.Connection, now: float, by: str) -> int:
        """Mark every damage not yet accepted as accepted (the caller read them in this
        transaction, so re-summing them blesses nothing unverified); returns how many."""
        self.damage_records(conn)
        n = conn.execute(
            "UPDATE damage SET accepted_at = ?, accepted_by = ? WHERE accepted_at IS NULL", (now, by)
        ).rowcount
        conn.execute(f"UPDATE damage SET row_sum = {_DAMAGE_SUM}")
        return n


__all__ = [
    "LEDGER_FILE",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "ClaimStore",
    "file_lock",
    "decoded_errors",
    "is_busy",
    "is_corruption",
    "migrate",
    "prepare",
    "user_version",
]
