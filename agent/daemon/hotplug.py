"""The udev watcher: CPU, memory and NUMA node uevents, debounced into one "topology may have
changed" callback.

A hot-plug rarely comes alone (onlining a DIMM is one `memory` event per block, a socket brings a
`cpu` event per thread), so events are gathered until the bus has been quiet for `debounce_s`, and
at the latest `max_wait_s` after the first, then handed over as one batch. The callback runs on the
watcher's thread: it should only hand the batch to the control loop.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyudev

from agent.daemon.errors import HotplugWatchError

log = logging.getLogger("compute_agent.daemon.hotplug")

#: The sysfs subsystems whose devices make up the NUMA topology the agent discovers.
TOPOLOGY_SUBSYSTEMS = ("cpu", "memory", "node")
#: Where a running udevd listens; without one (containers, tests) only the kernel's events exist.
UDEV_CONTROL = "/run/udev/control"


@dataclass(frozen=True, slots=True)
class TopologyEvent:
    subsystem: str  # cpu | memory | node
    action: str  # add | remove | online | offline | change | ...
    sys_name: str  # cpu3, memory42, node1

    def __str__(self) -> str:
        return f"{self.sys_name} {self.action}"


#: Stands for uevents the kernel dropped: whatever they were, the topology must be read again.
LOST_EVENTS = TopologyEvent("", "lost", "uevents")


class Debouncer:
    """Batches events: due `quiet_s` after the last one, or `max_wait_s` after the first.

    With quiet_s=0.5, max_wait_s=5: events at t=0, 0.3, 0.6 are due at 1.1 as one batch; a storm of
    one event every 0.2 s is still reported at t=5, then again 5 s later, never starved.
    """

    def __init__(self, quiet_s: float, max_wait_s: float) -> None:
        self.quiet_s, self.max_wait_s = quiet_s, max(max_wait_s, quiet_s)
        self._events: list[TopologyEvent] = []
        self._first = self._last = 0.0

    def add(self, event: TopologyEvent, now: float) -> None:
        if not self._events:
            self._first = now
        self._events.append(event)
        self._last = now

    def timeout(self, now: float) -> float | None:
        """Seconds until the pending batch is due (0 when it is); None when nothing is pending."""
        if not self._events:
            return None
        due = min(self._last + self.quiet_s, self._first + self.max_wait_s)
        return max(0.0, due - now)

    def take_due(self, now: float) -> tuple[TopologyEvent, ...]:
        if self.timeout(now) != 0.0:
            return ()
        batch, self._events = tuple(self._events), []
        return batch


def default_source() -> str:
    """'udev' (events after udev's rules ran) when udevd runs, else the kernel's own uevents."""
    return "udev" if os.path.exists(UDEV_CONTROL) else "kernel"


class HotplugWatcher:
    """A thread that owns the netlink monitor; start() and stop() from the owner's thread."""

    def __init__(
        self,
        on_change: Callable[[tuple[TopologyEvent, ...]], None],
        *,
        debounce_s: float = 0.5,
        max_wait_s: float = 5.0,
        source: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_change, self._clock = on_change, clock
        self._debouncer = Debouncer(debounce_s, max_wait_s)
        self.source = source or default_source()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake_r = self._wake_w = -1

    def start(self) -> None:
        """Listen before returning, so no event after start() is missed."""
        if self._thread is not None:
            raise HotplugWatchError("the hotplug watcher is already running")
        monitor = self._open_monitor()
        self._stopping.clear()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, args=(monitor,), name="hotplug-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        self._stopping.set()
        os.write(self._wake_w, b"x")
        self._thread.join(timeout)
        if self._thread.is_alive():  # only a callback that never returns can hold it
            log.warning("hotplug watcher still busy in its callback after %.0f s; leaving it", timeout)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._thread, self._wake_r, self._wake_w = None, -1, -1

    def _open_monitor(self) -> pyudev.Monitor:
        try:
            monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=self.source)
            for subsystem in TOPOLOGY_SUBSYSTEMS:
                monitor.filter_by(subsystem)
            monitor.start()
        except (OSError, ValueError) as exc:
            raise HotplugWatchError(f"cannot watch {self.source} uevents: {exc}") from exc
        return monitor

    def _run(self, monitor: pyudev.Monitor) -> None:
        while not self._stopping.is_set():
            ready, _, _ = select.select([monitor, self._wake_r], [], [], self._debouncer.timeout(self._clock()))
            if monitor in ready:
                self._drain(monitor)
            self._deliver(self._debouncer.take_due(self._clock()))

    def _drain(self, monitor: pyudev.Monitor) -> None:
        try:
            while (device := monitor.poll(timeout=0)) is not None:
                event = TopologyEvent(device.subsystem or "", device.action or "", device.sys_name)
                log.debug("uevent %s %s", event.subsystem, event)
                self._debouncer.add(event, self._clock())
        except OSError as exc:  # ENOBUFS: a storm overflowed the socket, so events were lost
            log.warning("uevents lost (%s): reporting a topology change anyway", exc)
            self._debouncer.add(LOST_EVENTS, self._clock())

    def _deliver(self, batch: tuple[TopologyEvent, ...]) -> None:
        if not batch:
            return
        try:
            self._on_change(batch)
        except Exception:  # a broken callback must not end the watch
            log.exception("topology change callback failed for %s", ", ".join(map(str, batch)))
