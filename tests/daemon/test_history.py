"""list_migrations: the source's migration history, newest first, as the orchestrator reads it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from agent.bus import schemas as s
from agent.bus.errors import RemoteRefused
from agent.bus.keys import Keyring
from agent.bus.rpc import RpcClient
from agent.daemon.history import History, history_row
from agent.daemon.migrations import MigrationStore
from agent.daemon.process import Daemon, history_roles
from agent.daemon.source import Source
from agent.orchestrator.agent_api import AgentAPI
from tests.daemon.agent_support import AgentFiles
from tests.daemon.test_migrations import record


@pytest.fixture
def store(tmp_path: Path) -> MigrationStore:
    clock = iter(float(t) for t in range(1000, 100000))
    return MigrationStore.open(tmp_path, clock=lambda: next(clock))


def _list(history: History, **body: object) -> s.ListMigrationsResult:
    answer = history.list_migrations(msgspec.convert(body, s.ListMigrationsBody))
    return msgspec.convert(answer, s.ListMigrationsResult)  # the wire's shape, checked


def test_rows_are_the_status_plus_where_and_how_newest_first(store: MigrationStore) -> None:
    store.add(record("m-old", created_at=10.0))
    store.add(record("m-legacy", created_at=20.0, placement_json=None, claim_host=None))
    store.update("m-old", status="completed", phase="done", percent=100.0, ended_at=50.0, downtime_ms=30)
    store.update("m-old", total_s=40.0, host_now="hv-02")
    rows = _list(History("hv-01", lambda: store)).migrations
    assert [r.migration_id for r in rows] == ["m-legacy", "m-old"]
    old = rows[1]
    assert (old.source, old.destination, old.move, old.status, old.percent) == (
        "hv-01",
        "hv-02",
        "numa-aware",
        "completed",
        100.0,
    )
    assert (old.downtime_ms, old.total_s, old.host_now, old.ended_at) == (30, 40.0, "hv-02", 50.0)
    assert rows[0].move == "legacy" and rows[0].status == "queued" and rows[0].host_now is None


def test_preparing_is_running_on_the_wire_and_limits_hold(store: MigrationStore) -> None:
    for i in range(5):
        store.add(record(f"m-{i}", created_at=float(i), status="completed" if i < 3 else "preparing"))
    history = History("hv-01", lambda: store)
    assert [r.migration_id for r in _list(history, limit=2).migrations] == ["m-4", "m-3"]
    active = _list(history, active_only=True).migrations
    assert [(r.migration_id, r.status) for r in active] == [("m-4", "running"), ("m-3", "running")]
    assert history_row("hv-01", record())["source"] == "hv-01"


@pytest.mark.parametrize("body", [{"limit": 0}, {"limit": 1001}, {"active_only": "yes"}])
def test_a_bad_body_is_refused_at_the_edge(body: dict[str, object]) -> None:
    from agent.bus.errors import RemoteInvalidRequest

    with pytest.raises(RemoteInvalidRequest):
        s.decode_body(body, s.ListMigrationsBody)


def test_an_unreadable_record_is_refused_not_a_crash(store: MigrationStore) -> None:
    store.close()
    with pytest.raises(RemoteRefused) as refused:
        History("hv-01", lambda: store).list_migrations(s.ListMigrationsBody())
    assert refused.value.details["code"] == "migration_store_error"


def test_only_a_source_role_has_a_history() -> None:
    assert history_roles("hv-01", []) == []


# --- served by the daemon, read by the orchestrator's stub ---------------------------------------------


pytest_plugins = ["tests.daemon.agent_fixtures"]  # source_files, source_daemon


@pytest.mark.asyncio
async def test_the_daemon_serves_its_source_history_to_migration_list(
    source_daemon: Daemon, source_files: AgentFiles
) -> None:
    source = next(r for r in source_daemon.roles if isinstance(r, Source))
    source.store.add(record("m-daemon", created_at=5.0))
    cfg = source_files.config().bus
    with RpcClient(cfg, Keyring.from_file(source_files.key_file), sender="orchestrator@test") as client:
        rows = await asyncio.to_thread(AgentAPI(client).list_migrations, "hv-src")
    assert [(r["migration_id"], r["source"], r["destination"]) for r in rows] == [("m-daemon", "hv-src", "hv-02")]
