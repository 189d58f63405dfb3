"""What the ledger knows about its own damage: the durable record and the status callers show.

When the agent finds its ledger damaged it salvages what it can read into a fresh ledger and records
one `DamageRecord` there (see `agent.claims.salvage`). A claim lost with the damaged rows may still
matter: a held claim until its TTL ends, a migrating one until its progress timeout. So new claims are
refused (`LedgerDamaged`) until `hold_until` = found_at + the longest of those, unless an operator
accepts the damage earlier (`compute-agent claims accept-damage`, recorded in the same row).

`LedgerDamage` (``Ledger.damage``) is the status object that `claims list`, and later
``describe_host`` and the capability report, carry: frozen, JSON-ready, None when no damage was ever
recorded and none was seen since the ledger was opened.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

# The longest TTL a claim may be made with (Ledger.claim refuses more): it bounds how long a claim
# lost in a damaged ledger can still hold resources. A [claims] option would override it.
DEFAULT_MAX_TTL_S = 7200.0  # two hours: a held claim waits minutes for its migration to start


@dataclass(frozen=True, slots=True)
class DamageRecord:
    """One damage event, as stored in the ledger's ``damage`` table."""

    found_at: float
    detail: str  # what was wrong (the check's report, the first bad rows)
    moved_to: str | None  # where the damaged file was kept
    salvaged: int  # claims carried over into the new ledger
    live_salvaged: int  # of which held or migrating
    unreadable: int  # rows seen but not usable (checksum, checks, unreadable pages)
    hold_until: float  # new claims refused until then (unless accepted)
    accepted_at: float | None = None
    accepted_by: str | None = None

    def values(self) -> tuple[Any, ...]:
        return (
            self.found_at,
            self.detail,
            self.moved_to,
            self.salvaged,
            self.live_salvaged,
            self.unreadable,
            self.hold_until,
            self.accepted_at,
            self.accepted_by,
        )

    def holds_at(self, now: float) -> bool:
        """Does this damage still refuse new claims at `now`?"""
        return self.accepted_at is None and now < self.hold_until

    def to_json(self) -> dict[str, Any]:
        return {
            "found_at": self.found_at,
            "detail": self.detail,
            "moved_to": self.moved_to,
            "salvaged_claims": self.salvaged,
            "salvaged_live_claims": self.live_salvaged,
            "unreadable_rows": self.unreadable,
            "hold_until": self.hold_until,
            "accepted_at": self.accepted_at,
            "accepted_by": self.accepted_by,
        }


@dataclass(frozen=True, slots=True)
class LedgerDamage:
    """The ledger's damage status (``Ledger.damage``)."""

    refusing_new_claims: bool
    hold_until: float | None  # None: refused until the ledger is reopened (damage seen while running)
    records: tuple[DamageRecord, ...] = ()  # every recorded damage, oldest first
    seen_while_running: str | None = None  # a bad row met after open: the next open salvages

    @property
    def summary(self) -> str:
        """One line for a CLI header or a log."""
        if self.seen_while_running is not None:
            return f"LEDGER DAMAGED: {self.seen_while_running}; new claims refused until the agent reopens it"
        last = self.records[-1]
        head = (
            f"ledger damage found {_stamp(last.found_at)}: {last.salvaged} claim(s) salvaged "
            f"({last.live_salvaged} live), {last.unreadable} unreadable row(s), lost claims unknown"
        )
        if self.refusing_new_claims and self.hold_until is not None:
            return f"LEDGER DAMAGED: {head}; NEW CLAIMS REFUSED until {_stamp(self.hold_until)} or accept-damage"
        if last.accepted_at is not None:
            return f"{head}; accepted {_stamp(last.accepted_at)} by {last.accepted_by}"
        return f"{head}; hold over since {_stamp(last.hold_until)}"

    def to_json(self) -> dict[str, Any]:
        return {
            "refusing_new_claims": self.refusing_new_claims,
            "hold_until": self.hold_until,
            "seen_while_running": self.seen_while_running,
            "records": [r.to_json() for r in self.records],
            "summary": self.summary,
        }


def damage_status(records: tuple[DamageRecord, ...], now: float, seen_while_running: str | None) -> LedgerDamage | None:
    """The status from the stored records and a damage met since open (None: never damaged)."""
    if not records and seen_while_running is None:
        return None
    holding = [r.hold_until for r in records if r.holds_at(now)]
    refusing = bool(holding) or seen_while_running is not None
    until = max(holding) if holding and seen_while_running is None else None
    return LedgerDamage(refusing, until, records, seen_while_running)


def _stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


__all__ = ["DEFAULT_MAX_TTL_S", "DamageRecord", "LedgerDamage", "damage_status"]
