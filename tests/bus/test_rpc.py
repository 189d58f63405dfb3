"""RPC server and client against the machine's RabbitMQ (each test has its own exchange prefix)."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Callable, Iterator

import msgspec
import pytest
from kombu import Connection, Producer, Queue

from agent.bus import errors as e
from agent.bus.envelope import DropReason, seal
from agent.bus.keys import Keyring
from agent.bus.rpc import RpcClient, RpcServer, _Pending
from agent.bus.schemas import ClaimBody, Empty, LiveMigrateBody, LiveMigrateBodyV10, MigrationIdBody
from agent.bus.transport import Backoff, ConsumerThread, Names
from agent.config import BusConfig
from agent.errors import AgentError, InvalidInput

pytestmark = pytest.mark.timeout(120)

UUID = "8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a10"


class Echo(msgspec.Struct, frozen=True):
    text: str = ""


class EchoResult(msgspec.Struct, frozen=True):
    text: str
    host: str


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def publish_raw(
    cfg: BusConfig, body: bytes, *, routing_key: str, reply_to: str | None = None, exchange: str | None = None
) -> None:
    """What a stranger on the broker can send: any bytes to an agent's routing key."""
    with Connection(cfg.transport_url) as conn:
        Producer(conn.channel()).publish(
            body,
            exchange=exchange if exchange is not None else Names(cfg.exchange_prefix).rpc,
            routing_key=routing_key,
            content_type="application/json",
            reply_to=reply_to,
        )


@pytest.fixture
def make_server(bus_cfg, keyring) -> Iterator[Callable[..., RpcServer]]:
    servers: list[RpcServer] = []

    def make(host: str = "hv-01", **kw: Any) -> RpcServer:
        server = RpcServer(kw.pop("cfg", bus_cfg), host, kw.pop("keyring", keyring), **kw)
        server.register("echo", lambda body: EchoResult(body.text, host), since="1.0", body_type=Echo)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def client(bus_cfg, keyring) -> Iterator[RpcClient]:
    c = RpcClient(bus_cfg, keyring, sender="orchestrator@test")
    yield c
    c.close()


def test_call_and_reply(make_server, client):
    server = make_server()
    server.register("as_dict", lambda body: {"n": 1, "nested": {"ok": [True]}}, since="1.0", body_type=Empty)
    server.start()
    assert client.call("hv-01", "echo", Echo("hi")) == {"text": "hi", "host": "hv-01"}
    assert client.call("hv-01", "echo", {"text": "dict body"}, timeout=5) == {"text": "dict body", "host": "hv-01"}
    assert client.call("hv-01", "as_dict", {}) == {"n": 1, "nested": {"ok": [True]}}
    assert server.served["ok"] == 3
    assert not server.drops


def test_cast_runs_without_a_reply(make_server, client):
    seen = threading.Event()
    server = make_server()
    server.register("poke", lambda body: seen.set() or {}, since="1.0", body_type=MigrationIdBody)
    server.start()
    client.cast("hv-01", "poke", {"migration_id": "m-1"})
    assert seen.wait(10)
    assert wait_for(lambda: server.served["ok"] == 1)


def test_broadcast_call_gathers_every_live_agent(make_server, client):
    hosts = ["hv-01", "hv-02", "hv-03"]
    for host in hosts:
        server = make_server(host)
        if host == "hv-03":
            server.register("echo", _raise(e.RemoteBusy("inbound limit", retry_after=3)), since="1.1", body_type=Echo)
        server.start()
    replies = client.broadcast_call("echo", {"text": "all"}, timeout=1.5, version="1.1")
    assert set(replies) == set(hosts)
    assert replies["hv-01"] == {"text": "all", "host": "hv-01"}
    assert replies["hv-02"] == {"text": "all", "host": "hv-02"}
    assert isinstance(replies["hv-03"], e.RemoteBusy) and replies["hv-03"].retry_after == 3
    started = time.monotonic()
    early = client.broadcast_call("echo", {"text": "x"}, timeout=10, version="1.0", expect=["hv-01", "hv-02"])
    assert time.monotonic() - started < 5  # ended when the expected hosts had answered
    assert {"hv-01", "hv-02"} <= set(early)


