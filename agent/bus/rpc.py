"""RPC over the bus: `RpcServer` (one per agent) and `RpcClient` (orchestrators, source agents).

Server: every message is acked on receipt (at-most-once: a crash loses a call, never runs it twice),
opened (size, JSON, envelope, signature, time, replay: `envelope.Opener`), then checked for version,
method and body type, all on the consumer thread and before any handler runs. Only then does the
handler run, on a bounded pool; a full pool answers `Busy`. A dropped message gets no reply; a
well-signed call that cannot be served gets an error reply; an unexpected exception is logged here
and answered `Internal` (no traceback on the wire).

Client: one publisher thread, one reply queue (exclusive, auto-delete) consumed by one thread, and a
table of pending calls by id, so any number of threads can call at once.

Version history (the `v` a caller sends; see docs/protocol.md):
    1.0  describe_host, describe_instance, live_migrate (legacy move), abort_migration,
         force_complete, migration_status
    1.1  fit, claim, extend_claim, confirm_claim, release_claim; live_migrate with a placement

A call without an explicit `version` goes out at the newest version of its method within the
client's cap (live_migrate: 1.1 under a 1.1 cap, 1.0 under a 1.0 cap); a body field that the version
sent lacks (live_migrate's `placement` at 1.0) is refused here with `VersionTooLow`, never dropped.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import msgspec
from kombu import Queue

from agent.bus.envelope import MAX_LIFETIME_S, DropLog, Dropped, DropReason, Envelope, Kind, Opener, seal
from agent.bus.errors import (
    BusUnavailable,
    CallTimeout,
    RemoteBusy,
    RemoteError,
    RemoteInternal,
    RemoteInvalidRequest,
    RemoteNoSuchMethod,
    RemoteUnsupportedVersion,
    ReplyLost,
    VersionCapError,
    VersionTooLow,
    remote_error_from_wire,
)
from agent.bus.keys import Keyring
from agent.bus.schemas import best_version, decode_body, fields_needing_newer, method_versions, parse_version
from agent.bus.transport import ConsumerThread, Declare, Names, OnMessage, Outgoing, PublisherThread
from agent.config import BusConfig
from agent.errors import AgentError, InvalidInput

log = logging.getLogger(__name__)

Handler = Callable[[Any], Any]
#: the agent's own typed errors a handler may let escape, and what the caller sees (most specific wins)
DEFAULT_ERROR_MAP: Mapping[type[Exception], type[RemoteError]] = {InvalidInput: RemoteInvalidRequest}
QUEUED_PER_WORKER = 4  # calls that may wait for a worker before the server answers Busy
BUSY_RETRY_S = 1.0


@dataclass(frozen=True, slots=True)
class _Registration:
    since: tuple[int, int]
    handler: Handler
    body_type: type[msgspec.Struct]


class _ErrorBody(msgspec.Struct, frozen=True):
    type: str = "RemoteError"
    message: str = ""
    retry_after: float | None = None
    details: dict[str, Any] = {}


class _ReplyBody(msgspec.Struct, frozen=True):
    ok: bool
    result: dict[str, Any] | None = None
    error: _ErrorBody | None = None


def _builtins(result: Any) -> dict[str, Any]:
    """A body or result as plain JSON data (a Struct is converted; a dict is taken as it is)."""
    out = msgspec.to_builtins(result) if isinstance(result, msgspec.Struct) else result
    if not isinstance(out, dict):
        raise TypeError(f"a body or result must be a msgspec Struct or a dict, not {type(result).__name__}")
    return out


# --- server ---------------------------------------------------------------------------------------

# a host name is a topic-exchange binding key word list: "*" or "#" in it would bind other hosts' calls;
# 128 characters keep "<prefix>.agent.<host>" inside AMQP's 255-byte queue names
_HOST_RE = re.compile(r"[A-Za-z0-9_:-][A-Za-z0-9_.:-]{0,127}")


def _check_host(host: str) -> str:
    if not isinstance(host, str) or not _HOST_RE.fullmatch(host) or ".." in host or host.endswith("."):
        raise InvalidInput(f"host name {str(host)[:80]!r} must be 1-128 characters of [A-Za-z0-9_.:-]")
    return host


class Workers:
    """A fixed set of handler threads fed by one queue, bounded: `submit` refuses (returns False)
    when `max_workers` run and `max_waiting` wait. Lighter than ThreadPoolExecutor (no Future per
    task), which matters on the call path: every call crosses it once."""

    def __init__(self, max_workers: int, max_waiting: int, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None] = queue.SimpleQueue()
        # free slots, counted under a plain lock: threading.BoundedSemaphore is a Condition in Python,
        # ~10 us a call on the hot path; nobody ever waits for a slot (submit refuses instead)
        self._free = max_workers + max_waiting
        self._free_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(max_workers)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., None], *args: Any) -> bool:
        with self._free_lock:
            if self._free <= 0:
                return False
            self._free -= 1
        self._queue.put((fn, args))
        return True

    def _work(self) -> None:
        while (task := self._queue.get()) is not None:
            fn, args = task
            try:
                fn(*args)
            except Exception:  # a task's own failures are handled inside it; this is a last resort
                log.exception("bus: worker task failed")
            finally:
                with self._free_lock:
                    self._free += 1

    def stop(self, timeout: float = 10.0) -> None:
        """Let queued tasks finish, then end the threads."""
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(max(deadline - time.monotonic(), 0.0))


class RpcServer:
    """Serves the methods registered on it for `host` (its per-host queue and the broadcast)."""

    def __init__(
        self,
        cfg: BusConfig,
        host: str,
        keyring: Keyring,
        *,
        min_version: str = "1.0",
        max_version: str = "1.1",
        max_workers: int = 8,
        clock: Callable[[], float] = time.time,
        error_map: Mapping[type[Exception], type[RemoteError]] = DEFAULT_ERROR_MAP,
        publisher: PublisherThread | None = None,
    ) -> None:
        self.cfg, self.host, self.keyring, self.clock = cfg, _check_host(host), keyring, clock
        self.min_version, self.max_version = parse_version(min_version), parse_version(max_version)
        self.error_map = error_map
        self.names = Names(cfg.exchange_prefix)
        self.drop_log = DropLog(f"rpc server {host}", log)
        self.drops: Counter[DropReason] = self.drop_log.counts
        self.served: Counter[str] = Counter()  # "ok" or the wire error type
        self._served_lock = threading.Lock()
        self._methods: dict[str, list[_Registration]] = {}
        self._opener = Opener(
            keyring,
            max_bytes=cfg.max_message_bytes,
            max_clock_skew_s=cfg.max_clock_skew_s,
            kinds=frozenset({"call", "cast"}),
            clock=clock,
        )
        self._workers = Workers(max_workers, max_workers * QUEUED_PER_WORKER, f"rpc-{host}")
        # a publisher given by the caller is shared (many simulated agents in one process): the caller
        # starts and stops it
        self._owns_publisher = publisher is None
        self.publisher = publisher or PublisherThread(cfg, f"rpc-pub-{host}", clock)
        self.consumer = ConsumerThread(cfg, f"rpc-con-{host}", self._declare, self._on_message)

    @property
    def version_range(self) -> dict[str, str]:
        return {"min": "%d.%d" % self.min_version, "max": "%d.%d" % self.max_version}

    def register(self, method: str, handler: Handler, *, since: str, body_type: type[msgspec.Struct]) -> None:
        """Serve `method` from version `since` on; a second registration with a later `since`
        serves the calls that ask at least that version (e.g. live_migrate 1.0 and 1.1)."""
        regs = self._methods.setdefault(method, [])
        regs.append(_Registration(parse_version(since), handler, body_type))
        regs.sort(key=lambda r: r.since, reverse=True)

    def start(self, wait: float | None = 10.0) -> None:
        """Start consuming; with `wait`, BusUnavailable if the broker is not reached in time (the
        threads keep trying until stop(); `wait=None` returns at once and serves when it can)."""
        self._workers.start()
        if self._owns_publisher:
            self.publisher.start()
        self.consumer.start()
        for thread in (self.consumer, self.publisher):
            if wait is not None and not thread.ready.wait(wait):
                raise BusUnavailable(
                    f"the RPC server for {self.host} could not reach the broker in {wait} s ({thread.why_down()})"
                )

    def stop(self, timeout: float = 10.0) -> None:
        self.consumer.stop(timeout)
        self._workers.stop(timeout)
        if self._owns_publisher:
            self.publisher.stop(timeout)

    # -- consumer thread ---------------------------------------------------------------------------

    def _declare(self, channel: Any) -> list[Queue]:
        rpc, broadcast, _ = self.names.exchanges()
        args = {"x-queue-type": "quorum"} if self.cfg.quorum_queues else None
        own = Queue(
            self.names.host_queue(self.host),
            rpc,
            routing_key=Names.host_key(self.host),
            durable=True,
            queue_arguments=args,
        )
        fanout = Queue(self.names.private_queue(f"broadcast.{self.host}"), broadcast, exclusive=True, auto_delete=True)
        queues = [own(channel), fanout(channel)]
        for q in queues:
            q.declare()
        return queues

    def _on_message(self, body: bytes, props: Mapping[str, Any], routing_key: str) -> None:
        try:
            env = self._opener.open(body)
        except Dropped as drop:
            self.drop_log.record(drop)
            return
        try:
            reg, typed = self._check(env)
        except RemoteError as exc:
            self._answer_error(env, props, exc)
            return
        if not self._workers.submit(self._run, env, props, reg, typed):
            self._answer_error(env, props, _busy())

    def _check(self, env: Envelope) -> tuple[_Registration, Any]:
        """The registration and typed body for a call, or the RemoteError to answer with."""
        try:
            asked = parse_version(env.v)
        except ValueError:
            raise RemoteUnsupportedVersion(f"version {env.v!r}", details=self.version_range) from None
        if asked[0] != self.max_version[0] or not self.min_version <= asked <= self.max_version:
            raise RemoteUnsupportedVersion(
                f"{env.v} is not served here (serves {self.version_range['min']} to {self.version_range['max']})",
                details=self.version_range,
            )
        regs = self._methods.get(env.method)
        if not regs:
            raise RemoteNoSuchMethod(f"no method {env.method[:64]!r}", details={"method": env.method[:64]})
        reg = next((r for r in regs if r.since <= asked), None)
        if reg is None:
            since = "%d.%d" % regs[-1].since
            raise RemoteUnsupportedVersion(
                f"{env.method} needs {since}, the call asks {env.v}",
                details={**self.version_range, "method": env.method, "since": since},
            )
        return reg, decode_body(env.body, reg.body_type)

    # -- worker threads ----------------------------------------------------------------------------

    def _run(self, env: Envelope, props: Mapping[str, Any], reg: _Registration, typed: Any) -> None:
        try:
            if env.expires + self.cfg.max_clock_skew_s < self.clock():  # waited too long for a worker
                self.drop_log.record(Dropped(DropReason.STALE, f"call {env.id} expired before a worker took it"))
                return
            result = self._invoke(env, reg, typed)
            self._count("ok")
            self._answer(env, props, {"ok": True, "result": result})
        except RemoteError as exc:
            self._answer_error(env, props, exc)

    def _invoke(self, env: Envelope, reg: _Registration, typed: Any) -> dict[str, Any]:
        try:
            return _builtins(reg.handler(typed))
        except RemoteError:
            raise
        except Exception as exc:
            cls = self._map_error(exc)
            if cls is not RemoteInternal and isinstance(exc, AgentError):
                raise cls(exc.message, details={"code": exc.code}) from None
            # unexpected: the details stay in our log, the caller learns where to look
            log.exception("bus: %s %s from %s failed unexpectedly", env.method, env.id, env.sender)
            raise RemoteInternal(f"{env.method} failed on {self.host}; see the agent's log for call {env.id}") from None

    def _map_error(self, exc: Exception) -> type[RemoteError]:
        for cls in type(exc).__mro__:
            if cls in self.error_map:
                return self.error_map[cls]
        return RemoteInternal

    def _count(self, outcome: str) -> None:
        with self._served_lock:
            self.served[outcome] += 1

    def _answer_error(self, env: Envelope, props: Mapping[str, Any], exc: RemoteError) -> None:
        self._count(exc.type)
        log.info("bus: %s %s from %s: %s", env.method, env.id, env.sender, exc)
        self._answer(env, props, {"ok": False, "error": exc.to_wire()})

    def _answer(self, env: Envelope, props: Mapping[str, Any], body: dict[str, Any]) -> None:
        reply_to = props.get("reply_to")
        if env.kind != "call":
            return
        if not isinstance(reply_to, str) or not reply_to:
            log.warning("bus: call %s from %s has no reply_to: cannot answer", env.id, env.sender)
            return
        now = self.clock()
        try:
            data = self._seal_reply(env, body, now)
        except InvalidInput:  # a result that is not JSON data (NaN, a set, bytes): our bug, not the caller's
            log.exception("bus: %s %s: cannot encode the result", env.method, env.id)
            self._count(RemoteInternal.wire_type)
            error = RemoteInternal(f"{env.method} failed on {self.host}; see the agent's log for call {env.id}")
            data = self._seal_reply(env, {"ok": False, "error": error.to_wire()}, now)
        out = Outgoing("", reply_to, data, max(env.expires, now + 1.0), correlation_id=env.id, mandatory=True)
        self.publisher.submit(out)

    def _seal_reply(self, env: Envelope, body: dict[str, Any], now: float) -> bytes:
        return seal(
            self.keyring,
            kind="reply",
            method=env.method,
            body=body,
            version=env.v,
            sender=self.host,
            now=now,
            ttl_s=max(env.expires - now, 1.0),
            reply_to_id=env.id,
        )[1]


def _busy() -> RemoteError:
    return RemoteBusy("every worker of this agent is busy", retry_after=BUSY_RETRY_S)


# --- client ---------------------------------------------------------------------------------------


class _Pending:
    """One call waiting for its reply (or a broadcast collecting replies) by message id."""

    __slots__ = ("host", "expect", "msg_id", "reply_to", "replies", "failure", "_done")

    def __init__(self, host: str | None, expect: frozenset[str] = frozenset()) -> None:
        self.host = host  # None: a broadcast (any sender)
        self.expect = expect  # a broadcast may end early once all of these answered
        self.msg_id = ""
        self.reply_to = ""  # the reply queue the call named
        self.replies: list[Envelope] = []
        self.failure: BaseException | None = None
        self._done = threading.Lock()  # held until woken: lighter than an Event on the hot path
        self._done.acquire()

    def wake(self) -> None:
        try:
            self._done.release()
        except RuntimeError:  # woken twice (a reply and a late publish failure)
            pass

    def wait(self, timeout: float) -> bool:
        return self._done.acquire(timeout=max(timeout, 0.0))

    def fail(self, exc: BaseException) -> None:
        self.failure = exc
        self.wake()

    def add(self, env: Envelope) -> None:
        self.replies.append(env)
        if self.host is not None or (self.expect and self.expect <= {r.sender for r in self.replies}):
            self.wake()


class _ReplyConsumer(ConsumerThread):
    """A client's reply queue (auto-ack), which tells the client each time a new one is up."""

    def __init__(
        self,
        cfg: BusConfig,
        name: str,
        declare: Declare,
        on_message: OnMessage,
        renewed: Callable[[list[Queue]], None],
    ) -> None:
        super().__init__(cfg, name, declare, on_message, auto_ack=True)
        self._renewed = renewed

    def on_consume_ready(self, queues: list[Queue]) -> None:
        self._renewed(queues)


