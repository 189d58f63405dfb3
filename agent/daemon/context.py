"""What every role of the daemon is given: `AgentContext`, and the `Role` protocol it serves through.

A role (the destination side, the source side) is one object built from an `AgentContext`. The
process (agent.daemon.process) builds the context, then for each role: `register(server)` before
the bus starts, `start()` once the bus is up, `status()` for systemd's STATUS line at any time, and
`stop()` on SIGTERM. Nothing here is global: two agents in one test process each have their own
context, connections, ledger and metrics.

    class Destination:                      # agent.daemon.destination
        def __init__(self, ctx: AgentContext) -> None: ...
        def register(self, server: RpcServer) -> None:
            server.register("claim", self.claim, since="1.1", body_type=ClaimBody)
        def start(self) -> None: ...        # threads of its own, if any
        def stop(self) -> None: ...         # returns within a few seconds; libvirt's jobs keep running
        def status(self) -> str: return "1 claim held"

The process builds `agent.daemon.destination.Destination(ctx, announcer)` and
`agent.daemon.source.Source(ctx)`: a role is any class whose constructor takes the context.

Threads: handlers run on the RPC server's worker threads, so a role never shares a libvirt
connection between threads: `ctx.libvirt.get()` gives the calling thread its own. The ledger,
the event publisher, the peer client, the metrics and `ctx.changed()` are thread-safe.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from agent.config import AgentConfig
from agent.errors import AgentError
from agent.libvirt_ops.connection import close_quietly, open_connection

if TYPE_CHECKING:
    from agent.bus.rpc import RpcServer
    from agent.claims.ledger import Ledger
    from agent.daemon.metrics import AgentMetrics
    from agent.numa.topology import HostTopology

log = logging.getLogger("compute_agent.daemon")


# --- the seams a role talks through -----------------------------------------------------------------


class EventSink(Protocol):
    """Publishes a signed event (agent.bus.events.EventPublisher has this shape)."""

    def publish(self, routing_key: str, body: Any, *, wait: bool = True) -> None: ...


class PeerCaller(Protocol):
    """Calls another agent (agent.bus.rpc.RpcClient has this shape): the result, or a RemoteError."""

    def call(
        self, host: str, method: str, body: Any, *, timeout: float | None = None, version: str | None = None
    ) -> dict[str, Any]: ...


@runtime_checkable
class Role(Protocol):
    """One side of the daemon's work (see the module doc for the order of the calls)."""

    def register(self, server: RpcServer) -> None:
        """Register this role's methods on the RPC server (before it starts)."""

    def start(self) -> None:
        """Begin background work; called once the bus is connected. Must not block for long."""

    def stop(self) -> None:
        """End background work within a few seconds; running libvirt jobs are left running."""

    def status(self) -> str:
        """A fragment of systemd's STATUS line, e.g. "2 migrations out" ("" says nothing)."""


# --- libvirt: one connection per thread -------------------------------------------------------------