def _raise(exc: BaseException) -> Callable[[Any], Any]:
    def handler(body: Any) -> Any:
        raise exc

    return handler


@pytest.mark.parametrize("cls", list(e.REMOTE_ERRORS.values()), ids=lambda c: c.wire_type)
def test_every_error_type_crosses_the_wire_typed(make_server, client, cls):
    server = make_server()
    server.register(
        "fail",
        _raise(cls("it went wrong", retry_after=2.5, details={"cells": {"0": "no room"}})),
        since="1.0",
        body_type=Empty,
    )
    server.start()
    with pytest.raises(cls) as exc:
        client.call("hv-01", "fail", {})
    assert type(exc.value) is cls
    assert (exc.value.type, exc.value.message, exc.value.retry_after) == (cls.wire_type, "it went wrong", 2.5)
    assert exc.value.details == {"cells": {"0": "no room"}}
    assert server.served[cls.wire_type] == 1


def test_unknown_error_types_and_mapped_agent_errors(make_server, client):
    class UnknownClaim(InvalidInput):
        code = "unknown_claim"

    class Exploded(AgentError):
        code = "exploded"

    server = make_server(error_map={InvalidInput: e.RemoteInvalidRequest, UnknownClaim: e.RemoteNotFound})
    server.register("odd", _raise(e.RemoteError("new in 1.7", type="QuotaExceeded")), since="1.0", body_type=Empty)
    server.register("bad_input", _raise(InvalidInput("vcpus must be positive")), since="1.0", body_type=Empty)
    server.register("no_claim", _raise(UnknownClaim("no claim m-9")), since="1.0", body_type=Empty)
    server.register("agent_bug", _raise(Exploded("secret internals")), since="1.0", body_type=Empty)
    server.register("bug", _raise(ZeroDivisionError("secret traceback text")), since="1.0", body_type=Empty)
    server.register("bad_result", lambda body: [1, 2], since="1.0", body_type=Empty)
    server.register("nan_result", lambda body: {"x": float("nan")}, since="1.0", body_type=Empty)
    server.start()
    with pytest.raises(e.RemoteError) as exc:
        client.call("hv-01", "odd", {})
    assert type(exc.value) is e.RemoteError and exc.value.type == "QuotaExceeded"
    with pytest.raises(e.RemoteInvalidRequest, match="vcpus must be positive"):
        client.call("hv-01", "bad_input", {})
    with pytest.raises(e.RemoteNotFound, match="no claim m-9") as nf:
        client.call("hv-01", "no_claim", {})
    assert nf.value.details == {"code": "unknown_claim"}
    for method in ("agent_bug", "bug", "bad_result", "nan_result"):
        with pytest.raises(e.RemoteInternal) as internal:
            client.call("hv-01", method, {})
        assert "secret" not in str(internal.value) and "Traceback" not in str(internal.value)
        assert "see the agent's log" in internal.value.message


def test_refusals_before_any_handler(make_server, client):
    ran: list[Any] = []
    server = make_server()
    server.register("claim", lambda body: ran.append(body) or {}, since="1.1", body_type=ClaimBody)
    server.start()
    with pytest.raises(e.RemoteNoSuchMethod):
        client.call("hv-01", "no_such_method", {})
    with pytest.raises(e.RemoteInvalidRequest) as bad:
        client.call("hv-01", "claim", {"migration_id": "m-1", "instance": {}, "source_host": 7})
    assert bad.value.details == {"field": "body.source_host"}
    with pytest.raises(e.RemoteUnsupportedVersion) as old:
        client.call("hv-01", "claim", {}, version="1.0")  # claim came with 1.1
    assert old.value.details == {"min": "1.0", "max": "1.1", "method": "claim", "since": "1.1"}
    assert ran == []


