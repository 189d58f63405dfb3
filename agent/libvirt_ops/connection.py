"""Opening libvirt connections with typed errors.

``open_connection`` never lets a ``libvirt.libvirtError`` escape: failures become
``LibvirtConnectionError`` carrying the URI, libvirt's error code and message.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Iterator

from agent.libvirt_ops.errors import DomainNotFound, LibvirtConnectionError, LibvirtOpError

LOG = logging.getLogger("compute_agent.libvirt")


_quiet = False


def _libvirt() -> Any:
    global _quiet
    try:
        import libvirt
    except ImportError as exc:  # pragma: no cover - depends on the host
        raise LibvirtConnectionError(
            "python module 'libvirt' is missing (install libvirt-python)", libvirt_message=str(exc)
        ) from None
    if not _quiet:
        # libvirt prints every error to stderr by default; ours are raised as typed errors and
        # logged once, so its own copy is noise in journald and on the terminal.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        _quiet = True
    return libvirt


def open_connection(uri: str, *, readonly: bool = False) -> Any:
    """Open a libvirt connection to `uri` (``libvirt.open`` / ``openReadOnly``)."""
    libvirt = _libvirt()
    try:
        conn = libvirt.openReadOnly(uri) if readonly else libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise LibvirtConnectionError.from_libvirt(f"cannot connect to {uri}", exc, uri=uri) from None
    if conn is None:  # very old bindings returned None instead of raising
        raise LibvirtConnectionError(f"cannot connect to {uri}", uri=uri)
    LOG.debug("connected to %s", uri)
    return conn


def close_quietly(conn: Any) -> None:
    """Close a connection, logging (not raising) any error."""
    if conn is None:
        return
    try:
        conn.close()
    except Exception as exc:  # closing must never mask the real outcome
        LOG.debug("closing libvirt connection failed: %s", exc)


@contextlib.contextmanager
def connection(uri: str, *, readonly: bool = False) -> Iterator[Any]:
    """``with connection(uri) as conn:`` opens and always closes a connection."""
    conn = open_connection(uri, readonly=readonly)
    try:
        yield conn
    finally:
        close_quietly(conn)


def _looks_like_uuid(text: str) -> bool:
    import uuid as _uuid

    try:
        _uuid.UUID(text)
    except ValueError:
        return False
    return len(text.replace("-", "")) == 32


def lookup_domain(conn: Any, name_or_uuid: str) -> Any:
    """The domain named `name_or_uuid` (a UUID string is tried as a UUID first)."""
    libvirt = _libvirt()
    try:
        if _looks_like_uuid(name_or_uuid):
            try:
                return conn.lookupByUUIDString(name_or_uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
        return conn.lookupByName(name_or_uuid)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise DomainNotFound.from_libvirt(f"domain {name_or_uuid!r} not found", exc, domain=name_or_uuid) from None
        raise LibvirtOpError.from_libvirt(f"looking up domain {name_or_uuid!r}", exc) from None


_event_loop_lock = threading.Lock()
_event_loop_state: bool | None = None  # None: not tried yet; True: running; False: unavailable


def ensure_event_loop() -> bool:
    """Run libvirt's default event loop in a daemon thread (once per process).

    Connections opened afterwards get keepalives and can deliver domain events (the migration
    runner uses VIR_DOMAIN_EVENT_ID_JOB_COMPLETED for the final statistics of a job whose source
    domain is gone by the time migrateToURI3 returns). Returns False if it cannot be set up (e.g.
    another event loop implementation was registered first); callers then do without events.
    """
    global _event_loop_state
    libvirt = _libvirt()
    with _event_loop_lock:
        if _event_loop_state is not None:
            return _event_loop_state
        try:
            libvirt.virEventRegisterDefaultImpl()
        except libvirt.libvirtError as exc:
            LOG.warning("cannot register libvirt's event loop: %s", exc)
            _event_loop_state = False
            return False

        def loop() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except libvirt.libvirtError as exc:  # pragma: no cover - keep the loop alive
                    LOG.warning("libvirt event loop iteration failed: %s", exc)

        threading.Thread(target=loop, name="libvirt-events", daemon=True).start()
        _event_loop_state = True
        return True
