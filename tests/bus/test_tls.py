"""TLS to a private RabbitMQ node with a test CA (issue 8): calls work when the agent trusts the
broker's CA, and are refused, with a typed error naming the cause (certificate verify failed) in
bounded time, when it trusts another CA. The PKI is made by openssl for this module (tests/bus/rabbit_nodes.py)."""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.bus.errors import BusUnavailable
from agent.bus.rpc import RpcClient, RpcServer
from agent.config import BusConfig
from tests.bus.rabbit_nodes import Executions, RabbitNode, TlsFiles, bus_config, node_set, rabbit_available, serve

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

HOST = "hv-tls"
REFUSAL_S = 3.0  # how long a refused side may try before it must give up with a typed error


@pytest.fixture(scope="module")
def tls_node() -> Iterator[tuple[RabbitNode, TlsFiles]]:
    ok, why = rabbit_available()
    if not ok:
        pytest.fail(why)
    with node_set() as ns:
        node = ns.new_node(tls=True)
        node.start()
        yield node, ns.pki


def _tls_config(
    node: RabbitNode, key_file: Path, ca: Path, cert: Path | None = None, key: Path | None = None
) -> BusConfig:
    return bus_config(
        node.amqps_url, key_file, ssl=True, ssl_ca_file=ca, ssl_cert_file=cert, ssl_key_file=key, call_timeout_s=5.0
    )


@pytest.mark.parametrize("client_cert", [False, True], ids=["server-auth", "mutual"])
def test_calls_over_tls_with_the_right_ca(tls_node, key_file, keyring, client_cert):
    node, pki = tls_node
    certs = (pki.client_cert, pki.client_key) if client_cert else (None, None)
    cfg = _tls_config(node, key_file, pki.ca_cert, *certs)
    executions = Executions()
    server = serve(cfg, HOST, keyring, executions)
    try:
        with RpcClient(cfg, keyring, sender="orchestrator@tls") as client:
            assert client.call(HOST, "work", {"op": "over-tls"}) == {"op": "over-tls"}
            for thread in (server.consumer, server.publisher, client.consumer, client.publisher):
                sock = thread.conn.connection.sock
                assert isinstance(sock, ssl.SSLSocket) and sock.getpeername()[1] == node.amqps_port
        assert executions["over-tls"] == 1
    finally:
        server.stop()


def test_a_broker_certificate_from_another_ca_is_refused(tls_node, key_file, keyring, caplog):
    node, pki = tls_node
    cfg = _tls_config(node, key_file, pki.wrong_ca_cert)
    caplog.set_level(logging.WARNING, logger="agent.bus")
    server = RpcServer(cfg, HOST, keyring)
    t0 = time.monotonic()
    with pytest.raises(BusUnavailable, match=f"(?i){HOST}.*certificate verify failed"):
        server.start(wait=REFUSAL_S)
    server_refused = time.monotonic() - t0
    server.stop()
    client = RpcClient(cfg, keyring, sender="orchestrator@tls")
    t0 = time.monotonic()
    try:
        with pytest.raises(BusUnavailable, match="(?i)certificate verify failed"):
            client.call(HOST, "work", {"op": "never"}, timeout=REFUSAL_S)
        client_refused = time.monotonic() - t0
    finally:
        client.close()
    # no hang: each side gave up when told to; the error and the log say why
    assert server_refused < REFUSAL_S + 2 and client_refused < REFUSAL_S + 2
    assert "certificate verify failed" in caplog.text.lower()
    print(f"\ntls: wrong CA refused: server after {server_refused:.1f} s, client after {client_refused:.1f} s")