def test_version_negotiation(make_server, bus_cfg, keyring):
    make_server("old", max_version="1.0").start()
    make_server("new").start()
    with RpcClient(bus_cfg, keyring, sender="orch", version_cap="1.2") as future_client:
        assert future_client.can_send("1.2") and not future_client.can_send("2.0")
        with pytest.raises(e.RemoteUnsupportedVersion) as exc:
            future_client.call("old", "echo", {}, version="1.1")
        assert exc.value.details == {"min": "1.0", "max": "1.0"}
        with pytest.raises(e.RemoteUnsupportedVersion) as exc:
            future_client.call("new", "echo", {}, version="1.2")
        assert exc.value.details == {"min": "1.0", "max": "1.1"}
        assert future_client.call("new", "echo", {}, version="1.1")["host"] == "new"
        assert future_client.call("old", "echo", {}, version="1.0")["host"] == "old"
    with RpcClient(bus_cfg, keyring, sender="orch", version_cap="1.0") as capped:
        assert capped.can_send("1.0") and not capped.can_send("1.1")
        with pytest.raises(e.VersionCapError):
            capped.call("new", "echo", {}, version="1.1")
        with pytest.raises(e.VersionCapError):
            capped.call("new", "claim", {})  # claim defaults to its own version, 1.1
    with RpcClient(bus_cfg, keyring, sender="orch", version_cap="2.0") as other_major:
        with pytest.raises(e.RemoteUnsupportedVersion):
            other_major.call("new", "echo", {}, version="2.0")


def test_hostile_calls_are_never_executed_and_are_counted(make_server, client, bus_cfg, keyring):
    ran: list[str] = []
    now = time.time()
    server = make_server()
    server.register("touch", lambda body: ran.append(body.migration_id) or {}, since="1.0", body_type=MigrationIdBody)
    server.start()
    reply_to = client.consumer.queue_names[0] if client.consumer.ready.wait(10) else None
    key = Names.host_key("hv-01")

    def call_bytes(mid: str, ring: Keyring = keyring, **kw: Any) -> bytes:
        args = {"now": now, "ttl_s": 30.0, **kw}
        return seal(ring, kind="call", method="touch", body={"migration_id": mid}, version="1.0", sender="x", **args)[1]

    stranger = Keyring.single(keyring.signing_kid, bytes(32))  # right kid, wrong secret
    unknown = Keyring.single("k-unknown", bytes(range(32)))
    good = call_bytes("replayed")
    cases = {
        DropReason.BAD_SIGNATURE: call_bytes("forged", stranger),
        DropReason.UNKNOWN_KID: call_bytes("unknown-kid", unknown),
        DropReason.STALE: call_bytes("stale", now=now - 120),
        DropReason.FUTURE: call_bytes("future", now=now + 120),
        DropReason.UNSIGNED: msgspec.json.encode({"v": "1.0", "kind": "call", "method": "touch", "body": {}}),
        DropReason.NOT_JSON: b"\x00garbage",
        DropReason.TOO_LARGE: b" " * (bus_cfg.max_message_bytes + 1),
    }
    publish_raw(bus_cfg, good, routing_key=key, reply_to=reply_to)
    for data in cases.values():
        publish_raw(bus_cfg, data, routing_key=key, reply_to=reply_to)
    publish_raw(bus_cfg, good, routing_key=key, reply_to=reply_to)  # a replay of an executed call
    assert wait_for(lambda: sum(server.drops.values()) == len(cases) + 1)
    assert ran == ["replayed"]
    assert server.drops == {**dict.fromkeys(cases, 1), DropReason.REPLAYED: 1}
    assert client.call("hv-01", "echo", {"text": "still serving"})["text"] == "still serving"


def test_a_call_expired_on_the_server_clock_is_never_run(make_server, client):
    ran: list[Any] = []
    late = time.time() + 3600  # the server's clock says the call expired long ago
    server = make_server(clock=lambda: late)
    server.register("touch", lambda body: ran.append(body) or {}, since="1.0", body_type=MigrationIdBody)
    server.start()
    with pytest.raises(e.CallTimeout):
        client.call("hv-01", "touch", {"migration_id": "m-1"}, timeout=1.0)
    assert ran == [] and server.drops == {DropReason.STALE: 1}


def test_slow_handler_blocks_neither_calls_nor_heartbeats(make_server, bus_cfg, keyring):
    cfg = replace(bus_cfg, heartbeat_s=1)  # the broker closes a connection after ~2 missed heartbeats
    release = threading.Event()
    server = make_server(cfg=cfg)
    server.register("slow", lambda body: release.wait(30) and {}, since="1.0", body_type=Empty)
    server.start()
    with RpcClient(cfg, keyring, sender="orch") as c, ThreadPoolExecutor(2) as pool:
        slow = pool.submit(c.call, "hv-01", "slow", {}, timeout=30)
        time.sleep(0.3)
        started = time.monotonic()
        for i in range(20):
            assert c.call("hv-01", "echo", {"text": str(i)})["text"] == str(i)
        assert time.monotonic() - started < 5.0
        time.sleep(4.0)  # > 2 heartbeat intervals with a handler still running
        release.set()
        assert slow.result(10) == {}
    assert server.consumer.reconnects == 0 and server.publisher.reconnects == 0


