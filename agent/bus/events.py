"""Events: signed, fire-and-forget messages on the `<prefix>.events` topic exchange.

`EventPublisher.publish("capabilities.hv-01", body)` seals the body like a call (kind `event`,
`method` = the routing key) and returns once the broker confirmed it. `EventSubscriber` binds one
exclusive queue with every pattern given to `subscribe()`, opens each event exactly as the RPC
server opens calls (a forged, stale or replayed event is dropped and counted in `.drops`) and
runs the handlers, in arrival order, on one worker thread (never on the consumer thread).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Mapping

import msgspec
from kombu import Queue

from agent.bus.envelope import MAX_LIFETIME_S, DropLog, Dropped, DropReason, Envelope, Opener, seal
from agent.bus.errors import BusUnavailable, CallTimeout
from agent.bus.keys import Keyring
from agent.bus.transport import ConsumerThread, Names, Outgoing, PublisherThread
from agent.config import BusConfig
from agent.errors import InvalidInput

log = logging.getLogger(__name__)

EVENT_VERSION = "1.1"  # the RPC version of the event bodies (docs/protocol.md, "Events")
EVENT_TTL_S = 600.0  # an event older than this is of no use to anyone (and leaves the replay cache)
EventHandler = Callable[[str, Any], None]


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: `*` is exactly one word, `#` zero or more ("migration.*.done", "claim.#")."""
    words = routing_key.split(".")
    reach = {0}  # how many words of the key the pattern so far can have consumed
    for part in pattern.split("."):
        if part == "#":
            reach = set(range(min(reach), len(words) + 1)) if reach else set()
        else:
            reach = {i + 1 for i in reach if i < len(words) and part in ("*", words[i])}
    return len(words) in reach


class EventPublisher:
    """Publishes signed events from one publisher thread (thread-safe: any thread may publish)."""

    def __init__(
        self, cfg: BusConfig, keyring: Keyring, *, sender: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.cfg, self.keyring, self.sender, self.clock = cfg, keyring, sender, clock
        self.names = Names(cfg.exchange_prefix)
        self.publisher = PublisherThread(cfg, f"events-pub-{sender}", clock)
        self.publisher.start()

    def publish(self, routing_key: str, body: Any, *, ttl_s: float = EVENT_TTL_S, wait: bool = True) -> None:
        """Publish a signed event; with `wait`, returns once the broker confirmed it."""
        if not 0 < ttl_s <= MAX_LIFETIME_S:  # subscribers would drop it (bad_lifetime)
            raise InvalidInput(f"event ttl_s {ttl_s!r} must be in (0, {MAX_LIFETIME_S:.0f}]")
        now = self.clock()
        data = msgspec.to_builtins(body) if isinstance(body, msgspec.Struct) else body
        _, raw = seal(
            self.keyring,
            kind="event",
            method=routing_key,
            body=data,
            version=EVENT_VERSION,
            sender=self.sender,
            now=now,
            ttl_s=ttl_s,
        )
        done: Future[None] | None = Future() if wait else None
        self.publisher.submit(Outgoing(self.names.events, routing_key, raw, now + ttl_s, done=done))
        if done is not None:
            try:
                done.result(self.cfg.call_timeout_s)
            except TimeoutError:
                raise CallTimeout(f"the broker did not take event {routing_key} in time") from None

    def close(self, timeout: float = 10.0) -> None:
        self.publisher.stop(timeout)


class EventSubscriber:
    """One exclusive queue bound with every `subscribe()` pattern; handlers run in order on one thread."""

    def __init__(
        self, cfg: BusConfig, keyring: Keyring, *, name: str = "subscriber", clock: Callable[[], float] = time.time
    ) -> None:
        self.cfg, self.clock = cfg, clock
        self.names = Names(cfg.exchange_prefix)
        self.drop_log = DropLog(f"event subscriber {name}", log)
        self.drops: Counter[DropReason] = self.drop_log.counts
        self.delivered = 0
        self._subs: list[tuple[str, EventHandler, type[msgspec.Struct] | None]] = []
        self._opener = Opener(
            keyring,
            max_bytes=cfg.max_message_bytes,
            max_clock_skew_s=cfg.max_clock_skew_s,
            kinds=frozenset({"event"}),
            clock=clock,
        )
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"events-{name}")
        self.consumer = ConsumerThread(cfg, f"events-con-{name}", self._declare, self._on_message)

    def subscribe(self, pattern: str, handler: EventHandler, *, body_type: type[msgspec.Struct] | None = None) -> None:
        """Call `handler(routing_key, body)` for events matching `pattern` (before `start()`);
        with `body_type`, `body` is that Struct and an event whose body does not match is dropped."""
        if self.consumer.is_alive():
            raise RuntimeError("subscribe before start()")
        self._subs.append((pattern, handler, body_type))

    def start(self, wait: float | None = 10.0) -> None:
        self.consumer.start()
        if wait is not None and not self.consumer.ready.wait(wait):
            raise BusUnavailable(
                f"the event subscriber could not reach the broker in {wait} s ({self.consumer.why_down()})"
            )

    def stop(self, timeout: float = 10.0) -> None:
        self.consumer.stop(timeout)
        self._worker.shutdown(wait=True, cancel_futures=True)

    def _declare(self, channel: Any) -> list[Queue]:
        _, _, events = self.names.exchanges()
        q = Queue(self.names.private_queue("events"), exclusive=True, auto_delete=True)(channel)
        q.declare()
        for pattern, *_ in self._subs:
            q.bind_to(events, routing_key=pattern)
        return [q]

    def _on_message(self, body: bytes, props: Mapping[str, Any], key: str) -> None:
        try:
            env = self._opener.open(body)
        except Dropped as drop:
            self.drop_log.record(drop)
            return
        if env.method != key:  # the signed routing key must be the one it was routed by
            self.drop_log.record(
                Dropped(DropReason.BAD_ENVELOPE, f"event {env.id} signed for {env.method!r} came as {key!r}")
            )
            return
        self._worker.submit(self._dispatch, env)

    def _dispatch(self, env: Envelope) -> None:
        for pattern, handler, body_type in self._subs:
            if topic_matches(pattern, env.method):
                self._call(handler, env, body_type)

    def _call(self, handler: EventHandler, env: Envelope, body_type: type[msgspec.Struct] | None) -> None:
        try:
            body = env.body if body_type is None else msgspec.convert(env.body, type=body_type)
        except msgspec.ValidationError as exc:
            self.drop_log.record(Dropped(DropReason.BAD_ENVELOPE, f"event {env.method} from {env.sender}: {exc}"))
            return
        try:
            handler(env.method, body)
            self.delivered += 1
        except Exception:
            log.exception("bus: event handler for %s failed", env.method)
