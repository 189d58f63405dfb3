"""A simulated fleet on the machine's RabbitMQ (agent.testing.fleet), one exchange prefix
per test, and orchestrator sessions with the options a test asks for."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from agent.config import AgentConfig, OrchestratorConfig, UpgradeLevelsConfig, WorkaroundsConfig
from agent.orchestrator.session import Session
from agent.testing.fleet import SimInstance, SimWorld
from tests.bus.conftest import broker, bus_cfg, key_file, keyring  # noqa: F401  (fixtures)

PINNED = {"hw:cpu_policy": "dedicated", "hw:mem_page_size": "2048"}


def instance(name: str, vcpus: int = 4, memory_mb: int = 2048, **specs: str) -> SimInstance:
    extra = {**PINNED, **{k.replace("__", ":"): v for k, v in specs.items()}}
    return SimInstance(str(uuid.uuid4()), name, vcpus, memory_mb, extra)


def shared_instance(name: str, vcpus: int = 2, memory_mb: int = 1024) -> SimInstance:
    return SimInstance(str(uuid.uuid4()), name, vcpus, memory_mb, {})


@pytest.fixture
def world(bus_cfg, keyring, tmp_path: Path) -> Iterator[SimWorld]:  # noqa: F811
    w = SimWorld(bus_cfg, keyring, tmp_path, migration_s=0.2)
    yield w
    w.stop()


@pytest.fixture
def open_session(bus_cfg, key_file) -> Iterator[Callable[..., Session]]:  # noqa: F811
    sessions: list[Session] = []

    def make(cap: str = "auto", workaround: bool = False, retries: int = -1, **kw: Any) -> Session:
        cfg = AgentConfig(
            bus=bus_cfg,
            upgrade_levels=UpgradeLevelsConfig(agent=cap),
            workarounds=WorkaroundsConfig(enable_numa_live_migration=workaround),
            orchestrator=replace(OrchestratorConfig(), migrate_max_retries=retries, discovery_timeout_s=0.5, **kw),
        )
        session = Session.open(cfg, sender=f"orchestrator@test-{len(sessions)}")
        sessions.append(session)
        return session

    yield make
    for s in sessions:
        s.close()
