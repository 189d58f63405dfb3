"""The host behind a libvirt connection: its NUMA topology with live free page counts, and the
migration traits its libvirt and QEMU versions allow.

The pure readers live elsewhere (`agent.numa.capabilities` parses capabilities XML, `policy` holds
the feature -> minimum version table); this module only asks the connection and wraps every
libvirt error in a typed error of `agent.libvirt_ops.errors`.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from typing import Any, Mapping

from agent.errors import DiscoveryError
from agent.libvirt_ops.errors import LibvirtConnectionError, LibvirtOpError
from agent.libvirt_ops.policy import traits_for_versions
from agent.numa.capabilities import topology_from_capabilities
from agent.numa.topology import HostTopology, NumaCell, PagePool

__all__ = ["QEMU_DRIVER_TYPES", "host_traits", "topology_from_libvirt"]

log = logging.getLogger("compute_agent.discovery")

#: virConnectGetType of a QEMU/KVM host ("QEMU" for qemu:///system and qemu:///session).
QEMU_DRIVER_TYPES = frozenset({"QEMU"})


def _libvirt_error() -> type[BaseException]:
    try:
        import libvirt
    except ImportError:  # pragma: no cover - the binding is a hard dependency
        return Exception
    return libvirt.libvirtError


def _uri(conn: Any, lv_error: type[BaseException]) -> str:
    try:
        return str(conn.getURI())
    except lv_error:
        return "libvirt connection"


# --- topology ------------------------------------------------------------------------------------


def topology_from_libvirt(conn: Any, hostname: str | None = None) -> HostTopology:
    """Topology of the host behind an open libvirt connection, with real free page counts.

    Free counts come from ``virNodeGetFreePages`` per cell; where the driver does not support it
    (or omits a size), ``free`` stays equal to ``total``.  Free counts above the total (libvirt's 4 KiB
    count is MemFree/4 and is not clamped) are clamped.  Connection errors raise `DiscoveryError`
    naming the connection URI.
    """
    lv_error = _libvirt_error()
    uri = _uri(conn, lv_error)
    try:
        xml = conn.getCapabilities()
    except lv_error as exc:
        raise DiscoveryError(f"getCapabilities failed: {exc}", uri) from None
    if hostname is None:
        try:
            hostname = conn.getHostname()
        except lv_error:
            hostname = socket.gethostname()
    topo = topology_from_capabilities(xml, hostname)
    cells = tuple(_with_free_pages(cell, _free_pages(conn, cell, uri, lv_error)) for cell in topo.cells)
    return HostTopology(hostname=topo.hostname, cells=cells, online_cpus=topo.online_cpus)


def _free_pages(conn: Any, cell: NumaCell, uri: str, lv_error: type[BaseException]) -> dict[int, int]:
    """page size -> free pages of `cell` from virNodeGetFreePages; {} where the driver cannot say."""
    sizes = [p.size_kb for p in cell.pages]
    if not sizes:
        return {}
    try:
        answer = conn.getFreePages(sizes, cell.id, 1) or {}
    except lv_error as exc:
        log.debug("getFreePages(%s, cell %d) on %s failed: %s", sizes, cell.id, uri, exc)
        return {}
    per_cell = answer.get(cell.id, answer.get(str(cell.id), {})) if isinstance(answer, dict) else {}
    return _int_counts(per_cell) if isinstance(per_cell, Mapping) else {}


def _int_counts(per_cell: Mapping[Any, Any]) -> dict[int, int]:
    free: dict[int, int] = {}
    for size, count in per_cell.items():
        try:
            free[int(size)] = int(count)
        except (TypeError, ValueError):
            continue
    return free


def _with_free_pages(cell: NumaCell, free: Mapping[int, int]) -> NumaCell:
    pages = tuple(PagePool(p.size_kb, p.total, max(0, min(free.get(p.size_kb, p.free), p.total))) for p in cell.pages)
    return dataclasses.replace(cell, pages=pages)


# --- migration traits ----------------------------------------------------------------------------


def host_traits(conn: Any) -> frozenset[str]:
    """Migration traits of the host behind a libvirt connection: `policy.traits_for_versions` of
    the daemon's libvirt version and the QEMU version. A driver that is not QEMU (the test driver,
    LXC, Xen) has no QEMU migration features: no traits, and a warning. Raises
    LibvirtConnectionError when the connection cannot answer, LibvirtOpError on a nonsense answer."""
    lv_error = _libvirt_error()
    uri = _uri(conn, lv_error)
    try:
        driver, lib_version, hv_version = conn.getType(), conn.getLibVersion(), conn.getVersion()
    except lv_error as exc:
        raise LibvirtConnectionError.from_libvirt(
            f"{uri}: cannot read the driver type and versions", exc, uri=uri
        ) from None
    if driver not in QEMU_DRIVER_TYPES:
        log.warning("%s: driver %r is not QEMU/KVM: no live-migration traits", uri, driver)
        return frozenset()
    try:
        return traits_for_versions(int(lib_version), int(hv_version))
    except (TypeError, ValueError):
        raise LibvirtOpError(f"{uri}: version numbers {lib_version!r}, {hv_version!r} are not integers") from None
