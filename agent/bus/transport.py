"""kombu on RabbitMQ: the names of every exchange and queue, and the two kinds of thread that own a
connection each: a `ConsumerThread` (declares its queues, consumes, checks heartbeats) and a
`PublisherThread` (declares the exchanges, publishes with confirms, checks heartbeats).

A connection is touched only by its own thread (kombu/py-amqp connections are not thread-safe);
other threads hand messages to a publisher through a queue. Both threads reconnect after any
connection or channel error with exponential backoff and jitter, switching to the next URL of
`[bus] transport_url` (failover), then declare everything again and go on. Lifecycle hooks are
documented no-op methods (kombu.mixins style): subclass or assign to observe them.
"""

from __future__ import annotations

import logging
import queue
import random
import socket
import ssl
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import amqp
from amqp import spec
from amqp.exceptions import MessageNacked
from kombu import Connection, Exchange, Queue
from kombu.message import Message

from agent.bus.errors import BusError, BusUnavailable, CallTimeout, PublishNotConfirmed
from agent.config import BusConfig

log = logging.getLogger(__name__)

TICK_S = 0.25  # how often a thread wakes to check heartbeats and its stop flag
CONFIRM_TIMEOUT_S = 10.0  # a broker that has not confirmed by then is treated as gone
CONNECT_TIMEOUT_S = 5.0
BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 5.0  # the fault tests want service back within 10 s of a broker restart
MAX_NACKS = 2  # publishes of one message the broker may nack before it fails PublishNotConfirmed
FLUSH_S = 5.0  # how long stop() lets a connected publisher send what it was given
MIN_EXPIRATION_MS = 1  # AMQP expiration "0" means "deliver now or drop": keep at least 1 ms


# --- names (shared/formats.md, "Exchanges, queues, routing") ---------------------------------------


@dataclass(frozen=True, slots=True)
class Names:
    prefix: str

    @property
    def rpc(self) -> str:
        return f"{self.prefix}.rpc"

    @property
    def broadcast(self) -> str:
        return f"{self.prefix}.broadcast"

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    def host_queue(self, host: str) -> str:
        return f"{self.prefix}.agent.{host}"

    @staticmethod
    def host_key(host: str) -> str:
        return f"agent.{host}"

    def private_queue(self, role: str) -> str:
        """A fresh name for an exclusive auto-delete queue (replies, broadcast, events)."""
        return f"{self.prefix}.{role}.{uuid.uuid4().hex[:16]}"

    def exchanges(self) -> tuple[Exchange, Exchange, Exchange]:
        return (
            Exchange(self.rpc, "topic", durable=True),
            Exchange(self.broadcast, "fanout", durable=True),
            Exchange(self.events, "topic", durable=True),
        )


def make_connection(cfg: BusConfig) -> Connection:
    """A kombu connection (not yet connected) with heartbeats, failover and TLS (a publisher puts
    its own channel in confirm mode)."""
    return Connection(
        cfg.transport_url,
        heartbeat=cfg.heartbeat_s,
        ssl=ssl_options(cfg),
        connect_timeout=CONNECT_TIMEOUT_S,
        failover_strategy="round-robin",
    )


def ssl_options(cfg: BusConfig) -> dict[str, Any] | bool:
    if not cfg.ssl:
        return False
    opts: dict[str, Any] = {"ca_certs": str(cfg.ssl_ca_file), "cert_reqs": ssl.CERT_REQUIRED}
    if cfg.ssl_cert_file is not None and cfg.ssl_key_file is not None:
        opts.update(certfile=str(cfg.ssl_cert_file), keyfile=str(cfg.ssl_key_file))
    return opts


