"""What a stored row must look like: column checks and the row checksum (pure, no I/O).

SQLite sees damage to its pages, not a flipped digit inside a value: every row of the ledger carries
``row_sum``, a BLAKE2b digest of its canonical content, written with the row and verified whenever it
is read. A row whose checks or checksum fail is never used as data: it is reported (`BadRow`, with
its table and key) and the ledger treats it as damage.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from agent.claims.model import MAX_TTL_S, ClaimState, check_migration_id, check_source_host
from agent.errors import InvalidInput

MAX_TEXT = 1 << 20  # longest stored text (a request document is a few KiB)
MAX_TIME = 1 << 40  # epoch seconds: far beyond any real clock, below float precision trouble
_STATES = frozenset(s.value for s in ClaimState)

CLAIM_COLUMNS = (
    "migration_id",
    "instance_uuid",
    "source_host",
    "request_json",
    "placement_json",
    "state",
    "created_at",
    "expires_at",
    "updated_at",
    "reason",
    "ttl_s",
)
TRANSITION_COLUMNS = ("migration_id", "from_state", "to_state", "at", "reason")
DAMAGE_COLUMNS = (
    "found_at",
    "detail",
    "moved_to",
    "salvaged",
    "live_salvaged",
    "unreadable",
    "hold_until",
    "accepted_at",
    "accepted_by",
)


@dataclass(frozen=True, slots=True)
class BadRow:
    """A stored row that is not used: its table, its key (migration id, or rowid) and why."""

    table: str
    key: str
    problem: str

    def __str__(self) -> str:
        return f"{self.table} row {self.key}: {self.problem}"


def _field(value: Any) -> bytes:
    """One value, unambiguously: a type tag, then a length-prefixed UTF-8 text, a float's repr
    (shortest round-trip, the same on every Python 3) or NULL. Faster than JSON, as stable."""
    if isinstance(value, str):
        raw = value.encode("utf-8", "surrogatepass")
        return b"s%d:%s" % (len(raw), raw)
    if value is None:
        return b"n;"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return b"f%s;" % repr(float(value)).encode("ascii")
    raw = repr(value).encode("utf-8", "backslashreplace")  # not a stored type: never matches a sum
    return b"x%d:%s" % (len(raw), raw)


def row_sum(values: Sequence[Any]) -> str:
    """The checksum of a row's content (its columns in table order, row_sum and rowid excluded)."""
    return hashlib.blake2b(b"".join(map(_field, values)), digest_size=16).hexdigest()


# --- column checks: each returns a problem or None ---------------------------------------------------


def _text(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"not text ({type(value).__name__})"
    if len(value) > MAX_TEXT:
        return f"text of {len(value)} characters (at most {MAX_TEXT})"
    return None


def _opt_text(value: Any) -> str | None:
    return None if value is None else _text(value)


def _time(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"not a finite number ({value!r})"
    if not 0 <= value <= MAX_TIME:
        return f"{value!r} out of range 0..{MAX_TIME}"
    return None


def _opt_time(value: Any) -> str | None:
    return None if value is None else _time(value)


def _count(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1 << 40:
        return f"not a count ({value!r})"
    return None


def _state(value: Any) -> str | None:
    return None if value in _STATES else f"unknown state {value!r}"


def _opt_state(value: Any) -> str | None:
    return None if value is None else _state(value)


def _ttl(value: Any) -> str | None:
    problem = _time(value)
    if problem is None and value > MAX_TTL_S:
        return f"ttl {value!r} over {MAX_TTL_S}"
    return problem


def _raises(check: Callable[[Any], Any]) -> Callable[[Any], str | None]:
    def run(value: Any) -> str | None:
        try:
            check(value)
        except InvalidInput as exc:
            return str(exc)
        return None

    return run


def _json_text(value: Any) -> str | None:
    problem = _text(value)
    if problem is not None:
        return problem
    try:
        json.loads(value)
    except ValueError:
        return "not JSON"
    return None


_CLAIM_CHECKS: tuple[Callable[[Any], str | None], ...] = (
    _raises(check_migration_id),
    _text,
    _raises(check_source_host),
    _json_text,
    _text,  # placement_json: parsed (and checked) by whoever uses the placement
    _state,
    _time,
    _time,
    _time,
    _opt_text,
    _ttl,
)
_TRANSITION_CHECKS = (_raises(check_migration_id), _opt_state, _state, _time, _opt_text)
_DAMAGE_CHECKS = (_time, _text, _opt_text, _count, _count, _count, _time, _opt_time, _opt_text)


def _problem(values: Sequence[Any], checks: Sequence[Callable[[Any], str | None]], names: Sequence[str]) -> str | None:
    if len(values) != len(checks):
        return f"{len(values)} columns, expected {len(checks)}"
    for value, check, name in zip(values, checks, names, strict=True):
        problem = check(value)
        if problem is not None:
            return f"{name}: {problem}"
    return None


def claim_row_problem(values: Sequence[Any]) -> str | None:
    """What is wrong with a claim row's columns (CLAIM_COLUMNS order), or None."""
    return _problem(values, _CLAIM_CHECKS, CLAIM_COLUMNS)


def transition_row_problem(values: Sequence[Any]) -> str | None:
    return _problem(values, _TRANSITION_CHECKS, TRANSITION_COLUMNS)


def damage_row_problem(values: Sequence[Any]) -> str | None:
    return _problem(values, _DAMAGE_CHECKS, DAMAGE_COLUMNS)


_PROBLEMS = {"claims": claim_row_problem, "transitions": transition_row_problem, "damage": damage_row_problem}


def verify_row(table: str, key: str, values: Sequence[Any], stored_sum: Any) -> BadRow | None:
    """Check a stored row's columns and its checksum; a BadRow (never an exception) if either fails."""
    problem = _PROBLEMS[table](values)
    if problem is None and stored_sum != row_sum(values):
        problem = "checksum mismatch (the row changed on disk)"
    return None if problem is None else BadRow(table, key, problem)


def decode_text(raw: bytes) -> str:
    """The connections' text factory: undecodable bytes (damage) become U+FFFD, which the column
    checks refuse, instead of a UnicodeDecodeError escaping from whatever was reading."""
    return raw.decode("utf-8", "replace")


__all__ = [
    "BadRow",
    "CLAIM_COLUMNS",
    "DAMAGE_COLUMNS",
    "TRANSITION_COLUMNS",
    "claim_row_problem",
    "damage_row_problem",
    "decode_text",
    "row_sum",
    "transition_row_problem",
    "verify_row",
]
