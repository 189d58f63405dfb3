"""Host NUMA topology from libvirt capabilities XML, and the sysfs/libvirt cross-check.

- `topology_from_capabilities(xml)` parses ``<host><topology><cells>`` of ``virConnectGetCapabilities``.
  Capabilities carry page *totals* only, so every pool's ``free`` is set to its ``total`` (an upper
  bound; `agent.libvirt_ops.host.topology_from_libvirt` fills real free counts).  They do not say which CPUs are offline
  or isolated: ``online_cpus`` is the union of the cells' CPUs, ``offline``/``isolated`` are empty.
- `compare_topologies(sysfs, caps)` lists human-readable disagreements.
- `discover(...)` is what ``compute-agent discover`` calls: sysfs wins, capabilities cross-check it
  or stand in for it when sysfs cannot be read.

XML hardening (stdlib only, no extra dependency): documents over `MAX_XML_BYTES` are refused, and so
is any DOCTYPE (hence any DTD, entity declaration or external entity); with no DTD, expat only knows
the five predefined entities, so entity-expansion and XXE attacks cannot happen.  Any problem raises
`DomainXMLError`.
"""

from __future__ import annotations

import logging
import re
import socket
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from agent.cpuset import parse_kernel_cpu_list
from agent.errors import DiscoveryError, DomainXMLError
from agent.limits import MAX_HOST_CPU_ID
from agent.numa.discovery import discover_sysfs, sibling_partition
from agent.numa.topology import HostTopology, NumaCell, PagePool
from agent.units import SMALL_PAGE_KB, scale_to_kib

__all__ = [
    "MAX_XML_BYTES",
    "MEMORY_TOLERANCE",
    "compare_topologies",
    "discover",
    "parse_xml",
    "topology_from_capabilities",
]

log = logging.getLogger("compute_agent.discovery")

#: Capabilities of a 2-socket host with every machine type listed are ~100 KiB; allow plenty.
MAX_XML_BYTES = 8 * 1024 * 1024
#: Relative difference of a cell's memory that `compare_topologies` tolerates.
MEMORY_TOLERANCE = 0.01

_FORBIDDEN = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


def parse_xml(xml: str | bytes, what: str = "capabilities") -> ET.Element:
    """Parse an XML document safely (size limit, no DOCTYPE/entities); errors -> `DomainXMLError`."""
    if isinstance(xml, bytes):
        if len(xml) > MAX_XML_BYTES:
            raise DomainXMLError(f"{what} XML larger than {MAX_XML_BYTES} bytes")
        try:
            xml = xml.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DomainXMLError(f"{what} XML is not UTF-8: {exc}") from None
    if not isinstance(xml, str):
        raise DomainXMLError(f"{what} XML must be str or bytes, not {type(xml).__name__}")
    if len(xml) > MAX_XML_BYTES:
        raise DomainXMLError(f"{what} XML larger than {MAX_XML_BYTES} characters")
    if _FORBIDDEN.search(xml):
        raise DomainXMLError(f"{what} XML contains a DOCTYPE or ENTITY declaration (refused)")
    try:
        return ET.fromstring(xml)
    except ET.ParseError as exc:
        raise DomainXMLError(f"{what} XML is not well-formed: {exc}") from None
    except (ValueError, LookupError) as exc:  # e.g. an unknown encoding in the XML declaration
        raise DomainXMLError(f"{what} XML cannot be decoded: {exc}") from None


def _int(text: str | None, where: str, *, lo: int = 0, hi: int = 1 << 60) -> int:
    t = (text or "").strip()
    # digit count first: int() of more than 4300 digits raises a plain ValueError
    if not (t.isascii() and t.isdigit()) or len(t) > len(str(hi)) or not lo <= int(t) <= hi:
        raise DomainXMLError(f"capabilities {where}: expected an integer in [{lo}, {hi}], got {t[:40]!r}")
    return int(t)


def _kib(value: int, unit: str | None, where: str) -> int:
    try:
        return scale_to_kib(value, unit)
    except ValueError as exc:
        raise DomainXMLError(f"capabilities {where}: {exc}") from None


def _cpus(text: str, where: str) -> frozenset[int]:
    try:
        return parse_kernel_cpu_list(text)
    except ValueError as exc:
        raise DomainXMLError(f"capabilities {where}: cannot parse CPU list {text!r}: {exc}") from None