def test_idle_connections_survive_heartbeats(make_server, bus_cfg, keyring):
    cfg = replace(bus_cfg, heartbeat_s=1)
    server = make_server(cfg=cfg)
    server.start()
    with RpcClient(cfg, keyring, sender="orch") as c:
        assert c.call("hv-01", "echo", {"text": "a"})["text"] == "a"
        time.sleep(4.0)  # nothing to publish: the publishers must still read the broker's heartbeats
        assert c.call("hv-01", "echo", {"text": "b"})["text"] == "b"
        assert c.publisher.reconnects == 0 and c.consumer.reconnects == 0
    assert server.consumer.reconnects == 0 and server.publisher.reconnects == 0


def test_many_threads_share_one_client(make_server, client):
    make_server().start()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: client.call("hv-01", "echo", {"text": f"t{i}"}), range(200)))
    assert [r["text"] for r in results] == [f"t{i}" for i in range(200)]
    assert len(client.consumer.queue_names) == 1  # one reply queue for the whole client


def test_full_worker_pool_answers_busy(make_server, client):
    release = threading.Event()
    server = make_server(max_workers=1)
    server.register("slow", lambda body: release.wait(30) and {}, since="1.0", body_type=Empty)
    server.start()
    outcomes: list[Any] = []

    def call() -> None:
        try:
            outcomes.append(client.call("hv-01", "slow", {}, timeout=20))
        except e.RemoteBusy as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    assert wait_for(lambda: len(outcomes) >= 3)  # 1 running + 4 queued, the rest are refused at once
    release.set()
    for t in threads:
        t.join(30)
    busy = [o for o in outcomes if isinstance(o, e.RemoteBusy)]
    assert len(busy) == 3 and all(b.retry_after == 1.0 for b in busy)
    assert outcomes.count({}) == 5


def test_bodies_that_are_not_json_are_refused_typed(client):
    with pytest.raises(InvalidInput, match="not JSON data"):
        client.call("hv-01", "echo", {"x": float("inf")}, timeout=1)
    with pytest.raises(InvalidInput, match="not JSON data"):
        client.cast("hv-01", "echo", {"x": {1, 2}})


def test_timeouts_must_fit_a_message_lifetime(client):
    for bad in (0, -1, 2 * 86400):
        with pytest.raises(InvalidInput, match="timeout"):
            client.call("hv-01", "echo", {}, timeout=bad)
    with pytest.raises(InvalidInput, match="timeout"):
        client.broadcast_call("echo", {}, timeout=0)


def test_calls_to_nobody_time_out(client):
    started = time.monotonic()
    with pytest.raises(e.CallTimeout, match="no reply from ghost"):
        client.call("ghost", "echo", {}, timeout=0.5)
    assert time.monotonic() - started < 3.0


def test_two_servers_and_two_clients_in_one_process(make_server, bus_cfg, keyring):
    make_server("a").start()
    make_server("b").start()
    with RpcClient(bus_cfg, keyring, sender="c1") as c1, RpcClient(bus_cfg, keyring, sender="c2") as c2:
        assert c1.call("a", "echo", {"text": "1"}) == {"text": "1", "host": "a"}
        assert c2.call("b", "echo", {"text": "2"}) == {"text": "2", "host": "b"}
        assert c1.consumer.queue_names != c2.consumer.queue_names


def test_client_on_other_keys_gets_no_service(make_server, bus_cfg):
    server = make_server()
    server.start()
    with RpcClient(bus_cfg, Keyring.single("intruder", bytes(range(40))), sender="intruder") as c:
        with pytest.raises(e.CallTimeout):
            c.call("hv-01", "echo", {}, timeout=0.5)
    assert server.drops == {DropReason.UNKNOWN_KID: 1}


