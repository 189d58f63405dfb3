"""The source role inside the real daemon (agent.daemon.process, in the test's loop) on test:///default
and the machine's RabbitMQ: registered next to the destination, served over the bus, its STATUS."""

from __future__ import annotations

import asyncio
import uuid as uuidlib
from pathlib import Path
from typing import AsyncIterator

import pytest
import pytest_asyncio

from agent.bus.errors import RemoteNotFound
from agent.bus.keys import Keyring
from agent.bus.rpc import RpcClient
from agent.daemon.migrations import MigrationStore
from agent.daemon.process import Daemon, optional_roles
from agent.daemon.source import Source
from tests.daemon.agent_support import AgentFiles, call, make_agent_files
from tests.daemon.test_migrations import record
from tests.daemon.test_source_fakes import define_domain, drop_domain


@pytest.fixture
def files(tmp_path: Path) -> AgentFiles:
    from tests.bus.conftest import ensure_broker

    ensure_broker()
    return make_agent_files(tmp_path, host="hv-src")


@pytest_asyncio.fixture
async def daemon(files: AgentFiles) -> AsyncIterator[Daemon]:
    d = Daemon(files.config(), files.options(), roles=optional_roles())
    await d.start()
    task = asyncio.create_task(d.serve())
    try:
        yield d
    finally:
        d.request_stop("test over")
        await asyncio.wait_for(task, 15)


def test_the_process_builds_the_source_role() -> None:
    assert optional_roles() == [Source]


@pytest.mark.asyncio
async def test_source_methods_are_served_by_the_daemon(daemon: Daemon, files: AgentFiles) -> None:
    name, uuid = define_domain()
    cfg = files.config().bus
    try:
        with RpcClient(cfg, Keyring.from_file(files.key_file), sender="orchestrator@test") as client:
            described = await call(client, "hv-src", "describe_instance", {"instance": name})
            assert described["uuid"] == uuid and described["state"] == "running"
            with pytest.raises(RemoteNotFound):
                await call(client, "hv-src", "migration_status", {"migration_id": "nope"})
    finally:
        drop_domain(name)
    assert any(isinstance(role, Source) for role in daemon.roles)


@pytest.mark.asyncio
async def test_a_restarted_daemon_settles_what_its_record_left_open(files: AgentFiles) -> None:
    """A record left 'running' by a killed agent, whose instance is here with no job: the restarted
    agent marks it failed (the claim host is unreachable: the release is retried, then given up)."""
    name, uuid = define_domain()
    store = MigrationStore.open(files.state_dir)
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
    d = Daemon(files.config(), files.options(), roles=optional_roles())
    await d.start()
    task = asyncio.create_task(d.serve())
    try:
        source = next(r for r in d.roles if isinstance(r, Source))
        assert await asyncio.to_thread(source.recovered.wait, 10)
        got = source.store.get(mid)
        assert got is not None and got.status == "failed" and got.host_now == "hv-src"
    finally:
        d.request_stop("test over")
        await asyncio.wait_for(task, 15)
        drop_domain(name)
