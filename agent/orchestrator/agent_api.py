"""Client stub for the agent's RPC methods: one method per remote call, typed results.

Like Nova's ``nova/compute/rpcapi.py``, each method knows the version that brought it and
downgrades its own arguments to what the cap and the agent called allow (``can_send``). Unlike
Nova, it never drops something the caller asked for to make a call fit under a pin: a
`live_migrate` with a placement that cannot be sent at 1.1 raises `VersionTooLow` instead of
silently becoming the legacy move (the caller decides, see agent.orchestrator.versions).

Version history (docs/protocol.md, "Versions"):

    1.0 - describe_host, describe_instance, live_migrate (the legacy move: the domain XML's
          pinning is copied as is), abort_migration, force_complete, migration_status,
          list_migrations (the source's history; added with the daemon)
    1.1 - fit, claim, extend_claim, confirm_claim, release_claim;
          live_migrate with `placement` and `claim_host` (the NUMA-aware move)

An agent older than ``list_migrations`` answers NoSuchMethod, which is passed on as is.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, TypeVar

import msgspec

from agent.bus import schemas as s
from agent.bus.errors import RemoteError, RemoteInternal, ReplyLost, VersionCapError
from agent.bus.schemas import parse_version
from agent.orchestrator.model import DescribedHost

T = TypeVar("T", bound=msgspec.Struct)
V10, V11 = "1.0", "1.1"
#: host -> the highest version that agent advertises (None: unknown, assume it serves the cap)
PeerVersions = Callable[[str], tuple[int, int] | None]


class VersionTooLow(VersionCapError):
    """A call needs a version above the cap or above what the agent called serves."""

    code = "version_too_low"


class Transport(Protocol):
    """What the stub needs of `agent.bus.rpc.RpcClient` (tests and the bench pass the real one)."""

    def can_send(self, version: str) -> bool: ...

    def call(
        self, host: str, method: str, body: Any, *, timeout: float | None = None, version: str | None = None
    ) -> dict[str, Any]: ...

    def broadcast_call(
        self, method: str, body: Any, *, timeout: float, version: str | None = None
    ) -> dict[str, Any]: ...


def _typed(result: dict[str, Any], kind: type[T], host: str, method: str) -> T:
    """The result as its Struct; a malformed result is the agent's fault (RemoteInternal)."""
    try:
        return msgspec.convert(result, type=kind)
    except msgspec.ValidationError as exc:
        raise RemoteInternal(f"{method} on {host} answered a malformed result: {exc}") from None