class LibvirtConnections:
    """Opens one libvirt connection per calling thread, lazily, and reopens one that died.

    libvirt connections may be shared in C, but a connection that dies under one thread's call
    must not be closed under another's: each thread owns its own, and `close_all()` at shutdown
    closes every one.
    """

    def __init__(self, uri: str, opener: Callable[[str], Any] = open_connection) -> None:
        self.uri = uri
        self._opener = opener
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[Any] = []

    def get(self) -> Any:
        """This thread's connection to `uri` (LibvirtConnectionError when libvirtd is unreachable)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and _alive(conn):
            return conn
        if conn is not None:
            log.warning("libvirt connection to %s died; reopening it", self.uri)
            self._forget(conn)
        conn = self._opener(self.uri)
        self._local.conn = conn
        with self._lock:
            self._all.append(conn)
        return conn

    def close_all(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            close_quietly(conn)

    def _forget(self, conn: Any) -> None:
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)
        close_quietly(conn)


def _alive(conn: Any) -> bool:
    try:
        return bool(conn.isAlive())
    except Exception:  # a broken binding or a closed connection: open a new one
        return False


# --- libvirt domain lifecycle events ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DomainLifecycle:
    """One libvirt lifecycle event of a domain on this host (VIR_DOMAIN_EVENT_ID_LIFECYCLE).

    `event` is libvirt's event word (defined, undefined, started, suspended, resumed, stopped,
    shutdown, pmsuspended, crashed); `detail` libvirt's detail number for it (e.g. started/migrated).
    """

    uuid: str  # lower case, with dashes
    name: str
    event: str
    detail: int


DomainListener = Callable[[DomainLifecycle], None]


class DomainEvents:
    """Fans libvirt's lifecycle events out to the roles that subscribed.

    Listeners run one after the other on the hub's own thread (never on libvirt's event loop, which
    must not block, nor on the control loop), so a listener may look the domain up on its thread's
    own connection or write the ledger. A failing listener is logged and the others still run.
    """

    def __init__(self) -> None:
        self._listeners: list[DomainListener] = []
        self._worker: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def subscribe(self, listener: DomainListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def emit(self, event: DomainLifecycle) -> None:
        """Hand `event` to every listener (returns at once; thread-safe)."""
        with self._lock:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(1, thread_name_prefix="domain-events")
            listeners, worker = tuple(self._listeners), self._worker
        worker.submit(self._deliver, listeners, event)

    def close(self) -> None:
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _deliver(listeners: tuple[DomainListener, ...], event: DomainLifecycle) -> None:
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                log.exception("domain event listener failed for %s %s", event.name, event.event)


# --- what changes at run time -----------------------------------------------------------------------


class LiveConfig:
    """The configuration in force: replaced whole on SIGHUP (one reference swap), read with
    `.current` wherever a value is used, so a migration started after a reload sees the new values."""

    def __init__(self, cfg: AgentConfig) -> None:
        self._cfg = cfg

    @property
    def current(self) -> AgentConfig:
        return self._cfg

    def replace(self, cfg: AgentConfig) -> None:
        self._cfg = cfg


class TopologyHolder:
    """The host topology last discovered; `.current` to read it, `fresh()` to read the host again
    (live free page counts) with the `reader` the process gave (a hotplug does the same)."""

    def __init__(self, topology: HostTopology, reader: Callable[[], HostTopology] | None = None) -> None:
        self._topology = topology
        self._reader = reader

    @property
    def current(self) -> HostTopology:
        return self._topology

    def replace(self, topology: HostTopology) -> None:
        self._topology = topology

    def fresh(self) -> HostTopology:
        """The topology read now (and kept); the last one, with a warning, when it cannot be read."""
        if self._reader is None:
            return self._topology
        try:
            self._topology = self._reader()
        except AgentError as exc:
            log.warning("cannot read the host topology again (%s): using the last one", exc)
        return self._topology


# --- the context ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentContext:
    """Everything a role needs, built once by the process (tests build one by hand with fakes).

    `changed(why)` tells the process that what this host offers changed (a claim taken or ended, a
    migration started or ended): it republishes capabilities and refreshes systemd's STATUS soon,
    coalescing bursts. It is thread-safe and never blocks.
    """

    host: str  # this agent's name on the bus ([DEFAULT] host)
    config: LiveConfig
    ledger: Ledger
    libvirt: LibvirtConnections
    events: EventSink
    peers: Callable[[], PeerCaller]  # the shared client for calling other agents (made on first use)
    metrics: AgentMetrics
    topology: TopologyHolder
    changed: Callable[[str], None]
    clock: Callable[[], float]  # seconds since the epoch (time.time): claim expiries, event ts
    domain_events: DomainEvents = field(default_factory=DomainEvents)  # libvirt lifecycle events

    @property
    def cfg(self) -> AgentConfig:
        """The configuration in force now (short for `config.current`)."""
        return self.config.current


__all__ = [
    "AgentContext",
    "DomainEvents",
    "DomainLifecycle",
    "EventSink",
    "LibvirtConnections",
    "LiveConfig",
    "PeerCaller",
    "Role",
    "TopologyHolder",
]
