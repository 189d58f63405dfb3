"""The history role: `list_migrations`, the migrations this agent ran as the source, newest first.

It reads the source role's durable record (agent.daemon.migrations, `<state_dir>/migrations.db`),
so any orchestrator, on any machine, can list what this agent did (`compute-agent migration list`).
Each row is the `migration_status` result plus the source (this agent), the destination, the kind
of move and how it ended (agent.bus.schemas.MigrationHistoryRow).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from agent.bus import schemas
from agent.bus.errors import RemoteRefused
from agent.daemon.migrations import MigrationRecord, MigrationStore, MigrationStoreError

if TYPE_CHECKING:
    from agent.bus.rpc import RpcServer

log = logging.getLogger("compute_agent.daemon.history")


def history_row(host: str, record: MigrationRecord) -> dict[str, Any]:
    """One list_migrations row (MigrationHistoryRow) of a record of this agent's."""
    return {
        **record.state(),
        "source": host,
        "destination": record.dest_host,
        "move": "numa-aware" if record.placement_json else "legacy",
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "ended_at": record.ended_at,
        "downtime_ms": record.downtime_ms,
        "total_s": record.total_s,
        "host_now": record.host_now,
    }


class History:
    """The history role (agent.daemon.context.Role) over the source role's migration store."""

    def __init__(self, host: str, store: Callable[[], MigrationStore]) -> None:
        self.host = host
        self._store = store  # the source's store, opened by it on first use

    def register(self, server: RpcServer) -> None:
        server.register("list_migrations", self.list_migrations, since="1.0", body_type=schemas.ListMigrationsBody)

    def start(self) -> None:
        """Nothing runs in the background: the store is read per call."""

    def stop(self) -> None:
        """Nothing to stop: the source role closes the store."""

    def status(self) -> str:
        return ""

    def list_migrations(self, body: schemas.ListMigrationsBody) -> dict[str, Any]:
        try:
            records = self._store().recent(limit=body.limit, active_only=body.active_only)
        except MigrationStoreError as exc:  # the record is unreadable now: say so, crash nothing
            log.error("list_migrations: %s", exc)
            raise RemoteRefused(exc.message, details={"code": exc.code}) from None
        return {"migrations": [history_row(self.host, r) for r in records]}