def redact(url: str) -> str:
    """A transport URL for logs: the password replaced."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


READ_CHUNK = 256 * 1024  # one recv per burst of frames instead of three per frame


class _BufferedRecv:
    """A recv(n) that reads the socket in large chunks and serves frames from memory.

    py-amqp reads each frame with three exact-size recv calls (header, payload, end byte), each
    preceded by a poll when the socket has a timeout: ~9 system calls per delivered message. This
    keeps its logic (it still asks for exactly n bytes) and only changes where the bytes come from.
    """

    __slots__ = ("_recv", "_buf", "_pos")

    def __init__(self, recv: Callable[[int], bytes]) -> None:
        self._recv = recv
        self._buf = memoryview(b"")
        self._pos = 0

    def __call__(self, n: int) -> bytes:
        if self._pos >= len(self._buf):
            chunk = self._recv(max(n, READ_CHUNK))
            if len(chunk) <= n:
                return chunk  # also b"" at end of stream, as recv would
            self._buf, self._pos = memoryview(chunk), 0
        out = self._buf[self._pos : self._pos + n].tobytes()
        self._pos += len(out)
        return out


def buffer_reads(transport: Any) -> None:
    """Give a py-amqp transport buffered reads (see _BufferedRecv); a no-op on an unknown transport."""
    recv = getattr(transport, "_quick_recv", None)
    if callable(recv) and not isinstance(recv, _BufferedRecv):
        transport._quick_recv = _BufferedRecv(recv)


class Backoff:
    """Exponential backoff with full jitter: 0.1, 0.2, 0.4 ... 5 s, each drawn in [d/2, d]."""

    def __init__(self, start: float = BACKOFF_START_S, cap: float = BACKOFF_MAX_S, rng: random.Random | None = None):
        self.start, self.cap = start, cap
        self.rng = rng or random.Random()
        self.current = start

    def next(self) -> float:
        delay = self.current
        self.current = min(self.current * 2, self.cap)
        return self.rng.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.current = self.start


# --- the common part of both threads ----------------------------------------------------------------


class _ConnectionThread(threading.Thread):
    """Owns one kombu connection: connect with backoff, run a session, reconnect on errors."""

    def __init__(self, cfg: BusConfig, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.cfg = cfg
        self.names = Names(cfg.exchange_prefix)
        self.conn = make_connection(cfg)
        self.stopping = threading.Event()
        self.ready = threading.Event()  # set while a session is up
        self.backoff = Backoff()
        self.reconnects = 0  # failed connection attempts and broken sessions since start
        self.sessions = 0  # sessions that came up (more than one: it reconnected)
        self.last_error: BaseException | None = None
        self.conn_errors: tuple[type[BaseException], ...] = (
            self.conn.connection_errors + self.conn.channel_errors + (OSError,)
        )
        self._last_heartbeat = 0.0

    # hooks (no-ops): override to observe the lifecycle
    def on_connection_error(self, exc: BaseException, delay: float) -> None:
        """Called when connecting or a session failed; the thread retries after `delay` seconds."""

    def on_connection_revived(self) -> None:
        """Called after every successful (re)connection, before declaring."""

    def on_ready(self) -> None:
        """Called when the session is declared and working."""

    def run(self) -> None:
        errors = self.conn_errors
        while not self.stopping.is_set():
            try:
                # one attempt (kombu's connect() sleeps 2 s and tries again); our loop backs off
                self.conn.ensure_connection(max_retries=0, reraise_as_library_errors=False)
                self.on_connection_revived()
                self.session()
            except errors as exc:
                self._after_error(exc)
            finally:
                self.ready.clear()
        self._close()

    def _after_error(self, exc: BaseException) -> None:
        # not ready from the moment the session broke, not only after the backoff: a caller that
        # waits for `ready` must not take this session's reply queue for one on the next node
        self.ready.clear()
        if self.stopping.is_set():
            return
        delay = self.backoff.next()
        self.last_error = exc
        log.warning("bus: %s: %s (%s); retrying in %.2f s", self.name, type(exc).__name__, exc, delay)
        self.on_connection_error(exc, delay)
        self._release()
        self.conn.maybe_switch_next()
        self.reconnects += 1
        self.stopping.wait(delay)

    def session(self) -> None:
        raise NotImplementedError

    def why_down(self) -> str:
        """The last connection error, for the message of a BusUnavailable."""
        exc = self.last_error
        return "no connection error seen yet" if exc is None else f"last error: {type(exc).__name__}: {exc}"

    def heartbeat(self) -> None:
        """Send/check AMQP heartbeats, at most once a tick (py-amqp's check costs ~25 µs)."""
        now = time.monotonic()
        if now - self._last_heartbeat >= TICK_S:
            self._last_heartbeat = now
            self.conn.heartbeat_check()

    def went_ready(self) -> None:
        self.sessions += 1
        self.backoff.reset()
        self.ready.set()
        log.info("bus: %s ready on %s", self.name, redact(self.conn.as_uri(include_password=False)))
        self.on_ready()

    def _release(self) -> None:
        try:
            self.conn.collect()
        except Exception:  # noqa: BLE001 - dropping a dead socket must never kill the thread
            log.debug("bus: %s: collect failed", self.name, exc_info=True)

    def _close(self) -> None:
        try:
            self.conn.release()
        except Exception:  # noqa: BLE001 - closing a broken connection may fail in many ways
            self._release()

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)


# --- consuming -----------------------------------------------------------------------------------

OnMessage = Callable[[bytes, Mapping[str, Any], str], None]  # body, AMQP properties, routing key
Declare = Callable[[Any], list[Queue]]