def topology_from_capabilities(xml: str | bytes, hostname: str | None = None) -> HostTopology:
    """Build a `HostTopology` from libvirt capabilities XML.

    Page pools: capabilities give totals only, so ``free == total`` for every pool (including the
    4 KiB one libvirt computes as ``(MemTotal - hugepage memory) / 4``).  Offline CPUs (listed by some
    libvirt versions with an ``id`` and no ``siblings``) are impossible to tell apart from online CPUs
    whose topology could not be read, so every listed CPU counts as online; a missing ``siblings``
    attribute gives a group of one.  A cell without ``<memory>`` (libvirt omits it when 0) has 0 KiB.
    """
    root = parse_xml(xml)
    if root.tag != "capabilities":
        raise DomainXMLError(f"capabilities XML: root element is <{root.tag}>, expected <capabilities>")
    cells_el = root.find("./host/topology/cells")
    if cells_el is None:
        raise DomainXMLError("capabilities XML has no <host><topology><cells> (no NUMA information)")

    cells: list[NumaCell] = []
    owner: dict[int, int] = {}
    for index, cell_el in enumerate(cells_el.findall("cell")):
        cell_id = _int(cell_el.get("id"), f"cell[{index}] id", hi=MAX_HOST_CPU_ID)
        where = f"cell {cell_id}"
        if any(c.id == cell_id for c in cells):
            raise DomainXMLError(f"capabilities {where}: duplicate cell id")

        mem_el = cell_el.find("memory")
        memory_kb = 0
        if mem_el is not None:
            memory_kb = _kib(_int(mem_el.text, f"{where} memory"), mem_el.get("unit"), f"{where} memory")

        pages: dict[int, PagePool] = {}
        for p in cell_el.findall("pages"):
            size_kb = _kib(_int(p.get("size"), f"{where} pages size", lo=1), p.get("unit"), f"{where} pages")
            if size_kb <= 0 or size_kb in pages:
                raise DomainXMLError(f"capabilities {where}: bad or duplicate page size {p.get('size')!r}")
            count = _int(p.text, f"{where} pages[{size_kb}]", hi=1 << 48) if (p.text or "").strip() else 0
            pages[size_kb] = PagePool(size_kb, count, count)

        distances: dict[int, int] = {}
        for s in cell_el.findall("./distances/sibling"):
            other = _int(s.get("id"), f"{where} distances sibling id", hi=MAX_HOST_CPU_ID)
            distances[other] = _int(s.get("value"), f"{where} distances sibling {other}", lo=1, hi=255)

        cpu_set: set[int] = set()
        sib_of: dict[int, frozenset[int]] = {}
        for cpu_el in cell_el.findall("./cpus/cpu"):
            cpu = _int(cpu_el.get("id"), f"{where} cpu id", hi=MAX_HOST_CPU_ID)
            if cpu in owner or cpu in cpu_set:
                raise DomainXMLError(f"capabilities {where}: CPU {cpu} listed twice")
            cpu_set.add(cpu)
            sibs = cpu_el.get("siblings")
            sib_of[cpu] = _cpus(sibs, f"{where} cpu {cpu} siblings") | {cpu} if sibs is not None else frozenset({cpu})
        owner.update((c, cell_id) for c in cpu_set)
        cpus = frozenset(cpu_set)

        cells.append(
            NumaCell(
                id=cell_id,
                cpus=cpus,
                siblings=sibling_partition(cpus, sib_of),
                memory_kb=memory_kb,
                pages=tuple(sorted(pages.values(), key=lambda p: p.size_kb)),
                distances=distances,
            )
        )
    if not cells:
        raise DomainXMLError("capabilities XML: <cells> lists no <cell>")

    return HostTopology(
        hostname=hostname if hostname is not None else socket.gethostname(),
        cells=tuple(sorted(cells, key=lambda c: c.id)),
        online_cpus=frozenset(owner),
    )


def _ids(values: Any) -> str:
    return "[" + ",".join(str(v) for v in sorted(values)) + "]"


