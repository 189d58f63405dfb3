"""The test helper that deletes what tests declared on the shared broker (tests.broker_cleanup)."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest
from kombu import Connection

from agent.bus.keys import Keyring
from agent.bus.rpc import RpcClient, RpcServer
from agent.bus.transport import Names
from agent.config import BusConfig
from tests import broker_cleanup

pytestmark = pytest.mark.timeout(60)


def exists(cfg: BusConfig, kind: str, name: str) -> bool:
    """A passive declare: True when the broker has it (a channel error means it does not)."""
    with Connection(cfg.transport_url) as conn:
        channel = conn.channel()
        try:
            if kind == "queue":
                channel.queue_declare(name, passive=True)
            else:
                channel.exchange_declare(name, "topic", passive=True)
        except conn.channel_errors:
            return False
        return True


def test_prefixes_of_test_names_only():
    assert broker_cleanup.test_prefix("test-0123456789ab.agent.hv-01") == "test-0123456789ab"
    assert broker_cleanup.test_prefix("test-src-0123456789.rpc") == "test-src-0123456789"
    assert broker_cleanup.test_prefix("test-e2e-01234567.events") == "test-e2e-01234567"
    for foreign in ("compute-agent.rpc", "fleetbench-a8d6c481.rpc", "test-alt-256cf168.rpc", "test.rpc", "amq.topic"):
        assert broker_cleanup.test_prefix(foreign) is None


def test_what_a_server_and_client_declared_is_deleted(bus_cfg: BusConfig, keyring: Keyring):
    cfg = replace(bus_cfg, exchange_prefix=f"test-{uuid.uuid4().hex[:12]}")
    names = Names(cfg.exchange_prefix)
    server = RpcServer(cfg, "hv-01", keyring)
    server.start()
    RpcClient(cfg, keyring, sender="orch").close()
    server.stop()
    assert exists(cfg, "queue", names.host_queue("hv-01")) and exists(cfg, "exchange", names.rpc)
    broker_cleanup.delete_prefix(cfg.exchange_prefix)
    assert not exists(cfg, "queue", names.host_queue("hv-01"))
    assert not any(exists(cfg, "exchange", x) for x in (names.rpc, names.broadcast, names.events))


def test_names_outside_test_prefixes_are_never_deleted(bus_cfg: BusConfig):
    foreign = f"not-a-test-{uuid.uuid4().hex[:8]}.agent.x"
    with Connection(bus_cfg.transport_url) as conn:
        conn.channel().queue_declare(foreign, auto_delete=False)
        try:
            broker_cleanup.delete_names([], [foreign])
            assert exists(bus_cfg, "queue", foreign)
        finally:
            conn.channel().queue_delete(foreign)
