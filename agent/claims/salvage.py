"""Reading what is still readable from a damaged ledger file, and building a ledger from it.

`salvage` never trusts the damaged file: it reads each table through rowid seeks, so one unreadable
page costs the rows on it, not the whole table (each failed seek skips twice as far as the last, so a
file that is damaged everywhere costs a few dozen failed queries, never a loop); every row read must
pass the column checks and its checksum (`agent.claims.rows`), and a live claim's placement must
parse, or it is counted as unreadable. What passes is carried into a fresh ledger by `build_ledger`,
together with the new `DamageRecord` (see `agent.claims.damage` for what follows from it).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from agent.claims.damage import DamageRecord
from agent.claims.model import LIVE_STATES
from agent.claims.rows import (
    CLAIM_COLUMNS,
    DAMAGE_COLUMNS,
    TRANSITION_COLUMNS,
    BadRow,
    decode_text,
    row_sum,
    verify_row,
)
from agent.errors import InvalidInput
from agent.numa.placement import Placement

log = logging.getLogger("compute_agent.claims")

_MAX_FAILED_SEEKS = 256  # per table: 63 doublings cover every rowid; the rest is for scattered damage
_LIVE = frozenset(s.value for s in LIVE_STATES)
_DEFAULTS = {"ttl_s": 0.0}  # columns added by a migration, as an older file's rows would get them


@dataclass(slots=True)
class Salvage:
    """What was recovered from a damaged file (rows as stored: values in table order, then sum)."""

    claims: list[tuple[Any, ...]] = field(default_factory=list)
    transitions: list[tuple[Any, ...]] = field(default_factory=list)
    damage: list[tuple[Any, ...]] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)
    failed_seeks: int = 0
    opened: bool = True  # False: SQLite could not read the file at all

    @property
    def live_claims(self) -> int:
        return sum(1 for r in self.claims if r[5] in _LIVE)

    def summary(self) -> str:
        if not self.opened:
            return "nothing readable"
        parts = [f"{len(self.claims)} claim(s) salvaged ({self.live_claims} live)"]
        if self.bad:
            parts.append(f"{len(self.bad)} bad row(s): " + "; ".join(map(str, self.bad[:3])))
        if self.failed_seeks:
            parts.append(f"{self.failed_seeks} unreadable stretch(es)")
        return ", ".join(parts)


def _connect_ro(path: Path) -> sqlite3.Connection:
    uri = "file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=1.0, isolation_level=None, check_same_thread=False)
    conn.text_factory = decode_text
    conn.execute("PRAGMA query_only=ON")
    return conn


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {str(r[1]) for r in conn.execute(f"PRAGMA table_info({table})").fetchall()}


def _select(table: str, wanted: Sequence[str], have: set[str]) -> str:
    cols = [c if c in have else "NULL" for c in wanted]
    cols.append("row_sum" if "row_sum" in have else "NULL")
    return f"SELECT rowid, {', '.join(cols)} FROM {table}"


def _tolerant_rows(conn: sqlite3.Connection, sql: str, out: Salvage) -> list[tuple[Any, ...]]:
    """Every row of the query, read one rowid seek at a time; unreadable stretches are skipped."""
    seek = sql + " WHERE rowid > ? ORDER BY rowid LIMIT 1"
    rows: list[tuple[Any, ...]] = []
    last, skip, failed = 0, 1, 0
    while failed < _MAX_FAILED_SEEKS and last < 1 << 62:
        try:
            row = conn.execute(seek, (last,)).fetchone()
        except (sqlite3.Error, OverflowError, ValueError):
            failed += 1
            last, skip = last + skip, skip * 2
            continue
        if row is None:
            break
        rows.append(tuple(row))
        last, skip = int(row[0]), 1
    out.failed_seeks += failed
    return rows


def _read_table(conn: sqlite3.Connection, table: str, wanted: Sequence[str], out: Salvage) -> list[tuple[Any, ...]]:
    try:
        have = _columns(conn, table)
        sql = _select(table, wanted, have)
    except (sqlite3.Error, UnicodeDecodeError):
        out.failed_seeks += 1
        return []
    if not have:
        return []
    try:
        return [tuple(r) for r in conn.execute(sql + " ORDER BY rowid").fetchall()]
    except (sqlite3.Error, UnicodeDecodeError):  # some page is unreadable: go row by row
        return _tolerant_rows(conn, sql, out)


def _fill(values: list[Any], wanted: Sequence[str]) -> list[Any]:
    return [_DEFAULTS.get(name, v) if v is None else v for v, name in zip(values, wanted, strict=True)]


def _verified(table: str, row: tuple[Any, ...], wanted: Sequence[str], key_at: int | None) -> tuple | BadRow:
    """(values..., sum) of a row that passes, else a BadRow. A row of a file older than row sums
    (NULL sum) is checked by its columns only, as an upgrade would take it."""
    rowid, values, stored = row[0], _fill(list(row[1:-1]), wanted), row[-1]
    key = str(values[key_at]) if key_at is not None else str(rowid)
    if stored is None:
        stored = row_sum(values)
    bad = verify_row(table, repr(key)[:80], values, stored)
    if bad is not None:
        return bad
    if table == "claims" and values[5] in _LIVE:
        try:
            Placement.from_json(json.loads(values[4]))
        except (InvalidInput, ValueError) as exc:
            return BadRow(table, repr(key)[:80], f"unreadable placement: {exc}")
    return (*values, stored)


def _keep(out: Salvage, table: str, rows: list[tuple[Any, ...]], wanted: Sequence[str], key_at: int | None) -> list:
    kept = []
    for row in rows:
        got = _verified(table, row, wanted, key_at)
        if isinstance(got, BadRow):
            out.bad.append(got)
        else:
            kept.append(got)
    return kept


def salvage(source: Path | None) -> Salvage:
    """Everything usable in the damaged ledger file `source` (None: nothing to read)."""
    out = Salvage()
    try:
        if source is None or not source.is_file() or source.stat().st_size == 0:
            raise sqlite3.DatabaseError("no readable file")
        conn = _connect_ro(source)
    except (sqlite3.Error, OSError):
        out.opened = False
        return out
    try:
        out.claims = _keep(out, "claims", _read_table(conn, "claims", CLAIM_COLUMNS, out), CLAIM_COLUMNS, 0)
        kept_ids = {r[0] for r in out.claims}
        moves = _keep(
            out, "transitions", _read_table(conn, "transitions", TRANSITION_COLUMNS, out), TRANSITION_COLUMNS, 0
        )
        out.transitions = [t for t in moves if t[0] in kept_ids]
        out.damage = _keep(out, "damage", _read_table(conn, "damage", DAMAGE_COLUMNS, out), DAMAGE_COLUMNS, None)
    finally:
        conn.close()
    return out


# --- building a ledger file --------------------------------------------------------------------------


def _insert_all(conn: sqlite3.Connection, table: str, columns: Sequence[str], rows: Sequence[tuple]) -> None:
    marks = ", ".join("?" * (len(columns) + 1))
    conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}, row_sum) VALUES ({marks})", rows)


def build_ledger(
    target: Path, migrate: Callable[[sqlite3.Connection, Path], None], found: Salvage, record: DamageRecord | None
) -> None:
    """Write a complete ledger at `target` (replaced if there): the current schema, the salvaged
    rows and `record`; fsynced, no journal left beside it. The caller renames it into place, so a
    ledger is never seen half-built (nor zero-length)."""
    for p in (target, target.with_name(target.name + "-journal")):
        if p.exists():
            p.unlink()
    conn = sqlite3.connect(target, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=FULL")
        migrate(conn, target)
        conn.execute("BEGIN IMMEDIATE")
        _insert_all(conn, "claims", CLAIM_COLUMNS, found.claims)
        _insert_all(conn, "transitions", TRANSITION_COLUMNS, found.transitions)
        damage = list(found.damage)
        if record is not None:
            damage.append((*record.values(), row_sum(record.values())))
        _insert_all(conn, "damage", DAMAGE_COLUMNS, damage)
        conn.execute("COMMIT")
    finally:
        conn.close()
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_TABLES = (("claims", CLAIM_COLUMNS, 0), ("transitions", TRANSITION_COLUMNS, 0), ("damage", DAMAGE_COLUMNS, None))


def check_rows(conn: sqlite3.Connection, *, full: bool) -> list[BadRow]:
    """The rows of a ledger that opened cleanly, read from the tables themselves (NOT INDEXED) and
    verified as `salvage` would; SQLite errors propagate (the caller decides they are damage).

    ``full`` (after an upgrade: old rows were never checked): every row of every table. Otherwise
    what decides bookings: every claim's checksum (compared inside SQLite), every column of the
    claims not plainly terminal (live placements parse), the damage records. Transitions are
    verified when they are read (`claims show`), ended claims' columns were checked when stored."""
    out = Salvage()
    for table, columns, key_at in _TABLES if full else _TABLES[2:]:
        sql = _select(table, columns, _columns(conn, table)) + " NOT INDEXED"
        _keep(out, table, [tuple(r) for r in conn.execute(sql).fetchall()], columns, key_at)
    if not full:
        _check_claims_fast(conn, out)
    return out.bad


def _check_claims_fast(conn: sqlite3.Connection, out: Salvage) -> None:
    sql = _select("claims", CLAIM_COLUMNS, set(CLAIM_COLUMNS) | {"row_sum"}) + " NOT INDEXED"
    live = conn.execute(sql + " WHERE state NOT IN ('confirmed', 'released', 'expired')").fetchall()
    _keep(out, "claims", [tuple(r) for r in live], CLAIM_COLUMNS, 0)
    try:
        mismatched = conn.execute(
            f"SELECT migration_id FROM claims NOT INDEXED WHERE row_sum IS NOT claim_sum({', '.join(CLAIM_COLUMNS)})"
        ).fetchall()
    except sqlite3.OperationalError:  # text SQLite cannot hand to the function: check row by row
        everything = conn.execute(sql).fetchall()
        _keep(out, "claims", [tuple(r) for r in everything], CLAIM_COLUMNS, 0)
        return
    known = {b.key for b in out.bad}
    for (mid,) in mismatched:
        bad = BadRow("claims", repr(mid)[:80], "checksum mismatch (the row changed on disk)")
        if bad.key not in known:
            out.bad.append(bad)


__all__ = ["Salvage", "build_ledger", "check_rows", "salvage"]