def test_a_failing_callback_does_not_kill_the_consumer(bus_cfg):
    seen: list[bytes] = []

    def declare(channel: Any) -> list[Queue]:
        q = Queue(Names(bus_cfg.exchange_prefix).private_queue("cb"), exclusive=True, auto_delete=True)(channel)
        q.declare()
        return [q]

    def on_message(body: bytes, props: Any, key: str) -> None:
        seen.append(body)
        if body == b"boom":
            raise RuntimeError("callback bug")

    consumer = ConsumerThread(bus_cfg, "cb-test", declare, on_message)
    consumer.start()
    try:
        assert consumer.ready.wait(10)
        for body in (b"boom", b"after"):
            publish_raw(bus_cfg, body, routing_key=consumer.queue_names[0], exchange="")
        assert wait_for(lambda: seen == [b"boom", b"after"])
        assert consumer.is_alive() and consumer.reconnects == 0
    finally:
        consumer.stop()


def test_a_broken_session_is_not_ready_while_the_thread_backs_off(client):
    """`ready` falls as soon as the session breaks, not after the backoff: a caller that waited on
    it would otherwise send its call with the dead session's reply queue (seen in a failover) and
    wait out its whole timeout for a reply the broker cannot route."""
    consumer = client.consumer
    assert consumer.ready.wait(10)
    old_queue = consumer.queue_names[0]
    consumer.backoff = Backoff(start=3.0, cap=3.0)  # a long, sure backoff to look into
    consumer.conn.connection.sock.shutdown(socket.SHUT_RDWR)  # the session breaks (as on a reset)
    assert wait_for(lambda: consumer.reconnects == 1, 5)
    assert not consumer.ready.is_set()
    with pytest.raises(e.BusUnavailable):  # no call goes out with the dead reply queue
        client.call("hv-01", "echo", {}, timeout=0.5)
    assert consumer.ready.wait(10) and consumer.queue_names[0] != old_queue


def test_calls_whose_reply_queue_died_fail_at_once_with_reply_lost(make_server, client):
    """A reply queue is exclusive: it dies with its connection. A call waiting on it when the
    client reconnects can get no reply, so it fails at once (ReplyLost, a CallTimeout: it may have
    run), not at its timeout; a broadcast returns what it gathered; later calls work."""
    release = threading.Event()
    server = make_server()
    server.register("slow", lambda body: release.wait(30) and {}, since="1.0", body_type=Empty)
    server.start()
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(client.call, "hv-01", "slow", {}, timeout=30)
        gather = pool.submit(client.broadcast_call, "slow", {}, timeout=30)
        assert wait_for(lambda: len(client._pending) == 2)
        broke = time.monotonic()
        client.consumer.conn.connection.sock.shutdown(socket.SHUT_RDWR)  # the reply connection breaks
        with pytest.raises(e.ReplyLost, match="may have run"):
            slow.result(15)
        assert gather.result(15) == {}
        assert time.monotonic() - broke < 10  # the backoff and a reconnection, not the 30 s timeout
        release.set()
    assert isinstance(e.ReplyLost("x"), e.CallTimeout)  # callers that treat "maybe ran" alike
    assert client.call("hv-01", "echo", {"text": "after"})["text"] == "after"


def test_a_call_whose_reply_came_before_the_reconnection_keeps_it(client):
    """The reply consumer adds replies and renews the queue on one thread: a call that got its
    reply on the old queue, its caller not yet awake, is not turned into a ReplyLost."""
    answered, waiting = _Pending("hv-01"), _Pending("hv-01")
    for p, msg_id in ((answered, "a"), (waiting, "b")):
        p.msg_id, p.reply_to = msg_id, "old-reply-queue"
        client._pending[msg_id] = p
    answered.replies.append(object())  # its reply came (any envelope)
    client._reply_queue_renewed([Queue("new-reply-queue")])
    assert answered.failure is None and isinstance(waiting.failure, e.ReplyLost)
    client._pending.clear()


