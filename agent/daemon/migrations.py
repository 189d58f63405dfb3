"""The durable record of the migrations this agent runs as the source: `<state_dir>/migrations.db`.

One row per migration id: what was asked (instance, destination, claim host, placement), where it
is (status, phase, percent that never goes down), how it ended (reason, downtime, total time,
policy, where the instance runs now) and whether the destination's claim was settled
(`claim_action`). `migration_status` answers from it, the orchestrator's `migration list|show`
read it through the agent, and the restart recovery (agent.daemon.source_recovery) starts from it.

Status, in order: queued -> preparing -> running -> completed | failed | aborted. On the wire
(docs/protocol.md 5.4) `preparing` is `running` with phase `preparing`. `claim_action`: none (no
claim: the legacy move), pending (to confirm or release once the outcome is known), confirmed,
released, left (failed in post-copy: the destination decides), failed (the calls kept failing; the
claim expires on the destination).

SQLite in WAL mode, one connection guarded by a lock (rows are small and written at most once a
second per migration); a row is written whole, so a crash leaves the last complete version.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Literal

from agent.errors import AgentError

log = logging.getLogger("compute_agent.migrations")

MIGRATIONS_FILE = "migrations.db"
SCHEMA_VERSION = 1
LIST_LIMIT = 1000  # rows one list returns: a drain of a full host is a few hundred migrations
RETENTION_S = 30 * 24 * 3600  # ended migrations kept for `migration list` (a month of history)

Status = Literal["queued", "preparing", "running", "completed", "failed", "aborted"]
ClaimAction = Literal["none", "pending", "confirmed", "released", "left", "failed"]
ACTIVE: frozenset[str] = frozenset({"queued", "preparing", "running"})
ENDED: frozenset[str] = frozenset({"completed", "failed", "aborted"})


class MigrationStoreError(AgentError):
    """The migrations file cannot be opened or written (names the file)."""

    code = "migration_store_error"


@dataclass(frozen=True, slots=True)
class MigrationRecord:
    migration_id: str
    instance: str  # as the caller named it (UUID or domain name)
    instance_uuid: str
    instance_name: str
    dest_host: str
    dest_libvirt_uri: str
    dest_migration_uri: str
    claim_host: str | None  # None: the legacy move, no claim to settle
    placement_json: str | None  # the destination's placement (canonical JSON), None: legacy move
    version: str  # the RPC version of the live_migrate call
    status: Status
    phase: str
    percent: float
    created_at: float
    updated_at: float
    started_at: float | None = None
    ended_at: float | None = None
    reason: str | None = None
    downtime_ms: int | None = None
    total_s: float | None = None
    auto_converge: bool | None = None  # the policy decided when the job started
    post_copy: bool | None = None
    decided_by: str | None = None
    host_now: str | None = None
    claim_action: ClaimAction = "none"
    abort_requested: bool = False

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def wire_status(self) -> str:
        """The protocol's status word (`preparing` is `running` there)."""
        return "running" if self.status == "preparing" else self.status

    def state(self) -> dict[str, Any]:
        """The `abort_migration` / `force_complete` / `migration_status` result (MigrationStateResult)."""
        return {
            "migration_id": self.migration_id,
            "instance": self.instance,
            "status": self.wire_status,
            "phase": self.phase,
            "percent": self.percent,
            "reason": self.reason,
        }

    def to_json(self) -> dict[str, Any]:
        """Every field, for `migration list|show --json`."""
        doc = asdict(self)
        doc["placement"] = json.loads(self.placement_json) if self.placement_json else None
        del doc["placement_json"]
        return doc


_COLUMNS = tuple(f.name for f in fields(MigrationRecord))
_BOOLS = frozenset({"auto_converge", "post_copy", "abort_requested"})
_SCHEMA = f"""CREATE TABLE IF NOT EXISTS migrations (
    {", ".join(("migration_id TEXT PRIMARY KEY NOT NULL", *(c for c in _COLUMNS[1:])))}
)"""


def _row(record: MigrationRecord) -> tuple[Any, ...]:
    return tuple(getattr(record, c) for c in _COLUMNS)


