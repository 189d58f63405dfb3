"""Hostile traffic against a live RpcServer on the machine's broker (issue 8, "Proof against the real
parts"): more than 10,000 generated raw AMQP messages published straight to the agent's queue with
kombu, mixed with valid signed calls and casts.

Every hostile message carries an operation id of its own in its body (where it has a body), and the
handler counts executions by operation id, so the proof is exact: no hostile operation ran, every
valid one ran once and was answered, the server thread never died, and `server.drops` /
`server.served` equal, reason by reason, what was sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec
import pytest
from kombu import Connection, Exchange, Producer, Queue

from agent.bus.envelope import DropReason, Opener, seal
from agent.bus.keys import Keyring
from agent.bus.rpc import RpcClient, RpcServer
from agent.bus.transport import Names
from agent.config import BusConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

HOST = "hv-hostile"
MAX_BYTES = 64 * 1024  # small enough that "too large" messages stay cheap to send
SKEW_S = 30.0
ATTACKER_SECRET = bytes(range(200, 232))
SEED = 20261201


class Op(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    op: str
    pad: str = ""


@dataclass
class Mix:
    """What was sent and what each message must lead to."""

    messages: list[tuple[bytes, dict[str, Any]]] = field(default_factory=list)
    drops: Counter[DropReason] = field(default_factory=Counter)
    served: Counter[str] = field(default_factory=Counter)  # "ok" or the error type answered
    valid_calls: dict[str, str] = field(default_factory=dict)  # call id -> operation id: answered, run once
    valid_casts: set[str] = field(default_factory=set)  # operation ids that must run once
    hostile_ops: set[str] = field(default_factory=set)  # operation ids that must never run
    error_replies: dict[str, str] = field(default_factory=dict)  # call id -> the error type it must get


class Generator:
    """Makes the traffic: valid calls signed with the agent's keys, and every kind of hostile message."""

    def __init__(self, keyring: Keyring, reply_to: str, rng: random.Random) -> None:
        self.keyring = keyring
        self.attacker = Keyring.single("k1", ATTACKER_SECRET)  # a known kid, a wrong secret
        self.stranger = Keyring.single("evil", ATTACKER_SECRET)  # a kid nobody knows
        self.reply_to = reply_to
        self.rng = rng
        self.mix = Mix()
        self.sent_valid: list[tuple[bytes, dict[str, Any]]] = []
        self._n = 0

    def _op(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}-{self._n}"

    def _props(self, msg_id: str | None = None, ttl_s: float = 60.0) -> dict[str, Any]:
        props: dict[str, Any] = {"reply_to": self.reply_to, "content_type": "application/json"}
        if msg_id is not None:
            props.update(correlation_id=msg_id, expiration=ttl_s)  # kombu takes seconds
        return props

    def _sealed(
        self, keyring: Keyring, body: dict[str, Any], *, kind: str = "call", method: str = "work", **kw: Any
    ) -> tuple[str, bytes]:
        return seal(
            keyring,
            kind=kind,  # type: ignore[arg-type]  # hostile kinds are the point
            method=method,
            body=body,
            version=kw.pop("version", "1.0"),
            sender=kw.pop("sender", "orchestrator@hostile-test"),
            now=kw.pop("now", time.time()),
            ttl_s=kw.pop("ttl_s", 60.0),
            **kw,
        )

    def _hostile(self, data: bytes, reason: DropReason, op: str | None = None, **props: Any) -> None:
        self.mix.messages.append((data, {"content_type": "application/json", **props}))
        self.mix.drops[reason] += 1
        if op is not None:
            self.mix.hostile_ops.add(op)

    def _envelope_doc(self, op: str, **over: Any) -> dict[str, Any]:
        now = time.time()
        doc: dict[str, Any] = {
            "v": "1.0",
            "kind": "call",
            "method": "work",
            "id": str(uuid.uuid4()),
            "ts": now,
            "expires": now + 60,
            "sender": "orchestrator@hostile-test",
            "kid": "k1",
            "body": {"op": op},
        }
        doc.update(over)
        return doc

    # --- valid traffic -----------------------------------------------------------------------------
    def valid_call(self, pad: int = 0) -> None:
        op = self._op("valid")
        msg_id, data = self._sealed(self.keyring, {"op": op, "pad": "p" * pad})
        self.mix.messages.append((data, self._props(msg_id)))
        self.sent_valid.append((data, self._props(msg_id)))
        self.mix.valid_calls[msg_id] = op
        self.mix.served["ok"] += 1

    def valid_cast(self) -> None:
        op = self._op("cast")
        _, data = self._sealed(self.keyring, {"op": op}, kind="cast")
        self.mix.messages.append((data, {"content_type": "application/json"}))
        self.mix.valid_casts.add(op)
        self.mix.served["ok"] += 1

    # --- refused before parsing ---------------------------------------------------------------------
    def garbage(self) -> None:
        data = b"\xff" + self.rng.randbytes(self.rng.randrange(0, 2000))
        props = self.rng.choice([{}, {"content_encoding": "gzip"}, {"content_type": "application/x-evil"}])
        self._hostile(data, DropReason.NOT_JSON, **props)

    def truncated(self) -> None:
        _, data = self._sealed(self.keyring, {"op": self._op("trunc")})
        self._hostile(data[: self.rng.randrange(1, len(data) - 1)], DropReason.NOT_JSON)

    def non_object(self) -> None:
        doc = self.rng.choice([0, -1.5, "call", None, True, [], [1, 2, {"kind": "call"}], "x" * 500])
        self._hostile(json.dumps(doc).encode(), DropReason.BAD_ENVELOPE)

    def too_large(self) -> None:
        op = self._op("huge")
        _, data = self._sealed(self.keyring, {"op": op, "pad": "z" * (MAX_BYTES + self.rng.randrange(1, 65536))})
        self._hostile(data, DropReason.TOO_LARGE, op)

    def too_deep(self) -> None:
        depth = self.rng.choice([MAX_DEPTH_PLUS, 100, 5000, 20_000])  # 20,000: 40 KB, under MAX_BYTES
        if self.rng.random() < 0.5:  # deep nesting outside the envelope's fields
            data = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
            self._hostile(data, DropReason.TOO_DEEP)
            return
        op = self._op("deep")  # a well-signed call whose body nests too deep
        nested: Any = []
        for _ in range(min(depth, 60)):
            nested = [nested]
        _, data = self._sealed(self.keyring, {"op": op, "deep": nested})
        self._hostile(data, DropReason.TOO_DEEP, op)

    # --- wrong shapes and signatures ----------------------------------------------------------------
    def wrong_types(self) -> None:
        op = self._op("types")
        field_, value = self.rng.choice(
            [
                ("v", 1.1),
                ("v", "one"),
                ("kind", "bogus"),
                ("kind", 3),
                ("ts", "yesterday"),
                ("expires", None),
                ("ts", -5),
                ("id", 12345),
                ("id", ""),
                ("method", ""),
                ("body", [1, 2]),
                ("body", "text"),
                ("sig", "not-hex"),
                ("kid", "bad kid!"),
                ("sender", {"name": "x"}),
            ]
        )
        doc = self._envelope_doc(op, **{field_: value})
        doc["sig"] = doc.get("sig", "0" * 64)
        self._hostile(json.dumps(doc).encode(), DropReason.BAD_ENVELOPE, op)

    def unsigned(self) -> None:
        op = self._op("unsigned")
        doc = self._envelope_doc(op)
        if self.rng.random() < 0.3:
            doc.pop("kid")
            doc["sig"] = "0" * 64
        elif self.rng.random() < 0.5:
            doc["sig"] = None
        self._hostile(json.dumps(doc).encode(), DropReason.UNSIGNED, op)

    def forged(self) -> None:
        op = self._op("forged")
        if self.rng.random() < 0.5:  # signed with a wrong secret under a real kid
            _, data = self._sealed(self.attacker, {"op": op})
        else:  # a real signature, then the body changed
            _, good = self._sealed(self.keyring, {"op": self._op("orig")})
            doc = json.loads(good)
            doc["body"] = {"op": op}
            data = json.dumps(doc).encode()
        self._hostile(data, DropReason.BAD_SIGNATURE, op)

    def unknown_kid(self) -> None:
        op = self._op("kid")
        _, data = self._sealed(self.stranger, {"op": op})
        self._hostile(data, DropReason.UNKNOWN_KID, op)

    def canonical_forgery(self) -> None:
        """A signature over the canonical form of another document (a different key order on the
        wire must not let a signature be moved between messages)."""
        op = self._op("canon")
        doc = self._envelope_doc(op)
        other = dict(doc, body={"op": self._op("other")})
        signed = json.dumps(other, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        doc["sig"] = hmac.new(self.keyring.secrets["k1"], signed, hashlib.sha256).hexdigest()
        self._hostile(json.dumps(doc).encode(), DropReason.BAD_SIGNATURE, op)

    # --- well signed, but refused by time, kind or replay --------------------------------------------
    def stale(self) -> None:
        op = self._op("stale")
        past = time.time() - SKEW_S - self.rng.uniform(60, 86_000)
        _, data = self._sealed(self.keyring, {"op": op}, now=past, ttl_s=30.0)
        self._hostile(data, DropReason.STALE, op)

    def future(self) -> None:
        op = self._op("future")
        ahead = time.time() + SKEW_S + self.rng.uniform(30, 86_000)
        _, data = self._sealed(self.keyring, {"op": op}, now=ahead, ttl_s=30.0)
        self._hostile(data, DropReason.FUTURE, op)

    def bad_lifetime(self) -> None:
        op = self._op("lifetime")
        ttl = self.rng.choice([-5.0, -0.001, 24 * 3600.0 + 1, 1e7])
        _, data = self._sealed(self.keyring, {"op": op}, ttl_s=ttl)
        self._hostile(data, DropReason.BAD_LIFETIME, op)

    def wrong_kind(self) -> None:
        op = self._op("kind")
        kind = self.rng.choice(["reply", "event"])
        _, data = self._sealed(self.keyring, {"op": op}, kind=kind, reply_to_id=str(uuid.uuid4()))
        self._hostile(data, DropReason.WRONG_KIND, op)

    def replayed(self) -> None:
        """A valid call's exact bytes again, or the same id re-signed over another operation."""
        data, props = self.rng.choice(self.sent_valid)
        if self.rng.random() < 0.5:
            self._hostile(data, DropReason.REPLAYED, **props)
            return
        op = self._op("replay")
        _, again = self._sealed(self.keyring, {"op": op}, msg_id=json.loads(data)["id"])
        self._hostile(again, DropReason.REPLAYED, op, **props)

    # --- well signed calls that cannot be served: an error reply each -------------------------------
    def _error_call(self, wire_type: str, body: dict[str, Any], op: str, **kw: Any) -> None:
        msg_id, data = self._sealed(self.keyring, body, **kw)
        self.mix.messages.append((data, self._props(msg_id)))
        self.mix.served[wire_type] += 1
        self.mix.error_replies[msg_id] = wire_type
        self.mix.hostile_ops.add(op)

    def wrong_version(self) -> None:
        op = self._op("version")
        version = self.rng.choice(["2.0", "0.9", "1.9", "999.999"])
        self._error_call("UnsupportedVersion", {"op": op}, op, version=version)

    def unknown_method(self) -> None:
        op = self._op("method")
        method = self.rng.choice(["__init__", "shutdown", "work ", "w" * 255, "claim", "ωork"])
        self._error_call("NoSuchMethod", {"op": op}, op, method=method)

    def bad_body(self) -> None:
        op = self._op("body")
        body: dict[str, Any] = self.rng.choice(
            [{}, {"op": 5}, {"op": None}, {"op": op, "pad": ["x"]}, {"op": op, "extra": 1}, {"op": [op]}]
        )
        self._error_call("InvalidRequest", body, op)


MAX_DEPTH_PLUS = 40  # just past envelope.MAX_DEPTH (32)

#: hostile messages of each kind (10,900 in all) and valid traffic mixed in
PLAN = {
    "garbage": 1200,
    "truncated": 500,
    "non_object": 500,
    "too_large": 150,
    "too_deep": 300,
    "wrong_types": 1000,
    "unsigned": 900,
    "forged": 1000,
    "canonical_forgery": 250,
    "unknown_kid": 600,
    "stale": 700,
    "future": 700,
    "bad_lifetime": 300,
    "wrong_kind": 300,
    "wrong_version": 500,
    "unknown_method": 500,
    "bad_body": 500,
}
REPLAYS = 1000
VALID_CALLS = 2000
VALID_CASTS = 200


def build_mix(keyring: Keyring, reply_to: str) -> Mix:
    gen = Generator(keyring, reply_to, random.Random(SEED))
    first: list[str] = [k for k, n in PLAN.items() for _ in range(n)]
    first += ["valid_call"] * (VALID_CALLS // 2) + ["valid_cast"] * VALID_CASTS
    gen.rng.shuffle(first)
    for kind in first:
        getattr(gen, kind)()
    # replays come after the originals they copy, mixed with the second half of the valid calls
    second = ["replayed"] * REPLAYS + ["valid_call"] * (VALID_CALLS - VALID_CALLS // 2)
    gen.rng.shuffle(second)
    for i, kind in enumerate(second):
        gen.valid_call(pad=40_000) if kind == "valid_call" and i % 97 == 0 else getattr(gen, kind)()
    return gen.mix


class ReplyCollector:
    """Our own reply queue, read with kombu; every reply is opened (signature, time, replay) like
    the client's, and kept by the id of the call it answers."""

    def __init__(self, cfg: BusConfig, keyring: Keyring) -> None:
        self.opener = Opener(
            keyring,
            max_bytes=cfg.max_message_bytes,
            max_clock_skew_s=SKEW_S,
            kinds=frozenset({"reply"}),
            clock=time.time,
        )
        self.replies: dict[str, dict[str, Any]] = {}
        self.duplicates = 0
        self.queue_name = f"{cfg.exchange_prefix}.hostile-replies.{uuid.uuid4().hex[:8]}"
        self._conn = Connection(cfg.transport_url)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hostile-replies", daemon=True)

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10), "the reply queue was not declared"

    def _run(self) -> None:
        with self._conn.channel() as channel:
            queue = Queue(self.queue_name, exclusive=True, auto_delete=True)(channel)
            queue.declare()
            channel.basic_consume(queue=self.queue_name, callback=self._on_message, no_ack=True)
            self._ready.set()
            while not self._stop.is_set():
                try:
                    self._conn.drain_events(timeout=0.2)
                except TimeoutError:
                    pass

    def _on_message(self, message: Any) -> None:
        env = self.opener.open(message.body)  # a reply that fails to open is a test failure
        if env.reply_to_id in self.replies:
            self.duplicates += 1
        self.replies[env.reply_to_id or ""] = env.body

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._conn.release()


@pytest.fixture
def hostile_cfg(bus_cfg: BusConfig) -> Iterator[BusConfig]:
    cfg = replace(bus_cfg, max_message_bytes=MAX_BYTES, max_clock_skew_s=SKEW_S, call_timeout_s=30.0)
    yield cfg
    _delete_broker_objects(cfg)


def _delete_broker_objects(cfg: BusConfig) -> None:
    """The per-host queue and the exchanges are durable: remove them from the shared broker."""
    names = Names(cfg.exchange_prefix)
    with Connection(cfg.transport_url) as conn:
        channel = conn.channel()
        channel.queue_delete(names.host_queue(HOST))
        for exchange in names.exchanges():
            Exchange(exchange.name)(channel).delete()


def _publish_all(cfg: BusConfig, queue_name: str, mix: Mix) -> float:
    """Every message straight to the agent's queue (default exchange); returns the seconds taken."""
    t0 = time.monotonic()
    with Connection(cfg.transport_url) as conn:
        producer = Producer(conn.channel(), exchange=Exchange(""), routing_key=queue_name)
        for data, props in mix.messages:
            producer.publish(data, serializer=None, retry=False, **props)
    return time.monotonic() - t0


def _wait_until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def _check_outcome(server: RpcServer, mix: Mix, replies: ReplyCollector, executed: Counter[str]) -> set[str]:
    """Everything the server did, against what was sent; returns the ids of the valid calls it
    answered `Busy` (a full worker pool sheds load: such a call did not run and may be sent again)."""
    # 0 crashes: both connection threads alive, never reconnected
    assert server.consumer.is_alive() and server.publisher.is_alive()
    assert server.consumer.reconnects == 0 and server.publisher.reconnects == 0
    # each drop counted by reason, exactly as sent
    assert dict(server.drops) == dict(mix.drops)
    # every call answered once: valid ones ok (or Busy), refusable ones with their error type
    assert replies.duplicates == 0
    assert set(replies.replies) == set(mix.valid_calls) | set(mix.error_replies)
    errors = {i: r["error"]["type"] for i, r in replies.replies.items() if not r["ok"]}
    busy = {i for i, t in errors.items() if t == "Busy"}
    assert busy <= set(mix.valid_calls)
    assert {i: t for i, t in errors.items() if i not in busy} == mix.error_replies
    answered_ok = {i: r["result"]["op"] for i, r in replies.replies.items() if r["ok"]}
    assert answered_ok == {i: op for i, op in mix.valid_calls.items() if i not in busy}
    # 0 forged / replayed / stale / refused operations executed; every valid one at most once
    assert not set(executed) & mix.hostile_ops
    assert set(executed.values()) <= {1}
    assert set(executed) == set(answered_ok.values()) | (set(executed) & mix.valid_casts)
    busy_casts = len(mix.valid_casts) - len(set(executed) & mix.valid_casts)
    # what the server says it served matches, answer type by answer type
    expected = mix.served - Counter(ok=len(busy) + busy_casts) + Counter(Busy=len(busy) + busy_casts)
    assert dict(server.served) == dict(expected)
    return busy


def test_hostile_traffic_is_dropped_counted_and_never_executed(hostile_cfg, keyring):
    executed: Counter[str] = Counter()
    lock = threading.Lock()

    def work(body: Op) -> dict[str, str]:
        with lock:
            executed[body.op] += 1
        return {"op": body.op}

    server = RpcServer(hostile_cfg, HOST, keyring, max_workers=8)
    server.register("work", work, since="1.0", body_type=Op)
    server.start()
    replies = ReplyCollector(hostile_cfg, keyring)
    replies.start()
    try:
        mix = build_mix(keyring, replies.queue_name)
        hostile = sum(mix.drops.values()) + sum(n for t, n in mix.served.items() if t != "ok")
        assert hostile >= 10_000
        publish_s = _publish_all(hostile_cfg, server.names.host_queue(HOST), mix)
        total = len(mix.messages)
        handled = lambda: sum(server.drops.values()) + sum(server.served.values())  # noqa: E731
        assert _wait_until(lambda: handled() >= total, 90), f"server handled {handled()} of {total}"
        assert _wait_until(lambda: len(replies.replies) >= len(mix.valid_calls) + len(mix.error_replies), 30)
        busy = _check_outcome(server, mix, replies, executed)
        # the calls shed as Busy, sent again as a client would: each runs once now
        with RpcClient(hostile_cfg, keyring, sender="orchestrator@after") as client:
            for call_id in sorted(busy):
                op = mix.valid_calls[call_id]
                assert client.call(HOST, "work", {"op": op}, timeout=10) == {"op": op}
                assert executed[op] == 1
            assert client.call(HOST, "work", {"op": "after"}, timeout=10) == {"op": "after"}
        print(
            f"\nhostile: {hostile} hostile messages + {len(mix.valid_calls)} valid calls + {len(mix.valid_casts)} "
            f"casts published in {publish_s:.1f} s; drops {dict(sorted((str(k), v) for k, v in server.drops.items()))}"
            f"; served {dict(server.served)}"
        )
    finally:
        replies.stop()
        server.stop()