class RpcClient:
    """Calls agents. Thread-safe: any number of threads may call at once."""

    def __init__(
        self,
        cfg: BusConfig,
        keyring: Keyring,
        *,
        sender: str,
        version_cap: str = "1.1",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg, self.keyring, self.sender, self.clock = cfg, keyring, sender, clock
        self.version_cap = parse_version(version_cap)
        self.names = Names(cfg.exchange_prefix)
        self.drop_log = DropLog(f"rpc client {sender}", log)
        self.drops: Counter[DropReason] = self.drop_log.counts
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._opener = Opener(
            keyring,
            max_bytes=cfg.max_message_bytes,
            max_clock_skew_s=cfg.max_clock_skew_s,
            kinds=frozenset({"reply"}),
            clock=clock,
        )
        self.publisher = PublisherThread(cfg, f"rpc-client-pub-{sender}", clock)
        self.consumer = _ReplyConsumer(
            cfg, f"rpc-client-replies-{sender}", self._declare, self._on_reply, self._reply_queue_renewed
        )
        self.publisher.start()
        self.consumer.start()

    def can_send(self, version: str) -> bool:
        """True when `version` is within this client's cap (same major, minor at most the cap's)."""
        asked = parse_version(version)
        return asked[0] == self.version_cap[0] and asked <= self.version_cap

    def call(
        self,
        host: str,
        method: str,
        body: Any,
        *,
        timeout: float | None = None,
        version: str | None = None,
    ) -> dict[str, Any]:
        """Call `method` on `host`; the result, or the typed RemoteError, or CallTimeout."""
        timeout = self._timeout(timeout)
        pending = _Pending(host)
        self._send_call(self.names.rpc, Names.host_key(host), method, body, timeout, version, pending)
        if not pending.wait(timeout):
            self._forget(pending)
            raise CallTimeout(f"no reply from {host} to {method} in {timeout} s")
        self._forget(pending)
        if pending.failure is not None:
            raise pending.failure
        return _result(pending.replies[0])

    def broadcast_call(
        self,
        method: str,
        body: Any,
        *,
        timeout: float,
        version: str | None = None,
        expect: Iterable[str] = (),
    ) -> dict[str, Any]:
        """Call every live agent: {host: result or RemoteError} of the replies received within
        `timeout` (the whole timeout, or until every host named in `expect` has answered)."""
        timeout = self._timeout(timeout)
        pending = _Pending(None, frozenset(expect))
        self._send_call(self.names.broadcast, "", method, body, timeout, version, pending)
        pending.wait(timeout)  # woken early by the last expected reply or a publish failure
        self._forget(pending)
        if pending.failure is not None:
            raise pending.failure
        out: dict[str, Any] = {}
        for env in pending.replies:
            try:
                out[env.sender] = _result(env)
            except RemoteError as exc:
                out[env.sender] = exc
        return out

    def cast(
        self, host: str, method: str, body: Any, *, version: str | None = None, timeout: float | None = None
    ) -> None:
        """Send without a reply; returns once the broker confirmed it (persistent message)."""
        timeout = self._timeout(timeout)
        data_body = _builtins(body)
        version = self._version(method, version, data_body)
        _, data, now = self._seal("cast", method, data_body, version, timeout)
        done: Future[None] = Future()
        out = Outgoing(self.names.rpc, Names.host_key(host), data, now + timeout, persistent=True, done=done)
        self.publisher.submit(out)
        try:
            done.result(timeout + 1.0)
        except TimeoutError:
            raise CallTimeout(f"the broker did not take the cast {method} to {host} in {timeout} s") from None

    def close(self, timeout: float = 10.0) -> None:
        self.consumer.stop(timeout)
        self.publisher.stop(timeout)
        with self._lock:
            pending, self._pending = self._pending, {}
        for p in pending.values():
            p.fail(BusUnavailable("the RPC client was closed"))

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------------

    def _timeout(self, timeout: float | None) -> float:
        value = self.cfg.call_timeout_s if timeout is None else timeout
        if not 0 < value <= MAX_LIFETIME_S:  # agents drop messages that live longer (bad_lifetime)
            raise InvalidInput(f"timeout {value!r} s must be in (0, {MAX_LIFETIME_S:.0f}]")
        return value

    def _version(self, method: str, version: str | None, body: dict[str, Any]) -> str:
        """The version a call goes out at: the one asked, else the newest the method has within the
        cap (a method outside the protocol's table: 1.0). VersionCapError above the cap;
        VersionTooLow when the body has a field that version lacks (the agent would drop it)."""
        cap = "%d.%d" % self.version_cap
        if version is None:
            version = best_version(method, self.version_cap) if method_versions(method) else "1.0"
            if version is None:
                since = method_versions(method)[0].since
                raise VersionCapError(f"{method} needs {since}, above this client's version cap {cap}")
        if not self.can_send(version):
            raise VersionCapError(f"{method} at {version} is above this client's version cap {cap}")
        newer = fields_needing_newer(method, version, body)
        if newer:
            wants = ", ".join(f"{name} (from {since})" for name, since in sorted(newer.items()))
            raise VersionTooLow(f"{method} sent at {version} (cap {cap}) would drop {wants}")
        return version

    def _send_call(
        self,
        exchange: str,
        routing_key: str,
        method: str,
        body: Any,
        timeout: float,
        version: str | None,
        pending: _Pending,
    ) -> None:
        data_body = _builtins(body)
        version = self._version(method, version, data_body)
        if not self.consumer.ready.wait(timeout):
            raise BusUnavailable(
                f"no reply queue: the broker was unreachable for {timeout} s ({self.consumer.why_down()})"
            )
        msg_id, data, now = self._seal("call", method, data_body, version, timeout)
        pending.msg_id = msg_id
        with self._lock:  # the lock _reply_queue_renewed takes: a call never names a queue it missed
            reply_to = pending.reply_to = self.consumer.queue_names[0]
            self._pending[msg_id] = pending
        out = Outgoing(exchange, routing_key, data, now + timeout, msg_id, reply_to, on_failure=pending.fail)
        self.publisher.submit(out)

    def _seal(
        self, kind: Kind, method: str, body: dict[str, Any], version: str, ttl_s: float
    ) -> tuple[str, bytes, float]:
        """(message id, signed bytes, the time they were sealed at) of one outgoing call or cast."""
        now = self.clock()
        msg_id, data = seal(
            self.keyring, kind=kind, method=method, body=body, version=version, sender=self.sender, now=now, ttl_s=ttl_s
        )
        return msg_id, data, now

    def _forget(self, pending: _Pending) -> None:
        with self._lock:
            self._pending.pop(pending.msg_id, None)

    def _declare(self, channel: Any) -> list[Queue]:
        q = Queue(self.names.private_queue("reply"), exclusive=True, auto_delete=True)(channel)
        q.declare()
        return [q]

    def _reply_queue_renewed(self, queues: list[Queue]) -> None:
        """After a reconnection: the calls that named the lost reply queue can get no reply (it died
        with its connection). A call fails now with ReplyLost; a broadcast returns what it has. A
        call whose reply came before is left alone (replies are added on this same thread)."""
        current = queues[0].name
        with self._lock:
            lost = [p for p in self._pending.values() if p.reply_to != current and not (p.host and p.replies)]
        for pending in lost:
            if pending.host is None:
                pending.wake()
            else:
                pending.fail(
                    ReplyLost(
                        f"the reply queue of call {pending.msg_id} to {pending.host} was lost when the bus "
                        "reconnected; the call may have run or may still run: retry it to learn its outcome "
                        "(methods are idempotent)"
                    )
                )
        if lost:
            log.warning("bus: %d call(s) lost their reply queue in a reconnection", len(lost))

    def _on_reply(self, body: bytes, props: Mapping[str, Any], routing_key: str) -> None:
        try:
            env = self._opener.open(body)
        except Dropped as drop:
            self.drop_log.record(drop)
            return
        with self._lock:
            pending = self._pending.get(env.reply_to_id or "")
        if pending is None or (pending.host is not None and pending.host != env.sender):
            log.info("bus: reply %s from %s matches no waiting call (late?)", env.id, env.sender)
            return
        pending.add(env)


def _result(env: Envelope) -> dict[str, Any]:
    """The result of a reply, or its error raised as the typed RemoteError."""
    try:
        reply = msgspec.convert(env.body, type=_ReplyBody)
    except msgspec.ValidationError as exc:
        raise RemoteInternal(f"malformed reply from {env.sender}: {exc}") from None
    if reply.ok:
        return reply.result or {}
    if reply.error is None:
        raise RemoteInternal(f"reply from {env.sender} says ok=false without an error")
    raise remote_error_from_wire(msgspec.to_builtins(reply.error))