class ConsumerThread(_ConnectionThread):
    """Declares its queues with `declare(channel)` on every (re)connection and, on this thread,
    acks each delivery on receipt (at-most-once: a message is never redelivered, whatever follows)
    and calls `on_message(body, properties, routing_key)`."""

    def __init__(
        self, cfg: BusConfig, name: str, declare: Declare, on_message: OnMessage, *, auto_ack: bool = False
    ) -> None:
        super().__init__(cfg, name)
        self.declare = declare
        self.on_message = on_message
        self.auto_ack = auto_ack  # the broker forgets a message once sent (no prefetch bound): replies only
        self.queue_names: list[str] = []
        self._channel: Any = None

    def on_consume_ready(self, queues: list[Queue]) -> None:
        """Called when consuming from `queues` has started (after every reconnection)."""

    def session(self) -> None:
        channel = self._channel = self.conn.channel()
        # py-amqp would decode bodies by their (sender-chosen) content_encoding: we size-check bytes
        channel.auto_decode = False
        for exchange in self.names.exchanges():
            exchange(channel).declare()
        queues = self.declare(channel)
        if not self.auto_ack:
            channel.basic_qos(0, self.cfg.prefetch_count, False)
        # py-amqp's own consume: kombu's Consumer/Message wrappers cost ~20 µs a delivery
        for q in queues:
            channel.basic_consume(queue=q.name, callback=self._deliver, no_ack=self.auto_ack)
        self.queue_names = [q.name for q in queues]
        self.on_consume_ready(queues)
        self.went_ready()
        self._drain()

    def _deliver(self, message: Any) -> None:
        if not self.auto_ack:
            try:
                self._channel.basic_ack(message.delivery_tag)
            except socket.timeout:  # a write cut short by the read tick: the stream is broken
                raise ConnectionError("ack could not be written in time") from None
        body = message.body
        data = body if isinstance(body, bytes) else str(body).encode()
        try:
            self.on_message(data, message.properties, message.delivery_info.get("routing_key", ""))
        except Exception:  # a bug in a callback must not take the consumer (and the agent) down
            log.exception("bus: %s: message handling failed", self.name)

    def _drain(self) -> None:
        # The socket itself times out every tick, so reads need no per-frame timeout juggling
        # (py-amqp's drain_events(timeout=...) costs two settimeout calls per frame).
        self.conn.connection.sock.settimeout(TICK_S)
        buffer_reads(self.conn.connection.transport)
        while not self.stopping.is_set():
            try:
                self.conn.drain_events(timeout=None)
            except socket.timeout:
                pass
            self.heartbeat()


# --- publishing ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Outgoing:
    """One message for a publisher thread. `expires_at` (the sender's clock) gives the AMQP
    expiration and bounds the retries; `done` (if any) gets the outcome."""

    exchange: str
    routing_key: str
    body: bytes
    expires_at: float
    correlation_id: str | None = None
    reply_to: str | None = None
    mandatory: bool = False
    persistent: bool = False
    done: Future[None] | None = None
    on_failure: Callable[[BaseException], None] | None = None  # lighter than `done` for calls
    nacks: int = field(default=0)


