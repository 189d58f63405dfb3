"""Typed errors of the claim ledger (see agent.errors for the conventions)."""

from __future__ import annotations

import time
from pathlib import Path

from agent.errors import AgentError, InvalidInput


class LedgerError(AgentError):
    """The ledger file cannot be used (I/O, permissions, an unexpected SQLite failure)."""

    code = "ledger_error"


class UnknownClaim(InvalidInput):
    """No claim has this migration id."""

    code = "unknown_claim"

    def __init__(self, migration_id: str) -> None:
        super().__init__(f"no claim for migration {migration_id!r}")
        self.migration_id = migration_id


class ClaimConflict(InvalidInput):
    """A claim with this migration id exists for a different request or source host."""

    code = "claim_conflict"


class IllegalTransition(InvalidInput):
    """The claim's current state does not allow the asked transition."""

    code = "illegal_transition"

    def __init__(self, migration_id: str, from_state: str, to_state: str, why: str = "") -> None:
        msg = f"claim {migration_id!r}: cannot go from {from_state} to {to_state}"
        if why:
            msg = f"{msg} ({why})"
        super().__init__(msg)
        self.migration_id = migration_id
        self.from_state = from_state
        self.to_state = to_state


class ClaimEnded(IllegalTransition):
    """The claim is over (expired or released): it holds nothing any more, so neither a retried
    `claim` nor `start`/`progress`/`confirm` may act as if it were still valid."""

    code = "claim_ended"

    def __init__(self, migration_id: str, state: str, reason: str | None, to_state: str) -> None:
        super().__init__(migration_id, state, to_state, f"the claim ended: {state}: {reason or 'no reason recorded'}")
        self.state = state
        self.reason = reason


class NoFitError(AgentError):
    """The request does not fit the host's current state (live claims included)."""

    code = "no_fit"

    def __init__(self, reason: str, nofit: object | None = None) -> None:
        super().__init__(f"does not fit: {reason}")
        self.reason = reason
        self.nofit = nofit


class LedgerSchemaTooNew(LedgerError):
    """The ledger file was written by a newer agent; this one will not touch it."""

    code = "ledger_schema_too_new"

    def __init__(self, path: Path, found: int, supported: int) -> None:
        super().__init__(
            f"{path}: ledger schema version {found} is newer than this agent supports ({supported}); "
            "refusing to open it (upgrade the agent or restore a matching ledger)"
        )
        self.path = path
        self.found = found
        self.supported = supported


class LedgerCorrupt(LedgerError):
    """The ledger file failed its integrity check or is not a SQLite database.

    The damaged files were renamed to `moved_to` (never deleted) before this was raised.
    """

    code = "ledger_corrupt"

    def __init__(self, path: Path, detail: str, moved_to: Path | None) -> None:
        where = f"; moved aside to {moved_to}" if moved_to is not None else ""
        super().__init__(f"{path}: ledger is corrupt: {detail}{where}")
        self.path = path
        self.detail = detail
        self.moved_to = moved_to


class LedgerDamaged(LedgerError):
    """The ledger was found damaged and salvaged: claims it may have lost could still hold CPUs,
    so new claims are refused until `hold_until` (epoch seconds) or an operator accepts the damage
    (`compute-agent claims accept-damage`)."""

    code = "ledger_damaged"

    def __init__(self, path: Path, detail: str, hold_until: float) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(hold_until))
        super().__init__(
            f"{path}: the claim ledger was damaged ({detail}); new claims are refused until {stamp} "
            "(the longest a lost claim could still hold resources) or until an operator runs "
            "`compute-agent claims accept-damage`"
        )
        self.path = path
        self.detail = detail
        self.hold_until = hold_until


class LedgerBusy(LedgerError):
    """Another process (the agent, during a claim) holds the ledger's write lock longer than an
    operator command waits."""

    code = "ledger_busy"

    def __init__(self, path: Path, waited_s: float) -> None:
        super().__init__(
            f"{path}: waited {waited_s:g}s for the agent's claim in progress (the ledger's write lock is "
            "held by another process); nothing was changed: retry in a moment"
        )
        self.path = path
        self.waited_s = waited_s


class LedgerAccessDenied(LedgerError):
    """The ledger or its directory cannot be read (or written) by this user."""

    code = "ledger_access_denied"

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(
            f"{path}: permission denied ({what}); the claim ledger belongs to the agent's user: "
            "run this command as root or as that user"
        )
        self.path = path
