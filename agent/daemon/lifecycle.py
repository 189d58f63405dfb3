"""libvirt's domain lifecycle events, on a connection of their own, handed to the roles.

libvirt calls `_on_event` on its event loop thread (agent.libvirt_ops.connection.ensure_event_loop),
which must never block: the callback only reads the domain's name and UUID (libvirt answers those
from the event itself) and hands a `DomainLifecycle` to the context's hub, which runs the listeners
on its own thread.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import libvirt

from agent.daemon.context import DomainEvents, DomainLifecycle
from agent.libvirt_ops.connection import close_quietly, ensure_event_loop, open_connection
from agent.libvirt_ops.errors import LibvirtConnectionError

log = logging.getLogger("compute_agent.daemon.lifecycle")

#: libvirt's VIR_DOMAIN_EVENT_* numbers as the words DomainLifecycle carries
EVENT_WORDS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}
#: events after which what this host offers changed (a domain now holds, or no longer holds, resources)
HOLDING_CHANGES = frozenset({"started", "stopped", "undefined", "crashed"})


class LifecycleEvents:
    """Subscribes to every domain's lifecycle events on `uri`; `close()` ends it."""

    def __init__(self, uri: str, hub: DomainEvents, changed: Callable[[str], None]) -> None:
        self.uri, self._hub, self._changed = uri, hub, changed
        self._conn: Any = None
        self._callback_id: int | None = None

    def open(self) -> bool:
        """Start receiving events; False (and a warning) when libvirt cannot deliver them."""
        if not ensure_event_loop():
            return False
        try:
            self._conn = open_connection(self.uri)
            self._callback_id = self._conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_event, None
            )
        except (LibvirtConnectionError, libvirt.libvirtError) as exc:
            log.warning("no domain lifecycle events from %s (%s): claims are followed by polling only", self.uri, exc)
            self.close()
            return False
        return True

    def ensure_open(self) -> None:
        """Subscribe again when the connection died (libvirtd restarted); a no-op while it lives."""
        if self._conn is not None and _alive(self._conn):
            return
        if self._conn is not None:
            log.warning("lifecycle events: the connection to %s died; subscribing again", self.uri)
        self.close()
        self.open()

    def close(self) -> None:
        if self._conn is not None and self._callback_id is not None:
            try:
                self._conn.domainEventDeregisterAny(self._callback_id)
            except libvirt.libvirtError as exc:
                log.debug("deregistering lifecycle events: %s", exc)
        close_quietly(self._conn)
        self._conn, self._callback_id = None, None

    def _on_event(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        try:
            seen = DomainLifecycle(dom.UUIDString().lower(), dom.name(), EVENT_WORDS.get(event, str(event)), detail)
        except libvirt.libvirtError as exc:
            log.debug("lifecycle event %s for an unreadable domain: %s", event, exc)
            return
        log.debug("domain %s %s (detail %d)", seen.name, seen.event, detail)
        self._hub.emit(seen)
        if seen.event in HOLDING_CHANGES:
            self._changed(f"domain {seen.name} {seen.event}")


def _alive(conn: Any) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False
