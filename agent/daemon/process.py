"""The daemon process: `compute-agent daemon`, one per hypervisor, under systemd (Type=notify).

Start (`Daemon.start`), each step named in systemd's STATUS while it runs:

    config (checked before anything starts: a bad one is one line naming [section] option, exit 2)
    -> the bus's event publisher starts connecting (in the background, while the rest goes on)
    -> libvirt (its event loop running) -> the claim ledger -> the topology (sysfs, cross-checked
       with libvirt's capabilities) -> the ledger reconciled with the running domains -> traits
    -> the roles (source, destination, the source's history) register their methods
    -> the RPC server consumes
    -> lifecycle events, the hotplug watcher, the metrics endpoint -> capabilities published
    -> READY=1

Then one asyncio control loop (`Daemon.serve`) does only small things: WATCHDOG=1 at half of
WATCHDOG_USEC, STATUS ("serving; 2 migrations out, 1 claim held"), capabilities every
`[bus] capabilities_interval_s` and after any change (coalesced), the hotplug rediscovery, SIGHUP
(RELOADING=1, the options that may change at run time, which changed, READY=1) and SIGTERM
(STOPPING=1; stop taking calls, answer the ones in progress, leave running migrations to libvirt,
flush the ledger, exit 0 within 10 s). Blocking work (libvirt, SQLite, the broker's confirms) runs
on the daemon's own worker thread, which owns its libvirt connection, or on the bus's threads.

Nothing is global: two `Daemon`s in one test process have their own everything.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar

from agent.bus.errors import KeyFileError
from agent.bus.events import EventPublisher
from agent.bus.keys import Keyring
from agent.bus.rpc import RpcClient, RpcServer
from agent.claims.ledger import Ledger
from agent.config import AgentConfig, load_config
from agent.daemon.capabilities import (
    Announcer,
    HostFacts,
    host_state_now,
    read_host_facts,
    served_max,
    topology_changes,
)
from agent.daemon.context import AgentContext, LibvirtConnections, LiveConfig, PeerCaller, Role, TopologyHolder
from agent.daemon.destination import Destination
from agent.daemon.destination_watch import reconcile_at_start
from agent.daemon.errors import HotplugWatchError, NotifySocketError
from agent.daemon.history import History
from agent.daemon.lifecycle import LifecycleEvents
from agent.daemon.metrics import AgentMetrics, MetricsServer
from agent.daemon.migrations import MigrationStore
from agent.daemon.notify import Notifier
from agent.daemon.reload import apply_reload
from agent.daemon.source import Source
from agent.errors import AgentError, ConfigError, DiscoveryError
from agent.libvirt_ops.connection import ensure_event_loop
from agent.libvirt_ops.host import topology_from_libvirt
from agent.log import set_log_level, setup_logging
from agent.numa.capabilities import discover
from agent.numa.fit import fit
from agent.numa.topology import HostTopology

if TYPE_CHECKING:  # pyudev is loaded after READY=1 (agent.daemon.hotplug imports it)
    from agent.daemon.hotplug import HotplugWatcher, TopologyEvent

log = logging.getLogger("compute_agent.daemon")

EXIT_OK, EXIT_FAILED, EXIT_BAD_CONFIG = 0, 1, 2
START_WAIT_S = 10.0  # for the broker at start; systemd's TimeoutStartSec is 60
STOP_STEP_S = 2.0  # per part at SIGTERM: four parts stay within the 10 s promised (TimeoutStopSec=15)
CHANGE_DEBOUNCE_S = 0.1  # a claim and its domain event a moment later make one capabilities event
HOUSEKEEPING_S = 5.0  # STATUS and the bus counters into the metrics
STOP_DEADLINE_S = 9.5  # systemd is promised an exit within 10 s of SIGTERM

RoleFactory = Callable[[AgentContext], Role]
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class DaemonOptions:
    """How this process runs (the command line and the environment; the config file is separate)."""

    config_path: Path | None = None
    sysfs_root: Path = Path("/sys")  # tests point this at a tree of their own
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    hotplug: bool = True
    hotplug_source: str | None = None  # None: udev's events when udevd runs, else the kernel's
    hotplug_debounce_s: float = 0.2  # a hot-plug is a burst of uevents: one rediscovery for it
    install_signals: bool = True  # False when a test drives the daemon in its own event loop


def optional_roles() -> list[RoleFactory]:
    """The roles besides the destination, which every agent has: the source side (tests leave it out)."""
    return [Source]


class Daemon:
    """One agent. `await start()` (to READY=1), `await serve()` (until `request_stop()`), which closes."""

    def __init__(self, cfg: AgentConfig, opts: DaemonOptions, roles: Sequence[RoleFactory] | None = None) -> None:
        """Checks what can be checked before anything starts: NotifySocketError, KeyFileError,
        ConfigError ([upgrade_levels] agent outside what this agent serves)."""
        self.opts = opts
        self.config = LiveConfig(cfg)
        self.host = cfg.host or socket.gethostname()
        self.rpc_max = served_max(cfg)  # [upgrade_levels] agent: ConfigError when out of range
        self.notifier = Notifier.from_env(opts.environ)
        self.keyring = Keyring.from_file(cfg.bus.key_file)
        self.metrics = AgentMetrics()
        self.libvirt = LibvirtConnections(cfg.libvirt.connection_uri)
        self._role_factories = list(roles) if roles is not None else optional_roles()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"agent-{self.host}")
        self._stop = asyncio.Event()
        self._change = asyncio.Event()
        self._reasons: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._peers: RpcClient | None = None
        self._peers_lock = threading.Lock()
        self._bus_seen: dict[str, int] = {}
        self.ready_s: float | None = None  # seconds from start() to READY=1
        self.ctx: AgentContext | None = None
        self.roles: list[Role] = []
        self.announcer: Announcer | None = None
        self.ledger: Ledger | None = None
        self.events: EventPublisher | None = None
        self.server: RpcServer | None = None
        self.lifecycle: LifecycleEvents | None = None
        self.hotplug: HotplugWatcher | None = None
        self.metrics_server: MetricsServer | None = None
        self.metrics_address: tuple[str, int] | None = None

    @property
    def cfg(self) -> AgentConfig:
        return self.config.current

    # -- start --------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Everything up to READY=1; on a failure what was started is stopped and the error raised."""
        started = time.monotonic()
        self._loop = asyncio.get_running_loop()
        try:
            await self._start_steps()
        except BaseException:
            await self.close()
            raise
        self.ready_s = time.monotonic() - started
        release_startup_memory()
        self.notifier.ready(self.status_line())
        log.info("compute-agent %s ready in %.0f ms", self.host, self.ready_s * 1000)

    async def _start_steps(self) -> None:
        self._say("starting: connecting to the broker")
        self.events = EventPublisher(self.cfg.bus, self.keyring, sender=self.host)  # connects meanwhile
        self._say("starting: libvirt, claim ledger, topology")
        ctx, facts = await self._on_worker(self._prepare)
        self._say("starting: serving the bus")
        self.announcer = Announcer(facts, self.events, ctx.clock, damage=lambda: ctx.ledger.damage)
        # the source first: STATUS reads "serving; 2 migrations out, 1 claim held"
        self.roles = [*(factory(ctx) for factory in self._role_factories), Destination(ctx, self.announcer)]
        self.roles += history_roles(self.host, self.roles)
        self.server = RpcServer(self.cfg.bus, self.host, self.keyring, max_version=self.rpc_max)
        for role in self.roles:
            role.register(self.server)
        await self._on_worker(self.server.start, START_WAIT_S)
        for role in self.roles:
            await self._on_worker(role.start)
        await self._on_worker(self._start_lifecycle, ctx)
        self._start_metrics()
        await self._publish("start")

    def _prepare(self) -> tuple[AgentContext, HostFacts]:
        """On the worker thread: libvirt, the ledger, the topology, reconcile, the host's facts."""
        cfg = self.cfg
        ensure_event_loop()  # before any connection, so connections get keepalives and events
        conn = self.libvirt.get()
        # a damaged ledger is salvaged at once (never started empty), and new claims wait out the hold
        self.ledger = Ledger.from_config(
            cfg.claims, fitter=functools.partial(fit, preference=cfg.compute.placement_preference), on_corrupt="salvage"
        )
        # sysfs wins; each disagreement with libvirt's capabilities is logged by discover()
        topology, _ = discover(self.opts.sysfs_root, conn.getCapabilities(), hostname=self.host)
        ctx = self._context(self.ledger, TopologyHolder(topology, self._read_topology))
        changed = reconcile_at_start(ctx)
        log.info("claim ledger %s: %d live claims, %d changed at start", self.ledger.path, self._live(), changed)
        self._report_ledger_damage(self.ledger)
        return ctx, read_host_facts(conn, cfg, self.host)

    def _context(self, ledger: Ledger, topology: TopologyHolder) -> AgentContext:
        assert self.events is not None
        self.ctx = AgentContext(
            host=self.host,
            config=self.config,
            ledger=ledger,
            libvirt=self.libvirt,
            events=self.events,
            peers=self._peer_client,
            metrics=self.metrics,
            topology=topology,
            changed=self.changed,
            clock=time.time,
        )
        return self.ctx

    def _read_topology(self) -> HostTopology:
        """The host's topology now: sysfs, else (sysfs unusable) libvirt's view of it."""
        try:
            topology, _ = discover(self.opts.sysfs_root, None, hostname=self.host)
        except DiscoveryError:
            return topology_from_libvirt(self.libvirt.get(), self.host)
        return topology

    def _start_lifecycle(self, ctx: AgentContext) -> None:
        self.lifecycle = LifecycleEvents(self.cfg.libvirt.connection_uri, ctx.domain_events, self.changed)
        self.lifecycle.open()

    def _start_hotplug(self) -> bool:
        """The udev watch (after READY=1: pyudev's load is not on the start-up path); True if it runs."""
        from agent.daemon.hotplug import HotplugWatcher

        watcher = HotplugWatcher(
            self._on_uevents, debounce_s=self.opts.hotplug_debounce_s, source=self.opts.hotplug_source
        )
        try:
            watcher.start()
        except HotplugWatchError as exc:
            log.warning("no hotplug watch (%s): the topology is read again only at restart", exc)
            return False
        self.hotplug = watcher
        return True

    async def _watch_hotplug(self) -> None:
        """Start watching, then read the topology once more: a change between the start-up reading
        and the watch is not lost."""
        if self.opts.hotplug and await self._on_worker(self._start_hotplug):
            await self._rediscover("the watch started", publish_unchanged=False)

    def _start_metrics(self) -> None:
        listen = self.cfg.metrics_listen
        if listen is None:
            return
        self.metrics_server = MetricsServer(self.metrics, *listen)
        self.metrics_address = self.metrics_server.start()
        log.info("metrics on http://%s:%d/metrics", *self.metrics_address)

    # -- serve --------------------------------------------------------------------------------------

    async def serve(self) -> None:
        """The control loop's timers until `request_stop()`; then everything is closed."""
        tasks = [
            asyncio.create_task(coro)
            for coro in (
                self._watchdog(),
                self._periodic_capabilities(),
                self._changes(),
                self._housekeeping(),
                self._watch_hotplug(),
            )
        ]
        try:
            await self._stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.close()

    async def main(self) -> int:
        """start + serve with the signals handled: the whole life of `compute-agent daemon`."""
        if self.opts.install_signals:  # before READY=1: a SIGTERM right after it must find them
            self._install_signals()
        await self.start()
        await self.serve()
        return EXIT_OK

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.request_stop, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))

    def request_stop(self, why: str = "asked to stop") -> None:
        """Stop serving (thread-safe from the loop's thread; use `stop_threadsafe` elsewhere)."""
        log.info("stopping (%s)", why)
        self._stop.set()

    def stop_threadsafe(self, why: str = "asked to stop") -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.request_stop, why)

    def changed(self, why: str) -> None:
        """What this host offers changed (any thread): capabilities and STATUS soon, coalesced."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._note_change, why)
        except RuntimeError:  # the loop closed meanwhile: nobody to tell
            pass

    def _note_change(self, why: str) -> None:
        self._reasons.append(why)
        self._change.set()

    async def _changes(self) -> None:
        while True:
            await self._change.wait()
            await asyncio.sleep(CHANGE_DEBOUNCE_S)
            self._change.clear()
            reasons, self._reasons = self._reasons, []
            await self._publish("; ".join(reasons)[:300])
            self._say(self.status_line())

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval_s()
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _periodic_capabilities(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.bus.capabilities_interval_s)
            await self._publish("periodic")

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            self.sync_bus_metrics()
            self._say(self.status_line())
            if self.lifecycle is not None:  # libvirtd restarted: subscribe again on a new connection
                await self._on_worker(_quietly, self.lifecycle.ensure_open)

    async def _publish(self, why: str) -> None:
        """Capabilities now, from the worker thread; a failure is logged (the next one will do):
        libvirtd or the broker may be away for a while, the loop must go on."""
        try:
            await self._on_worker(self._publish_blocking, why)
        except AgentError as exc:
            log.warning("capabilities not published (%s): %s", why, exc)
        except Exception:
            log.exception("capabilities not published (%s)", why)

    def _publish_blocking(self, why: str) -> None:
        assert self.ctx is not None and self.announcer is not None
        self.announcer.publish(host_state_now(self.ctx).state, why)

    # -- hotplug and reload -------------------------------------------------------------------------

    def _on_uevents(self, batch: tuple[TopologyEvent, ...]) -> None:
        """On the watcher's thread: hand the batch to the control loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        what = ", ".join(map(str, batch[:8])) + (" ..." if len(batch) > 8 else "")
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._rediscover(f"uevents {what}")))

    async def _rediscover(self, why: str, *, publish_unchanged: bool = True) -> None:
        """Read the topology again, log what changed, republish (after uevents always: free counts move)."""
        assert self.ctx is not None
        topology = self.ctx.topology
        old = topology.current
        try:
            new = await self._on_worker(topology.fresh)
        except Exception:  # fresh() keeps the last topology on a read error; anything else is a bug
            log.exception("reading the topology again failed (%s)", why)
            return
        changes = topology_changes(old, new)
        log.info("%s: topology %s", why, "; ".join(changes) if changes else "unchanged")
        if changes or publish_unchanged:
            await self._publish(f"topology read again after {why}"[:200])

    async def reload(self) -> None:
        """SIGHUP: read the config again, take what may change at run time, say what changed."""
        self.notifier.reloading("reloading the configuration")
        try:
            read = await self._on_worker(load_config, self.opts.config_path)
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            self.notifier.ready(self.status_line())
            return
        result = apply_reload(self.cfg, read)
        self.config.replace(result.config)
        set_log_level(result.config.log_level)
        log.warning("reloaded: %s", ", ".join(result.changed) if result.changed else "no run-time option changed")
        if result.needs_restart:
            log.warning("changed but only taken at restart: %s", ", ".join(result.needs_restart))
        self.notifier.ready(self.status_line())

    # -- status, metrics, peers ---------------------------------------------------------------------

    def status_line(self) -> str:
        """STATUS: "serving; 2 migrations out, 1 claim held"."""
        parts = [text for role in self.roles if (text := _role_status(role))]
        return "serving" + ("; " + ", ".join(parts) if parts else "")

    def _say(self, status: str) -> None:
        self.notifier.status(status)

    def sync_bus_metrics(self) -> None:
        """The bus's own counters (drops by reason, reconnects) into the metrics, as increments."""
        parts = [p for p in (self.server, self.events) if p is not None]
        reconnects = sum(getattr(t, "reconnects", 0) for p in parts for t in _bus_threads(p))
        for _ in range(self._unseen("reconnects", reconnects)):
            self.metrics.reconnected()
        drops = self.server.drops.copy() if self.server is not None else {}
        for reason, count in drops.items():
            name = str(getattr(reason, "value", reason))
            for _ in range(self._unseen(f"drop:{name}", count)):
                self.metrics.message_dropped(name)

    def _unseen(self, key: str, total: int) -> int:
        """How much `total` grew since the last look."""
        new = max(0, total - self._bus_seen.get(key, 0))
        self._bus_seen[key] = total
        return new

    def _report_ledger_damage(self, ledger: Ledger) -> None:
        damage = ledger.damage
        if damage is not None and damage.refusing_new_claims:
            self.metrics.ledger_damage_found(max(1, len(ledger.corrupt_files)))
            log.error("claim ledger %s: %s", ledger.path, damage.summary)
        elif damage is not None:
            log.warning("claim ledger %s: %s", ledger.path, damage.summary)

    def _live(self) -> int:
        return len(self.ledger.live_claims()) if self.ledger is not None else 0

    def _peer_client(self) -> PeerCaller:
        """The one client this agent calls its peers with (the source confirms a destination's claim)."""
        with self._peers_lock:
            if self._peers is None:
                self._peers = RpcClient(self.cfg.bus, self.keyring, sender=self.host)
            return self._peers

    async def _on_worker(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    # -- stop ---------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop taking calls, stop the roles (running migrations stay libvirt's), flush, close."""
        self.notifier.stopping("stopping: answering the calls in progress")
        if self.opts.install_signals:  # a process of its own: it must end in time whatever hangs
            _exit_guard(STOP_DEADLINE_S)
        if self.hotplug is not None:
            _quietly(self.hotplug.stop, STOP_STEP_S)
        if self.server is not None:
            await self._on_worker(_quietly, self.server.stop, STOP_STEP_S)
        for role in self.roles:
            await self._on_worker(_quietly, role.stop)
        await self._on_worker(self._close_blocking)
        self._worker.shutdown(wait=True)
        log.info("compute-agent %s stopped", self.host)

    def _close_blocking(self) -> None:
        if self.lifecycle is not None:
            _quietly(self.lifecycle.close)
        if self.ctx is not None:
            _quietly(self.ctx.domain_events.close)
        for client in (self._peers, self.events):
            if client is not None:
                _quietly(client.close, STOP_STEP_S)
        if self.metrics_server is not None:
            _quietly(self.metrics_server.stop)
        if self.ledger is not None:
            _quietly(self.ledger.checkpoint)
            _quietly(self.ledger.close)
        self.libvirt.close_all()


def history_roles(host: str, roles: Sequence[Role]) -> list[Role]:
    """`list_migrations` over the migration record of each source role (none without one)."""
    return [History(host, _store_of(role)) for role in roles if isinstance(role, Source)]


def _store_of(source: Source) -> Callable[[], MigrationStore]:
    return lambda: source.store


def _role_status(role: Role) -> str:
    try:
        return role.status()
    except Exception:  # STATUS is informative: a role's bug must not take the loop down
        log.exception("status of %s failed", type(role).__name__)
        return ""


def release_startup_memory() -> None:
    """Give back the heap start-up freed (import-time garbage, parsed XML): glibc keeps freed memory
    in its arenas until told otherwise, and it would count in the daemon's RSS for its whole life."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc: nothing to trim
        pass


def _exit_guard(seconds: float) -> None:
    """End the process after `seconds` if the orderly stop has not (a hung handler or broker):
    exit status 1 and an error in the log, so the hang is seen rather than waited for."""

    def force() -> None:
        log.error("stop did not finish in %.1f s: exiting anyway", seconds)
        logging.shutdown()
        os._exit(EXIT_FAILED)

    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    """One step of the shutdown: its failure is logged and the next steps still run."""
    try:
        fn(*args)
    except Exception:
        log.exception("stopping: %s failed", getattr(fn, "__qualname__", fn))


def _bus_threads(part: Any) -> list[Any]:
    return [t for t in (getattr(part, "consumer", None), getattr(part, "publisher", None)) if t is not None]


# --- the command ---------------------------------------------------------------------------------------


def check_startup(opts: DaemonOptions) -> tuple[AgentConfig, Daemon]:
    """The config and the daemon built from it; ConfigError naming `[section] option` otherwise."""
    cfg = load_config(opts.config_path)
    try:
        return cfg, Daemon(cfg, opts)
    except KeyFileError as exc:
        raise ConfigError(f"[bus] key_file = {cfg.bus.key_file}: {exc}") from None
    except NotifySocketError as exc:
        raise ConfigError(f"environment: {exc}") from None


def run_daemon(opts: DaemonOptions) -> int:
    """`compute-agent daemon`: 0 after a clean stop, 2 for a bad config (nothing started), 1 when
    it could not start (libvirt or the broker unreachable, the ledger unusable)."""
    try:
        cfg, daemon = check_startup(opts)
    except ConfigError as exc:
        sys.stderr.write(f"compute-agent: bad configuration: {exc}\n")
        return EXIT_BAD_CONFIG
    setup_logging(cfg.log_level)
    try:
        return asyncio.run(daemon.main())
    except AgentError as exc:
        log.error("compute-agent could not start: %s", exc)
        sys.stderr.write(f"compute-agent: could not start: {exc}\n")
        return EXIT_FAILED
