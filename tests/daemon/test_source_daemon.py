"""The source role inside the real daemon (agent.daemon.process, in the test's loop) on test:///default
and the machine's RabbitMQ: registered next to the destination, served over the bus, its STATUS."""

from __future__ import annotations

import asyncio
import uuid as uuidlib

import pytest

from agent.bus.errors import RemoteNotFound
from agent.bus.keys import Keyring
from agent.bus.rpc import RpcClient
from agent.daemon.migrations import MigrationStore
from agent.daemon.process import Daemon, optional_roles
from agent.daemon.source import Source
from tests.daemon.agent_support import AgentFiles, call, serving
from tests.daemon.test_migrations import record
from tests.daemon.test_source_fakes import define_domain, drop_domain

pytest_plugins = ["tests.daemon.agent_fixtures"]  # source_files, source_daemon


def test_the_process_builds_the_source_role() -> None:
    assert optional_roles() == [Source]


@pytest.mark.asyncio
async def test_source_methods_are_served_by_the_daemon(source_daemon: Daemon, source_files: AgentFiles) -> None:
    name, uuid = define_domain()
    cfg = source_files.config().bus
    try:
        with RpcClient(cfg, Keyring.from_file(source_files.key_file), sender="orchestrator@test") as client:
            described = await call(client, "hv-src", "describe_instance", {"instance": name})
            assert described["uuid"] == uuid and described["state"] == "running"
            with pytest.raises(RemoteNotFound):
                await call(client, "hv-src", "migration_status", {"migration_id": "nope"})
    finally:
        drop_domain(name)
    assert any(isinstance(role, Source) for role in source_daemon.roles)


@pytest.mark.asyncio
async def test_a_restarted_daemon_settles_what_its_record_left_open(source_files: AgentFiles) -> None:
    """A record left 'running' by a killed agent, whose instance is here with no job: the restarted
    agent marks it failed (the claim host is unreachable: the release is retried, then given up)."""
    name, uuid = define_domain()
    store = MigrationStore.open(source_files.state_dir)
    mid = f"m-{uuidlib.uuid4().hex[:6]}"
    store.add(
        record(
            mid,
            instance=name,
            instance_name=name,
            instance_uuid=uuid,
            status="running",
            claim_host=None,
            claim_action="none",
        )
    )
    store.close()
    try:
        async with serving(source_files, roles=optional_roles()) as d:
            source = next(r for r in d.roles if isinstance(r, Source))
            assert await asyncio.to_thread(source.recovered.wait, 10)
            got = source.store.get(mid)
            assert got is not None and got.status == "failed" and got.host_now == "hv-src"
    finally:
        drop_domain(name)
