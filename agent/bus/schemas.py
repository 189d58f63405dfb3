"""The body of every method, its result and every event, as msgspec Structs (docs/protocol.md
explains each field). Bodies are decoded once, at the edge, by `decode_body`: a bad field becomes
`RemoteInvalidRequest` naming its path, before any handler runs. Every string, list and map has a
bound so a hostile body cannot make a handler do unbounded work.

Instance requests travel as the formats.md document and are parsed by the one home of their rules,
`agent.numa.request.parse_request` (`InstanceBody.request()`); placements are
`agent.numa.placement.PlacementDoc`, read into a `Placement` by `Placement.from_json`.
Extra keys in a body are ignored (formats.md: readers ignore what they do not know).
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any, Literal, NamedTuple

import msgspec

from agent.bus.errors import RemoteInvalidRequest, RemoteNoFit
from agent.numa.placement import NoFit, Placement, PlacementDoc
from agent.numa.request import InstanceRequest, parse_request

# --- bounded field types (each bound: far above any real value, far below what hurts) ----------------
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]  # host and instance names (DNS: 253)
MigrationId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]  # the ledger's rule
Uri = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]  # reasons and messages
Version = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,3}\.[0-9]{1,3}$")]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=1e11)]  # durations and epoch times
TtlSeconds = Annotated[float, msgspec.Meta(ge=1, le=7 * 24 * 3600)]  # the ledger's MAX_TTL_S
Count = Annotated[int, msgspec.Meta(ge=0, le=1 << 62)]
Percent = Annotated[float, msgspec.Meta(ge=0, le=100)]
# an instance request: the formats.md keys plus extra specs; parse_request bounds the rest
InstanceDoc = Annotated[dict[str, Any], msgspec.Meta(max_length=64)]
MetadataMap = Annotated[dict[str, str], msgspec.Meta(max_length=1024)]
Traits = Annotated[list[Name], msgspec.Meta(max_length=256)]


class Struct(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """Base of every wire struct: immutable, extra keys ignored."""


class Empty(Struct, frozen=True):
    """`{}`: a method that takes no arguments."""


# --- requests shared by several methods --------------------------------------------------------------


class InstanceBody(Struct, frozen=True):
    instance: InstanceDoc

    def request(self) -> InstanceRequest:
        """The parsed request; agent.errors.InvalidRequest (-> wire InvalidRequest) when contradictory."""
        return parse_request(self.instance)


class MigrationIdBody(Struct, frozen=True):
    migration_id: MigrationId


# --- 1.0 ---------------------------------------------------------------------------------------------


class CellFree(Struct, frozen=True):
    id: Count
    free_pcpus: Count
    free_shared_vcpus: Count
    free_memory_mb: Count
    free_pages: Annotated[dict[str, Count], msgspec.Meta(max_length=16)]  # "<size_kb>": pages


class RpcVersions(Struct, frozen=True):
    min: Version
    max: Version


class LedgerDamageView(Struct, frozen=True):
    """A damaged claim ledger, as the agent says it loudly (README, "When the claim ledger is damaged")."""

    refusing_new_claims: bool  # true: every claim is answered Refused until hold_until
    hold_until: Seconds | None  # epoch seconds; null: until the agent reopens its ledger
    summary: Text


class Capabilities(Struct, frozen=True):
    """The `capabilities.<host>` event body, also the first part of `describe_host`'s result."""

    host: Name
    seq: Count  # grows by one per event from this agent's start; a gap means a lost event
    agent_version: Name
    rpc_versions: RpcVersions
    traits: Traits
    libvirt_version: Name  # "9.0.0"
    qemu_version: Name
    migration_uri: Uri
    libvirt_uri: Uri
    cells: Annotated[list[CellFree], msgspec.Meta(max_length=1024)]
    ts: Seconds
    ledger_damage: LedgerDamageView | None = None  # null: the ledger was never found damaged


class DescribeHostResult(Capabilities, frozen=True, kw_only=True):
    host_state: dict[str, Any]  # the "Host state" document of formats.md


class DescribeInstanceBody(Struct, frozen=True):
    instance: Name  # a UUID or a libvirt domain name


class PolicyView(Struct, frozen=True):
    auto_converge: bool
    post_copy: bool
    decided_by: Text  # which metadata key or config option decided, e.g. "hw:... =true"


class DescribeInstanceResult(Struct, frozen=True):
    uuid: Name
    name: Name
    state: Name  # libvirt's domain state word: running, paused, shutoff, ...
    vcpus: Count
    memory_mb: Count
    extra_specs: MetadataMap
    image_properties: MetadataMap
    placement: PlacementDoc | None  # None: the domain has no pinning
    policy: PolicyView  # how the agent would migrate it now


class Destination(Struct, frozen=True):
    host: Name
    libvirt_uri: Uri  # the destination libvirtd, e.g. qemu+tcp://10.0.0.2/system
    migration_uri: Uri  # where QEMU streams memory, e.g. tcp://10.0.0.2