def compare_topologies(sysfs: HostTopology, caps: HostTopology) -> list[str]:
    """Human-readable differences between a sysfs and a capabilities topology (empty: they agree).

    Compared: the set of cells; per common cell the CPUs, the SMT sibling groups, memory (beyond
    `MEMORY_TOLERANCE`), hugepage totals (a size missing on one side counts as 0 pages; 4 KiB pages are
    covered by the memory check and not compared), and distances (only when both sides have a row:
    libvirt omits distances on hosts without a SLIT).  Free counts are not compared: they move.
    """
    diffs: list[str] = []
    s_ids, c_ids = set(sysfs.cell_ids), set(caps.cell_ids)
    if s_ids - c_ids:
        diffs.append(f"cells {_ids(s_ids - c_ids)} are in sysfs but not in libvirt capabilities")
    if c_ids - s_ids:
        diffs.append(f"cells {_ids(c_ids - s_ids)} are in libvirt capabilities but not in sysfs")
    for cid in sorted(s_ids & c_ids):
        a, b = sysfs.cell(cid), caps.cell(cid)
        if a.cpus != b.cpus:
            parts = []
            if a.cpus - b.cpus:
                parts.append(f"only sysfs has {_ids(a.cpus - b.cpus)}")
            if b.cpus - a.cpus:
                parts.append(f"only capabilities have {_ids(b.cpus - a.cpus)}")
            diffs.append(f"cell {cid}: CPUs differ ({'; '.join(parts)})")
        elif a.siblings != b.siblings:
            only_a = sorted(set(a.siblings) - set(b.siblings))
            only_b = sorted(set(b.siblings) - set(a.siblings))
            diffs.append(
                f"cell {cid}: SMT sibling groups differ (sysfs {[list(g) for g in only_a]}, "
                f"capabilities {[list(g) for g in only_b]})"
            )
        big = max(a.memory_kb, b.memory_kb)
        if big and abs(a.memory_kb - b.memory_kb) > MEMORY_TOLERANCE * big:
            diffs.append(
                f"cell {cid}: memory differs by more than {MEMORY_TOLERANCE:.0%} "
                f"(sysfs {a.memory_kb} KiB, capabilities {b.memory_kb} KiB)"
            )
        sizes = {p.size_kb for p in a.pages} | {p.size_kb for p in b.pages}
        for size in sorted(sizes - {SMALL_PAGE_KB}):
            pa, pb = a.page_pool(size), b.page_pool(size)
            ta, tb = (pa.total if pa else 0), (pb.total if pb else 0)
            if ta != tb:
                diffs.append(f"cell {cid}: {size} KiB hugepages total differs (sysfs {ta}, capabilities {tb})")
        if a.distances and b.distances and dict(a.distances) != dict(b.distances):
            da = {str(k): v for k, v in sorted(a.distances.items())}
            db = {str(k): v for k, v in sorted(b.distances.items())}
            diffs.append(f"cell {cid}: distances differ (sysfs {da}, capabilities {db})")
    return diffs


def discover(
    sysfs_root: str | Path = "/sys",
    capabilities_xml: str | bytes | None = None,
    hostname: str | None = None,
) -> tuple[HostTopology, list[str]]:
    """Discover the host topology: sysfs wins, capabilities XML (the text, not a path) cross-checks.

    Returns ``(topology, warnings)``.  ``warnings`` lists every disagreement between sysfs and the
    capabilities (each also logged as a warning on ``compute_agent.discovery``) or, when sysfs cannot
    be read and capabilities were given, one entry saying the topology came from capabilities (free
    page counts are then upper bounds, offline/isolated CPUs unknown).

    Raises `DiscoveryError` when sysfs is unusable and no capabilities were given, and
    `DomainXMLError` when the given capabilities XML is malformed (an explicit input is wrong).
    """
    try:
        topo = discover_sysfs(sysfs_root, hostname)
    except DiscoveryError as exc:
        if capabilities_xml is None:
            raise
        caps = topology_from_capabilities(capabilities_xml, hostname)
        note = (
            f"sysfs unusable ({exc}); topology taken from libvirt capabilities "
            "(free page counts are totals, offline/isolated CPUs unknown)"
        )
        log.warning("%s", note)
        return caps, [note]
    if capabilities_xml is None:
        return topo, []
    caps = topology_from_capabilities(capabilities_xml, topo.hostname)
    diffs = compare_topologies(topo, caps)
    for d in diffs:
        log.warning("sysfs and libvirt capabilities disagree: %s (using sysfs)", d)
    return topo, diffs
