"""Fixtures for the bus tests: the machine's RabbitMQ (started when down), a key file, and a
BusConfig whose exchange_prefix is unique per test so tests never see each other's traffic; what a
test declares under its prefix is deleted after it (tests.broker_cleanup)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.bus.keys import Keyring
from agent.config import BusConfig
from tests import broker_cleanup

BROKER = ("127.0.0.1", 5672)
BROKER_START_S = 60.0  # a cold RabbitMQ boot takes 5-20 s on this machine
SECRET_A = bytes(range(32))
SECRET_B = bytes(range(100, 148))


def broker_listening() -> bool:
    try:
        with socket.create_connection(BROKER, timeout=1.0):
            return True
    except OSError:
        return False


def ensure_broker() -> None:
    """Start the machine's RabbitMQ when it is not listening (`rabbitmq-server -detached`) and wait;
    from now on this process's declarations on it are recorded, to be deleted (tests.broker_cleanup)."""
    broker_cleanup.track()
    if broker_listening():
        return
    if shutil.which("rabbitmq-server") is None:
        pytest.fail("RabbitMQ is not installed (scripts/setup installs it) and nothing listens on 5672")
    subprocess.run(["rabbitmq-server", "-detached"], check=False, capture_output=True, timeout=30)
    deadline = time.monotonic() + BROKER_START_S
    while time.monotonic() < deadline:
        if broker_listening():
            time.sleep(1.0)  # the port opens a moment before the AMQP listener accepts logins
            return
        time.sleep(0.5)
    pytest.fail(f"RabbitMQ did not come up on {BROKER[0]}:{BROKER[1]} within {BROKER_START_S} s")


@pytest.fixture(scope="session")
def broker() -> None:
    ensure_broker()


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "bus.keys"
    path.write_text(f"# test keys\nk1 {SECRET_A.hex()}\nk0 {SECRET_B.hex()}\n")
    return path


@pytest.fixture
def keyring(key_file: Path) -> Keyring:
    return Keyring.from_file(key_file)


@pytest.fixture
def bus_cfg(broker: None, key_file: Path) -> Iterator[BusConfig]:
    """The machine's broker with a prefix of its own; short timeouts so failing tests fail fast.
    After the test (and after the servers and clients of fixtures that use this one stopped), its
    exchanges and queues are deleted."""
    cfg = replace(
        BusConfig(),
        exchange_prefix=f"test-{uuid.uuid4().hex[:12]}",
        key_file=key_file,
        call_timeout_s=5.0,
        heartbeat_s=10,
    )
    yield cfg
    broker_cleanup.delete_prefix(cfg.exchange_prefix)