class PublisherThread(_ConnectionThread):
    """Publishes what `submit()` hands it, in order, each confirmed by the broker before the next.

    A message that cannot be published before its `expires_at` fails with `CallTimeout`; one the
    broker nacks fails with `PublishNotConfirmed`; a returned (unroutable, mandatory) one is logged.
    """

    def __init__(self, cfg: BusConfig, name: str, clock: Callable[[], float] = time.time) -> None:
        super().__init__(cfg, name)
        self.clock = clock
        self.inbox: queue.SimpleQueue[Outgoing | None] = queue.SimpleQueue()
        self.returned = 0
        self.closing = threading.Event()  # stop() was called: no new messages
        self._current: Outgoing | None = None
        self._channel: Any = None

    def on_return(self, exc: BaseException, exchange: str, routing_key: str, message: Message) -> None:
        """Called for a mandatory message the broker could not route (e.g. a caller's reply queue gone)."""
        self.returned += 1
        log.warning("bus: returned unroutable message to %r via %r: %s", routing_key, exchange, exc)

    def submit(self, out: Outgoing) -> None:
        if self.closing.is_set():
            _fail(out, BusUnavailable("the bus publisher is stopped"))
            return
        self.inbox.put(out)

    def session(self) -> None:
        self._open_channel()
        # a confirm that has not come by then raises socket.timeout (no per-publish timeout juggling)
        self.conn.connection.sock.settimeout(CONFIRM_TIMEOUT_S)
        buffer_reads(self.conn.connection.transport)
        self.went_ready()
        if self._current is not None:  # the message that was in flight when the connection broke
            self._publish(self._current)
        while not self.stopping.is_set():
            try:
                out = self.inbox.get(timeout=TICK_S)
            except queue.Empty:
                self._read_idle()
                self.heartbeat()
                continue
            if out is None:  # stop()'s sentinel: everything submitted before it is published
                self.stopping.set()
                return
            self._publish(out)
            self.heartbeat()

    def _open_channel(self) -> None:
        channel = self.conn.channel()
        channel.confirm_select()  # every publish on it is confirmed (see _send)
        for exchange in self.names.exchanges():
            exchange(channel).declare()
        channel.events["basic_return"].add(self.on_return)
        self._channel = channel

    def _renew_channel(self) -> None:
        """A fresh channel after a nack: RabbitMQ 3.10 may nack every later publish on a channel
        that published to a quorum queue during its leader election, while a new channel is fine."""
        self.conn.maybe_close_channel(self._channel)
        self._open_channel()

    def _read_idle(self) -> None:
        """Read what the broker sent while we were idle (its heartbeats): py-amqp counts received
        bytes to decide that the broker is gone, so an idle publisher must still read."""
        try:
            self.conn.drain_events(timeout=0)
        except socket.timeout:
            pass

    def _publish(self, out: Outgoing) -> None:
        remaining = out.expires_at - self.clock()
        if remaining <= 0:
            _fail(out, CallTimeout(f"message for {out.routing_key!r} expired before the broker took it"))
            return
        self._current = out
        try:
            self._send(out, remaining)
        except PublishNotConfirmed as exc:
            out.nacks += 1
            self._renew_channel()  # a connection error here: reconnect, then self._current again
            if out.nacks < MAX_NACKS:  # once more on the new channel (a duplicate is replay-checked)
                self._publish(out)
                return
            self._current = None
            _fail(out, exc)
            return
        except self.conn_errors:
            raise  # reconnect, then publish self._current again
        except Exception as exc:  # a message py-amqp cannot encode: fail it, keep the thread
            self._current = None
            log.exception("bus: %s: cannot publish to %r", self.name, out.routing_key)
            _fail(out, BusError(f"cannot publish to {out.routing_key!r}: {exc}"))
            return
        self._current = None
        if out.done is not None:
            out.done.set_result(None)

    def _send(self, out: Outgoing, remaining: float) -> None:
        assert self._channel is not None
        props: dict[str, Any] = {
            "content_type": "application/json",
            "expiration": str(max(int(remaining * 1000), MIN_EXPIRATION_MS)),
            "delivery_mode": 2 if out.persistent else 1,
        }
        if out.correlation_id is not None:
            props["correlation_id"] = out.correlation_id
        if out.reply_to is not None:
            props["reply_to"] = out.reply_to
        channel = self._channel
        try:
            # Not kombu's Producer (headers, priority and serializer checks we do not need) nor
            # py-amqp's basic_publish, which polls the socket before every publish to see a
            # connection.blocked early: we read after every publish anyway, for its confirm.
            args = (0, out.exchange, out.routing_key, out.mandatory, False)
            channel.send_method(spec.Basic.Publish, "Bssbb", args, amqp.Message(out.body, **props))
            channel.wait(_CONFIRMS, callback=_raise_on_nack)
        except MessageNacked as exc:
            raise PublishNotConfirmed(f"broker nacked the message for {out.routing_key!r}: {exc}") from None
        except socket.timeout:
            # the late confirm would be taken for the next message's: this connection is spoilt
            raise ConnectionError("no publisher confirm in time") from None

    def run(self) -> None:
        super().run()
        self._fail_pending()

    def _fail_pending(self) -> None:
        gone = BusUnavailable("the bus publisher stopped")
        if self._current is not None:
            _fail(self._current, gone)
        while True:
            try:
                out = self.inbox.get_nowait()
            except queue.Empty:
                return
            if out is not None:
                _fail(out, gone)

    def stop(self, timeout: float = 10.0) -> None:
        """Publish what was submitted before (while connected, up to FLUSH_S), then close."""
        self.closing.set()
        self.inbox.put(None)
        if self.ready.is_set() and self.is_alive():
            self.join(min(timeout, FLUSH_S))
        super().stop(timeout)


_CONFIRMS = [spec.Basic.Ack, spec.Basic.Nack]


def _raise_on_nack(method: Any, *args: Any) -> None:
    if method == spec.Basic.Nack:
        raise MessageNacked()


def _fail(out: Outgoing, exc: BaseException) -> None:
    if out.on_failure is not None:
        out.on_failure(exc)
    elif out.done is not None:
        if not out.done.done():
            out.done.set_exception(exc)
    else:
        log.warning("bus: could not publish to %r: %s", out.routing_key, exc)
