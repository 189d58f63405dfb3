"""Signed events on the real broker, and AMQP topic matching (pure)."""

from __future__ import annotations

import queue
import time
from typing import Any, Iterator

import pytest
from kombu import Connection, Producer

from agent.bus.envelope import DropReason, seal
from agent.bus.events import EventPublisher, EventSubscriber, topic_matches
from agent.bus.keys import Keyring
from agent.bus.schemas import ClaimEvent
from agent.bus.transport import Names
from agent.errors import InvalidInput

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("capabilities.*", "capabilities.hv-01", True),
        ("capabilities.*", "capabilities", False),
        ("capabilities.*", "capabilities.hv.01", False),
        ("migration.*.done", "migration.m-1.done", True),
        ("migration.*.done", "migration.m-1.progress", False),
        ("migration.#", "migration", True),
        ("migration.#", "migration.m-1.progress", True),
        ("#", "claim.hv-01", True),
        ("#.done", "migration.m-1.done", True),
        ("a.#.c", "a.c", True),
        ("a.#.c", "a.x.y.c", True),
        ("a.#.c", "a.x.y", False),
        ("claim.hv-01", "claim.hv-01", True),
        ("claim.hv-01", "claim.hv-02", False),
    ],
)
def test_topic_matching(pattern, key, matches):
    assert topic_matches(pattern, key) is matches


def publish_raw(cfg, body: bytes, routing_key: str) -> None:
    with Connection(cfg.transport_url) as conn:
        Producer(conn.channel()).publish(
            body, exchange=Names(cfg.exchange_prefix).events, routing_key=routing_key, content_type="application/json"
        )


@pytest.fixture
def publisher(bus_cfg, keyring) -> Iterator[EventPublisher]:
    p = EventPublisher(bus_cfg, keyring, sender="hv-01")
    yield p
    p.close()


def drain(q: queue.Queue, n: int, timeout: float = 10.0) -> list[Any]:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        try:
            out.append(q.get(timeout=0.1))
        except queue.Empty:
            pass
    return out


def test_publish_and_subscribe_by_pattern(bus_cfg, keyring, publisher):
    got: queue.Queue = queue.Queue()
    sub = EventSubscriber(bus_cfg, keyring, name="t")
    sub.subscribe("migration.*.done", lambda key, body: got.put(("done", key, body)))
    sub.subscribe("claim.#", lambda key, body: got.put(("claim", key, body)), body_type=ClaimEvent)
    sub.start()
    try:
        publisher.publish("capabilities.hv-01", {"host": "hv-01"})  # nobody subscribed: not delivered
        publisher.publish("migration.m-1.done", {"migration_id": "m-1", "status": "completed"})
        claim = {
            "host": "hv-01",
            "migration_id": "m-1",
            "instance_uuid": "u",
            "state": "held",
            "reason": None,
            "ts": 1.0,
        }
        publisher.publish("claim.hv-01", claim)
        events = drain(got, 2)
        assert events[0] == ("done", "migration.m-1.done", {"migration_id": "m-1", "status": "completed"})
        assert events[1] == ("claim", "claim.hv-01", ClaimEvent(**claim))
        assert drain(got, 1, timeout=0.5) == []
        assert sub.delivered == 2 and not sub.drops
    finally:
        sub.stop()


def test_forged_stale_replayed_and_misrouted_events_are_dropped(bus_cfg, keyring, publisher):
    got: queue.Queue = queue.Queue()
    sub = EventSubscriber(bus_cfg, keyring, name="t")
    sub.subscribe("#", lambda key, body: got.put((key, body)))
    sub.subscribe("claim.*", lambda key, body: got.put(("typed", body)), body_type=ClaimEvent)
    sub.start()
    try:
        now = time.time()

        def event(key: str, ring: Keyring = keyring, **kw: Any) -> bytes:
            args = {"now": now, "ttl_s": 600.0, **kw}
            return seal(ring, kind="event", method=key, body={"n": 1}, version="1.1", sender="x", **args)[1]

        good = event("capabilities.hv-01")
        publish_raw(bus_cfg, good, "capabilities.hv-01")
        publish_raw(bus_cfg, good, "capabilities.hv-01")  # replay
        publish_raw(
            bus_cfg, event("capabilities.hv-01", Keyring.single(keyring.signing_kid, bytes(32))), "capabilities.hv-01"
        )
        publish_raw(bus_cfg, event("capabilities.hv-01", now=now - 3600), "capabilities.hv-01")
        publish_raw(bus_cfg, event("capabilities.hv-02"), "capabilities.hv-01")  # signed for another key
        publish_raw(bus_cfg, b"not json", "capabilities.hv-01")
        publish_raw(bus_cfg, event("claim.hv-01"), "claim.hv-01")  # the "#" handler takes it, the typed one drops it
        assert drain(got, 2) == [("capabilities.hv-01", {"n": 1}), ("claim.hv-01", {"n": 1})]
        assert drain(got, 1, timeout=0.5) == []
        assert sub.drops == {
            DropReason.REPLAYED: 1,
            DropReason.BAD_SIGNATURE: 1,
            DropReason.STALE: 1,
            DropReason.BAD_ENVELOPE: 2,
            DropReason.NOT_JSON: 1,
        }
    finally:
        sub.stop()


def test_a_failing_handler_does_not_stop_the_subscriber(bus_cfg, keyring, publisher):
    got: queue.Queue = queue.Queue()

    def handler(key: str, body: Any) -> None:
        if body["n"] == 1:
            raise RuntimeError("handler bug")
        got.put(body["n"])

    sub = EventSubscriber(bus_cfg, keyring, name="t")
    sub.subscribe("x.*", handler)
    sub.start()
    try:
        publisher.publish("x.a", {"n": 1})
        publisher.publish("x.a", {"n": 2})
        assert drain(got, 1) == [2]
        with pytest.raises(RuntimeError, match="before start"):
            sub.subscribe("y.*", handler)
        with pytest.raises(InvalidInput, match="ttl_s"):
            publisher.publish("x.a", {"n": 3}, ttl_s=0)
    finally:
        sub.stop()