class LiveMigrateBodyV10(Struct, frozen=True):
    migration_id: MigrationId
    instance: Name
    destination: Destination


class LiveMigrateBody(LiveMigrateBodyV10, frozen=True):
    """1.1: with `placement` (from the destination's claim) the NUMA-aware move; without, as 1.0."""

    placement: PlacementDoc | None = None
    claim_host: Name | None = None  # the agent holding the claim (normally destination.host)

    def placement_value(self) -> Placement | None:
        return None if self.placement is None else Placement.from_json(msgspec.to_builtins(self.placement))


class LiveMigrateResult(Struct, frozen=True):
    migration_id: MigrationId
    accepted: bool


MigrationStatus = Literal["queued", "running", "completed", "failed", "aborted"]


class MigrationStateResult(Struct, frozen=True):
    """abort_migration, force_complete and migration_status all answer with the migration's state."""

    migration_id: MigrationId
    instance: Name
    status: MigrationStatus
    phase: Name  # e.g. precopy, postcopy, paused, done
    percent: Percent
    reason: Text | None = None


HISTORY_LIMIT = 1000  # rows in one list_migrations answer: ~400 KiB, within [bus] max_message_bytes (1 MiB)


class ListMigrationsBody(Struct, frozen=True):
    """list_migrations: the migrations this agent ran as the source, newest first."""

    limit: Annotated[int, msgspec.Meta(ge=1, le=HISTORY_LIMIT)] = HISTORY_LIMIT
    active_only: bool = False  # only queued and running ones


class MigrationHistoryRow(MigrationStateResult, frozen=True, kw_only=True):
    """One migration of list_migrations: its migration_status, plus where, when and how it ended."""

    source: Name
    destination: Name
    move: Literal["numa-aware", "legacy"]  # with a placement (a claim on the destination) or without
    created_at: Seconds
    updated_at: Seconds
    ended_at: Seconds | None = None
    downtime_ms: Count | None = None
    total_s: Seconds | None = None
    host_now: Name | None = None  # where the instance runs now (null while it runs)


class ListMigrationsResult(Struct, frozen=True):
    migrations: Annotated[list[MigrationHistoryRow], msgspec.Meta(max_length=HISTORY_LIMIT)]


# --- 1.1 ---------------------------------------------------------------------------------------------


class FitBody(InstanceBody, frozen=True):
    pass


class ClaimBody(InstanceBody, frozen=True):
    migration_id: MigrationId
    source_host: Name
    ttl_s: TtlSeconds | None = None  # None: [claims] claim_ttl_s


class ClaimResult(Struct, frozen=True):
    placement: PlacementDoc
    expires_at: Seconds


class ExtendClaimBody(MigrationIdBody, frozen=True):
    ttl_s: TtlSeconds | None = None


class ConfirmClaimBody(MigrationIdBody, frozen=True):
    pass


class ReleaseClaimBody(MigrationIdBody, frozen=True):
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=1000)] = "released by the caller"


ClaimState = Literal["held", "migrating", "confirmed", "released", "expired"]


class ClaimView(Struct, frozen=True):
    """extend_claim, confirm_claim and release_claim answer with the claim (Claim.to_json)."""

    migration_id: MigrationId
    instance_uuid: Name
    source_host: Name
    state: ClaimState
    created_at: Seconds
    expires_at: Seconds
    updated_at: Seconds
    ttl_s: Seconds
    reason: Text | None
    request: dict[str, Any]
    placement: PlacementDoc


# --- events ------------------------------------------------------------------------------------------


class MigrationProgressEvent(Struct, frozen=True):
    migration_id: MigrationId
    instance: Name
    source: Name
    destination: Name
    phase: Name
    percent: Percent  # never goes down within one migration
    eta_s: Seconds | None
    memory_total: Count  # bytes
    memory_remaining: Count  # bytes
    dirty_rate_bps: Count  # bytes dirtied per second
    bandwidth_bps: Count  # bytes sent per second
    iteration: Count  # 1 = first pass over RAM
    throttle_pct: Annotated[int, msgspec.Meta(ge=0, le=100)]
    max_downtime_ms: Count
    ts: Seconds


class MigrationDoneEvent(Struct, frozen=True):
    migration_id: MigrationId
    status: Literal["completed", "failed", "aborted"]
    reason: Text | None
    downtime_ms: Count | None
    total_s: Seconds
    policy: PolicyView
    host_now: Name  # where the instance runs now


class ClaimEvent(Struct, frozen=True):
    """`claim.<host>`: a claim changed state on this host."""

    host: Name
    migration_id: MigrationId
    instance_uuid: Name
    state: ClaimState
    reason: Text | None
    ts: Seconds


# --- the method table --------------------------------------------------------------------------------


class MethodSpec(NamedTuple):
    name: str
    since: str  # the RPC version that brought this body
    body: type[msgspec.Struct]
    result: type[msgspec.Struct]


METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("describe_host", "1.0", Empty, DescribeHostResult),
    MethodSpec("describe_instance", "1.0", DescribeInstanceBody, DescribeInstanceResult),
    MethodSpec("live_migrate", "1.0", LiveMigrateBodyV10, LiveMigrateResult),
    MethodSpec("abort_migration", "1.0", MigrationIdBody, MigrationStateResult),
    MethodSpec("force_complete", "1.0", MigrationIdBody, MigrationStateResult),
    MethodSpec("migration_status", "1.0", MigrationIdBody, MigrationStateResult),
    MethodSpec("list_migrations", "1.0", ListMigrationsBody, ListMigrationsResult),
    MethodSpec("fit", "1.1", FitBody, PlacementDoc),
    MethodSpec("claim", "1.1", ClaimBody, ClaimResult),
    MethodSpec("extend_claim", "1.1", ExtendClaimBody, ClaimView),
    MethodSpec("confirm_claim", "1.1", ConfirmClaimBody, ClaimView),
    MethodSpec("release_claim", "1.1", ReleaseClaimBody, ClaimView),
    MethodSpec("live_migrate", "1.1", LiveMigrateBody, LiveMigrateResult),
)


def method_since(method: str) -> str | None:
    """The first version that has `method` (None: not a method of this protocol)."""
    versions = [m.since for m in METHODS if m.name == method]
    return min(versions, key=parse_version) if versions else None


@functools.lru_cache(maxsize=64)  # called per call with a handful of distinct methods
def method_versions(method: str) -> tuple[MethodSpec, ...]:
    """Every definition of `method`, oldest first (empty: not a method of this protocol)."""
    return tuple(sorted((m for m in METHODS if m.name == method), key=lambda m: parse_version(m.since)))


@functools.lru_cache(maxsize=256)
def best_version(method: str, cap: tuple[int, int]) -> str | None:
    """The newest version of `method` at or below `cap` (what a caller sends by default, as Nova's
    rpcapi does with can_send_version); None when even its first version is above the cap."""
    fitting = [m.since for m in method_versions(method) if parse_version(m.since) <= cap]
    return fitting[-1] if fitting else None


@functools.lru_cache(maxsize=64)
def newer_fields(method: str, version: str) -> tuple[tuple[str, str], ...]:
    """(field, the version that brings it) for each body field of `method` that its definition at
    `version` lacks but a later definition has."""
    asked = parse_version(version)
    specs = method_versions(method)
    known = {f.encode_name for m in specs if parse_version(m.since) <= asked for f in msgspec.structs.fields(m.body)}
    newer: dict[str, str] = {}
    for spec in (m for m in specs if parse_version(m.since) > asked):
        for f in msgspec.structs.fields(spec.body):
            if f.encode_name not in known:
                newer.setdefault(f.encode_name, spec.since)
    return tuple(newer.items())


def fields_needing_newer(method: str, version: str, body: dict[str, Any]) -> dict[str, str]:
    """{field: the version that brings it} for each field of `body` (not None) that `method` at
    `version` does not have: sent at `version`, the agent would silently ignore it."""
    return {name: since for name, since in newer_fields(method, version) if body.get(name) is not None}


@functools.lru_cache(maxsize=64)  # called per message with a handful of distinct values
def parse_version(text: str) -> tuple[int, int]:
    """ "1.1" -> (1, 1); ValueError for anything else."""
    major, dot, minor = text.partition(".")
    if not dot or not major.isdigit() or not minor.isdigit() or len(major) > 3 or len(minor) > 3:
        raise ValueError(f"version {text[:20]!r} is not major.minor")
    return int(major), int(minor)


def no_fit_error(result: NoFit) -> RemoteNoFit:
    """The wire error for a fitter's NoFit: details {"reason", "cells": {"<host cell id>": why}}."""
    cells = {str(cell): why for cell, why in sorted(result.cell_reasons.items())}
    return RemoteNoFit(result.reason, details={"reason": result.reason, "cells": cells})


# --- decoding at the edge ----------------------------------------------------------------------------

_PATH_RE = re.compile(r"at `\$([^`]*)`")
_MISSING_RE = re.compile(r"missing required field `([^`]+)`")


def field_path(exc: msgspec.ValidationError) -> str:
    """The offending field of a msgspec error as "body.a.b[0]" ("body" for the body itself)."""
    text = str(exc)
    at = _PATH_RE.search(text)
    path = "body" + (at.group(1) if at else "")
    missing = _MISSING_RE.search(text)
    return f"{path}.{missing.group(1)}" if missing else path


def decode_body(body: dict[str, Any], body_type: type[msgspec.Struct]) -> Any:
    """The typed body, or RemoteInvalidRequest naming the field (details: {"field": path})."""
    try:
        return msgspec.convert(body, type=body_type)
    except msgspec.ValidationError as exc:
        path = field_path(exc)
        raise RemoteInvalidRequest(f"{path}: {exc}", details={"field": path}) from None