def test_nacked_casts_fail_typed_and_the_publisher_goes_on(make_server, client, bus_cfg):
    make_server().start()
    names = Names(bus_cfg.exchange_prefix)
    with Connection(bus_cfg.transport_url) as conn:  # a queue that refuses everything: the broker nacks
        full = Queue(
            names.host_queue("full"),
            names.exchanges()[0],
            routing_key=Names.host_key("full"),
            auto_delete=True,
            queue_arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
        )
        full(conn.channel()).declare()
        with pytest.raises(e.PublishNotConfirmed, match="nacked"):
            client.cast("full", "echo", {"text": "x"})
    assert client.call("hv-01", "echo", {"text": "after"})["text"] == "after"  # on a fresh channel
    assert client.publisher.reconnects == 0


@pytest.mark.parametrize("host", ["#", "hv.*", "", "a..b", "hv-01.", "h" * 129, "hv 01", "hv/01"])
def test_server_host_names_cannot_bind_other_hosts(bus_cfg, keyring, host):
    with pytest.raises(InvalidInput, match="host name"):
        RpcServer(bus_cfg, host, keyring)


def test_a_method_answers_with_the_definition_of_the_version_asked(make_server, client):
    server = make_server()
    server.register(
        "live_migrate", lambda body: {"via": "1.0", "has_placement": False}, since="1.0", body_type=LiveMigrateBodyV10
    )
    server.register(
        "live_migrate",
        lambda body: {"via": "1.1", "has_placement": body.placement is not None},
        since="1.1",
        body_type=LiveMigrateBody,
    )
    server.start()
    body = {
        "migration_id": "m-1",
        "instance": UUID,
        "destination": {"host": "hv-02", "libvirt_uri": "qemu+tcp://hv-02/system", "migration_uri": "tcp://hv-02"},
    }
    assert client.call("hv-01", "live_migrate", body, version="1.0") == {"via": "1.0", "has_placement": False}
    assert client.call("hv-01", "live_migrate", body, version="1.1") == {"via": "1.1", "has_placement": False}
    with pytest.raises(e.RemoteInvalidRequest, match="body.placement"):
        client.call("hv-01", "live_migrate", {**body, "placement": {"fits": "yes"}}, version="1.1")


PLACEMENT = {"cells": []}  # refused before it is sent: its content does not matter


def test_calls_default_to_the_newest_version_within_the_cap(make_server, bus_cfg, keyring):
    """live_migrate without a version: 1.1 (the NUMA-aware body) under a 1.1 cap, 1.0 under a 1.0
    cap; a 1.1-only field at 1.0 is refused on the caller's side, never silently dropped."""
    server = make_server()
    seen: list[tuple[str, Any]] = []
    server.register(
        "live_migrate", lambda body: seen.append(("1.0", body)) or {}, since="1.0", body_type=LiveMigrateBodyV10
    )
    server.register(
        "live_migrate", lambda body: seen.append(("1.1", body)) or {}, since="1.1", body_type=LiveMigrateBody
    )
    server.start()
    body = {
        "migration_id": "m-1",
        "instance": UUID,
        "destination": {"host": "hv-02", "libvirt_uri": "qemu+tcp://hv-02/system", "migration_uri": "tcp://hv-02"},
    }
    with RpcClient(bus_cfg, keyring, sender="orch") as current:
        current.call("hv-01", "live_migrate", {**body, "claim_host": "hv-02"})
        assert seen[-1][0] == "1.1" and seen[-1][1].claim_host == "hv-02"
        with pytest.raises(e.VersionTooLow, match=r"claim_host \(from 1.1\)"):
            current.call("hv-01", "live_migrate", {**body, "claim_host": "hv-02"}, version="1.0")
        typed = msgspec.convert(body, LiveMigrateBody)  # placement and claim_host None
        current.call("hv-01", "live_migrate", typed, version="1.0")  # its None 1.1 fields lose nothing
        assert seen[-1][0] == "1.0"
    with RpcClient(bus_cfg, keyring, sender="orch", version_cap="1.0") as old:
        old.call("hv-01", "live_migrate", body)
        assert seen[-1][0] == "1.0"
        with pytest.raises(e.VersionTooLow, match=r"placement \(from 1.1\)"):
            old.call("hv-01", "live_migrate", {**body, "placement": PLACEMENT})
        with pytest.raises(e.VersionTooLow, match="placement"):
            old.cast("hv-01", "live_migrate", {**body, "placement": PLACEMENT})
        with pytest.raises(e.VersionCapError, match="claim needs 1.1"):
            old.call("hv-01", "claim", {})
    assert len(seen) == 3
