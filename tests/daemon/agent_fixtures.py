"""Fixtures for the daemon's process and destination tests (helpers: tests.daemon.agent_support).

A test module loads them with `pytest_plugins = ["tests.daemon.agent_fixtures"]`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from agent.bus.keys import Keyring
from agent.bus.rpc import RpcClient
from agent.daemon.process import Daemon, optional_roles
from tests.bus.conftest import ensure_broker
from tests.daemon.agent_support import AgentFiles, EventLog, TestDomains, make_agent_files, serving


@pytest.fixture(scope="session")
def broker() -> None:
    ensure_broker()


@pytest.fixture
def agent_files(broker: None, tmp_path: Path) -> AgentFiles:
    return make_agent_files(tmp_path)


@pytest_asyncio.fixture
async def running_daemon(agent_files: AgentFiles) -> AsyncIterator[Daemon]:
    """The daemon with the destination role only, in the test's loop."""
    async with serving(agent_files) as daemon:
        yield daemon


@pytest.fixture
def source_files(broker: None, tmp_path: Path) -> AgentFiles:
    """The files of an agent named hv-src (the source side's tests)."""
    return make_agent_files(tmp_path, host="hv-src")


@pytest_asyncio.fixture
async def source_daemon(source_files: AgentFiles) -> AsyncIterator[Daemon]:
    """The daemon with every role (the source's too), in the test's loop."""
    async with serving(source_files, roles=optional_roles()) as daemon:
        yield daemon


@pytest.fixture
def client(agent_files: AgentFiles) -> Iterator[RpcClient]:
    cfg = agent_files.config().bus
    with RpcClient(cfg, Keyring.from_file(agent_files.key_file), sender="orchestrator@test") as c:
        yield c


@pytest.fixture
def event_log(agent_files: AgentFiles) -> Iterator[EventLog]:
    log = EventLog(agent_files, "capabilities.*", "claim.*")
    yield log
    log.close()


@pytest.fixture
def test_domains() -> Iterator[TestDomains]:
    domains = TestDomains()
    yield domains
    domains.remove_all()