def _record(row: sqlite3.Row) -> MigrationRecord:
    values = {c: row[c] for c in _COLUMNS}
    for c in _BOOLS:
        values[c] = None if values[c] is None else bool(values[c])
    return MigrationRecord(**values)


class MigrationStore:
    """The migrations file. Thread-safe; `close()` when done."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path, self.clock = path, clock
        self._lock = threading.RLock()  # update() reads and writes under it
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._setup()
        except sqlite3.Error as exc:
            raise MigrationStoreError(f"{path}: cannot open the migrations record: {exc}") from None
        except OSError as exc:
            raise MigrationStoreError(f"{path}: {exc.strerror or exc}") from None

    @classmethod
    def open(cls, state_dir: Path, *, clock: Callable[[], float] = time.time) -> MigrationStore:
        return cls(Path(state_dir) / MIGRATIONS_FILE, clock=clock)

    def _setup(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"schema version {version} is newer than this agent's {SCHEMA_VERSION}")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a record that says "running" must survive power loss
        self._db.execute(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise MigrationStoreError(f"{self.path}: {exc}") from None

    # --- reads ------------------------------------------------------------------------------------

    def get(self, migration_id: str) -> MigrationRecord | None:
        rows = self._exec("SELECT * FROM migrations WHERE migration_id = ?", (migration_id,))
        return _record(rows[0]) if rows else None

    def recent(self, *, limit: int = LIST_LIMIT, active_only: bool = False) -> list[MigrationRecord]:
        """Newest first."""
        where = f"WHERE status IN ({', '.join(repr(s) for s in sorted(ACTIVE))})" if active_only else ""
        rows = self._exec(
            f"SELECT * FROM migrations {where} ORDER BY created_at DESC LIMIT ?", (min(limit, LIST_LIMIT),)
        )
        return [_record(r) for r in rows]

    def unfinished(self) -> list[MigrationRecord]:
        """What a restart must take up: active migrations and ended ones whose claim is unsettled."""
        rows = self._exec(
            "SELECT * FROM migrations WHERE status IN ('queued','preparing','running') OR claim_action = 'pending' "
            "ORDER BY created_at"
        )
        return [_record(r) for r in rows]

    # --- writes -----------------------------------------------------------------------------------

    def add(self, record: MigrationRecord) -> tuple[MigrationRecord, bool]:
        """Insert `record`; (the stored record, True) or, when the id exists, (that one, False)."""
        marks = ", ".join("?" for _ in _COLUMNS)
        with self._lock:
            try:
                self._db.execute(f"INSERT INTO migrations ({', '.join(_COLUMNS)}) VALUES ({marks})", _row(record))
                return record, True
            except sqlite3.IntegrityError:
                row = self._db.execute("SELECT * FROM migrations WHERE migration_id = ?", (record.migration_id,))
                return _record(row.fetchone()), False
            except sqlite3.Error as exc:
                raise MigrationStoreError(f"{self.path}: {exc}") from None

    def update(self, migration_id: str, **changes: Any) -> MigrationRecord:
        """Change some fields (and `updated_at`); KeyError when there is no such migration."""
        unknown = set(changes) - set(_COLUMNS)
        if unknown:
            raise TypeError(f"unknown migration record fields: {', '.join(sorted(unknown))}")
        with self._lock:  # read and write as one step: concurrent updates never lose each other's fields
            current = self.get(migration_id)
            if current is None:
                raise KeyError(migration_id)
            record = replace(current, **changes, updated_at=self.clock())
            sets = ", ".join(f"{c} = ?" for c in _COLUMNS[1:])
            self._exec(f"UPDATE migrations SET {sets} WHERE migration_id = ?", (*_row(record)[1:], migration_id))
            return record

    def prune(self, retention_s: float = RETENTION_S) -> int:
        """Forget ended migrations older than `retention_s` whose claim is settled; how many."""
        cutoff = self.clock() - retention_s
        rows = self._exec(
            "DELETE FROM migrations WHERE status IN ('completed','failed','aborted') AND claim_action != 'pending' "
            "AND updated_at < ? RETURNING migration_id",
            (cutoff,),
        )
        return len(rows)