class AgentAPI:
    """The agent's methods, capped by the client's version cap and by each agent's own maximum."""

    def __init__(
        self, client: Transport, *, peer_versions: PeerVersions | None = None, cap: tuple[int, int] = (1, 1)
    ) -> None:
        self.client = client
        self.peer_versions = peer_versions or (lambda host: None)
        self.cap = cap  # [upgrade_levels] agent, resolved (agent.orchestrator.versions.resolve_cap)

    def can_send(self, host: str, version: str) -> bool:
        """`version` is within the cap (ours and the client's) and the agent `host` advertises it."""
        asked, peer = parse_version(version), self.peer_versions(host)
        return asked <= self.cap and self.client.can_send(version) and (peer is None or asked <= peer)

    def _require(self, host: str, version: str, what: str) -> None:
        if not self.can_send(host, version):
            raise VersionTooLow(f"{what} needs RPC {version}; the cap or agent {host} is below it")

    def _call(self, host: str, method: str, body: Any, kind: type[T], version: str, **kw: Any) -> T:
        wire = msgspec.to_builtins(body)  # nested Structs (destination, placement) as JSON values
        try:
            result = self.client.call(host, method, wire, version=version, **kw)
        except ReplyLost:
            # the call may still run (queued in the publisher or on the agent): ask again, which
            # every method answers idempotently by its operation id, rather than act on a guess
            result = self.client.call(host, method, wire, version=version, **kw)
        return _typed(result, kind, host, method)

    # --- 1.0 --------------------------------------------------------------------------------------

    def describe_host(self, host: str) -> DescribedHost:
        return self._call(host, "describe_host", {}, DescribedHost, V10)

    def describe_all_hosts(self, timeout: float) -> dict[str, DescribedHost | RemoteError]:
        """A broadcast describe_host: {host: result or its error}, every reply within `timeout`."""
        out: dict[str, DescribedHost | RemoteError] = {}
        for host, reply in self.client.broadcast_call("describe_host", {}, timeout=timeout, version=V10).items():
            try:
                out[host] = (
                    reply if isinstance(reply, RemoteError) else _typed(reply, DescribedHost, host, "describe_host")
                )
            except RemoteError as exc:
                out[host] = exc
        return out

    def describe_instance(self, host: str, instance: str) -> s.DescribeInstanceResult:
        return self._call(host, "describe_instance", {"instance": instance}, s.DescribeInstanceResult, V10)

    def live_migrate(
        self,
        host: str,
        migration_id: str,
        instance: str,
        destination: s.Destination,
        *,
        placement: s.PlacementDoc | None = None,
        claim_host: str | None = None,
    ) -> s.LiveMigrateResult:
        """1.1 with a placement (the NUMA-aware move); 1.0 without one (the legacy move). A
        placement is never dropped to fit under a pin: VersionTooLow instead."""
        body: dict[str, Any] = {"migration_id": migration_id, "instance": instance, "destination": destination}
        if placement is None:
            return self._call(host, "live_migrate", body, s.LiveMigrateResult, V10)
        self._require(host, V11, "live_migrate with a placement")
        body.update(placement=placement, claim_host=claim_host)
        return self._call(host, "live_migrate", body, s.LiveMigrateResult, V11)

    def abort_migration(self, host: str, migration_id: str) -> s.MigrationStateResult:
        return self._call(host, "abort_migration", {"migration_id": migration_id}, s.MigrationStateResult, V10)

    def force_complete(self, host: str, migration_id: str) -> s.MigrationStateResult:
        return self._call(host, "force_complete", {"migration_id": migration_id}, s.MigrationStateResult, V10)

    def migration_status(self, host: str, migration_id: str) -> s.MigrationStateResult:
        return self._call(host, "migration_status", {"migration_id": migration_id}, s.MigrationStateResult, V10)

    def list_migrations(self, host: str) -> list[dict[str, Any]]:
        """The agent's migration history (newest first) when it serves `list_migrations`."""
        result = self.client.call(host, "list_migrations", {}, version=V10)
        rows = result.get("migrations", [])
        return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []

    # --- 1.1 --------------------------------------------------------------------------------------

    def fit(self, host: str, instance: dict[str, Any]) -> s.PlacementDoc:
        """Dry run: the placement `host` would give the instance; RemoteNoFit when it would not fit."""
        self._require(host, V11, "fit")
        return self._call(host, "fit", {"instance": instance}, s.PlacementDoc, V11)

    def claim(
        self, host: str, migration_id: str, instance: dict[str, Any], source_host: str, *, ttl_s: float | None = None
    ) -> s.ClaimResult:
        self._require(host, V11, "claim")
        body = {"migration_id": migration_id, "instance": instance, "source_host": source_host, "ttl_s": ttl_s}
        return self._call(host, "claim", body, s.ClaimResult, V11)

    def extend_claim(self, host: str, migration_id: str, *, ttl_s: float | None = None) -> s.ClaimView:
        self._require(host, V11, "extend_claim")
        return self._call(host, "extend_claim", {"migration_id": migration_id, "ttl_s": ttl_s}, s.ClaimView, V11)

    def confirm_claim(self, host: str, migration_id: str) -> s.ClaimView:
        self._require(host, V11, "confirm_claim")
        return self._call(host, "confirm_claim", {"migration_id": migration_id}, s.ClaimView, V11)

    def release_claim(self, host: str, migration_id: str, reason: str) -> s.ClaimView:
        self._require(host, V11, "release_claim")
        body = {"migration_id": migration_id, "reason": reason[:1000] or "released by the orchestrator"}
        return self._call(host, "release_claim", body, s.ClaimView, V11)
