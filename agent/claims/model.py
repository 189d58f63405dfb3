"""The claim model: states, the claim and its transitions, and the checks on what callers hand in.

Pure values, no I/O: `agent.claims.store` keeps them in SQLite, `agent.claims.ledger` moves them
between states (the state diagram is in the ledger's module doc).
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol

from agent.errors import InvalidInput
from agent.numa.placement import NoFit, Placement
from agent.numa.request import MAX_MEMORY_MB, MAX_VCPUS, InstanceRequest, parse_request
from agent.numa.state import HostState

MAX_TTL_S = 30 * 24 * 3600  # a month: no migration waits longer for its destination
_MIGRATION_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}", re.ASCII)

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
ALLOWED: Mapping[ClaimState, frozenset[ClaimState]] = {
    ClaimState.HELD: frozenset({ClaimState.MIGRATING, ClaimState.CONFIRMED, ClaimState.RELEASED, ClaimState.EXPIRED}),
    ClaimState.MIGRATING: frozenset({ClaimState.CONFIRMED, ClaimState.RELEASED, ClaimState.EXPIRED}),
    ClaimState.CONFIRMED: frozenset(),
    ClaimState.RELEASED: frozenset(),
    ClaimState.EXPIRED: frozenset(),
}
# asked transition -> states in which it is a harmless repeat (claim returned unchanged)
NOOP: Mapping[ClaimState, frozenset[ClaimState]] = {
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


def uuid_key(value: str) -> str:
    """An instance UUID as compared everywhere in claims: lower case, no dashes, no blanks."""
    return value.strip().lower().replace("-", "")


# --- validation of what callers hand in ---------------------------------------------------------


def check_migration_id(migration_id: Any) -> str:
    if not isinstance(migration_id, str) or not _MIGRATION_ID_RE.fullmatch(migration_id):
        shown = repr(migration_id)[:80]
        raise InvalidInput(f"migration id {shown} must be 1-128 characters of [A-Za-z0-9._:-]")
    return migration_id


def check_source_host(source_host: Any) -> str:
    if (
        not isinstance(source_host, str)
        or not 1 <= len(source_host) <= 255
        or not source_host.isprintable()
        or source_host != source_host.strip()
    ):
        raise InvalidInput(f"source host {repr(source_host)[:80]} must be 1-255 printable characters")
    return source_host


def check_ttl(ttl_s: Any) -> float:
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not math.isfinite(ttl_s):
        raise InvalidInput(f"ttl_s {ttl_s!r} must be a number of seconds")
    if not 1 <= ttl_s <= MAX_TTL_S:
        raise InvalidInput(f"ttl_s {ttl_s} out of range 1-{MAX_TTL_S}")
    return float(ttl_s)


def coerce_request(request: Any) -> InstanceRequest:
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


def canonical_json(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


__all__ = [
    "ALLOWED",
    "Claim",
    "ClaimState",
    "Fitter",
    "HostStateFn",
    "HostView",
    "LIVE_STATES",
    "MAX_TTL_S",
    "NOOP",
    "ReconcileDecision",
    "TERMINAL_STATES",
    "Transition",
    "canonical_json",
    "check_migration_id",
    "check_source_host",
    "check_ttl",
    "coerce_request",
    "uuid_key",
]
