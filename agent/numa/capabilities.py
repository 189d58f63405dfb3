"""Host NUMA topology from libvirt capabilities XML, and the sysfs/libvirt cross-check.

- `topology_from_capabilities(xml)` parses ``<host><topology><cells>`` of ``virConnectGetCapabilities``.
  Capabilities carry page *totals* only, so every pool's ``free`` is set to its ``total`` (an upper
  bound; `agent.libvirt_ops.host.topology_from_libvirt` fills real free counts).  They do not say which CPUs are offline
  or isolated: ``online_cpus`` is the union of the cells' CPUs, ``offline``/``isolated`` are empty.
- `compare_topologies(sysfs, caps)` lists human-readable disagreements.
- `discover(...)` is what ``compute-agent discover`` calls: sysfs wins, capabilities cross-check it
  or stand in for it when sysfs cannot be read.

XML hardening: agent.xmlsafe, the parser domain XML uses too (documents over `MAX_XML_BYTES`, too
deep or with too many elements are refused, and so is any DOCTYPE, entity declaration or external
entity). Any problem raises `DomainXMLError`.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Iterable, Mapping

from agent.cpuset import format_id_list, parse_kernel_cpu_list
from agent.errors import DiscoveryError, DomainXMLError
from agent.limits import MAX_DOC_PAGE_COUNT, MAX_HOST_CPU_ID, MAX_SMT_SIBLINGS
from agent.numa.discovery import discover_sysfs, sibling_partition
from agent.numa.topology import HostTopology, NumaCell, PagePool, cell_problem, host_size_problem, numa_cell
from agent.numbers import uint_or_none
from agent.units import SMALL_PAGE_KB, scale_to_kib
from agent.xmlsafe import Node, parse, to_bytes

__all__ = [
    "MEMORY_TOLERANCE",
    "compare_topologies",
    "discover",
    "parse_xml",
    "topology_from_capabilities",
]

log = logging.getLogger("compute_agent.discovery")

#: Relative difference of a cell's memory that `compare_topologies` tolerates.
MEMORY_TOLERANCE = 0.01


def parse_xml(xml: str | bytes, what: str = "capabilities", root: str = "capabilities") -> Node:
    """Parse an XML document with agent.xmlsafe (size, depth and element limits, no DOCTYPE or
    entities; bytes must be UTF-8) into its <`root`> element; errors -> `DomainXMLError`."""
    data, _ = to_bytes(xml, what, require_utf8=True)
    return parse(data, what=what, root=root, utf8=True)


def _int(text: str | None, where: str, *, lo: int = 0, hi: int = 1 << 60) -> int:
    value = uint_or_none(text or "", max_digits=len(str(hi)))
    if value is None or not lo <= value <= hi:
        raise DomainXMLError(f"capabilities {where}: expected an integer in [{lo}, {hi}], got {(text or '')[:40]!r}")
    return value


def _kib(value: int, unit: str | None, where: str) -> int:
    try:
        return scale_to_kib(value, unit)
    except ValueError as exc:
        raise DomainXMLError(f"capabilities {where}: {exc}") from None


def _cpus(text: str, where: str, max_ids: int) -> frozenset[int]:
    try:
        return parse_kernel_cpu_list(text, max_ids=max_ids)
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
    cells_el = parse_xml(xml).find_path("host/topology/cells")
    if cells_el is None:
        raise DomainXMLError("capabilities XML has no <host><topology><cells> (no NUMA information)")
    cell_els = cells_el.find_all("cell")
    _check_size(cell_els)
    cells: list[NumaCell] = []
    owner: dict[int, int] = {}  # CPU -> cell, to refuse a CPU listed by two cells
    cell_ids: set[int] = set()
    for index, cell_el in enumerate(cell_els):
        cell = _read_cell(cell_el, index, owner, cell_ids)
        owner.update((c, cell.id) for c in cell.cpus)
        cell_ids.add(cell.id)
        cells.append(cell)
    if not cells:
        raise DomainXMLError("capabilities XML: <cells> lists no <cell>")
    return HostTopology(
        hostname=hostname if hostname is not None else socket.gethostname(),
        cells=tuple(sorted(cells, key=lambda c: c.id)),
        online_cpus=frozenset(owner),
    )


def _check_size(cell_els: list[Node]) -> None:
    """The host bounds, before any per-cell work (a 30,000-cell document is refused at once)."""
    cpu_count = sum(len(cpus.children) for c in cell_els for cpus in c.find_all("cpus"))
    problem = host_size_problem(len(cell_els), cpu_count)
    if problem:
        raise DomainXMLError(f"capabilities: {problem}")


def _read_cell(cell_el: Node, index: int, owner: Mapping[int, int], cell_ids: set[int]) -> NumaCell:
    """One <cell id=...>: memory, page pools, distances, CPUs and their SMT siblings."""
    cell_id = _int(cell_el.attrs.get("id"), f"cell[{index}] id", hi=MAX_HOST_CPU_ID)
    where = f"cell {cell_id}"
    if cell_id in cell_ids:
        raise DomainXMLError(f"capabilities {where}: duplicate cell id")
    mem_el = cell_el.find_path("memory")
    memory_kb = 0
    if mem_el is not None:
        memory_kb = _kib(_int(mem_el.text, f"{where} memory"), mem_el.attrs.get("unit"), f"{where} memory")
    pages = _read_pages(cell_el, where)
    distances = _read_distances(cell_el, where)
    sib_of = _read_cpus(cell_el, where, owner)
    cpus = frozenset(sib_of)
    cell = numa_cell(cell_id, cpus, sibling_partition(cpus, sib_of), memory_kb, pages, distances)
    problem = cell_problem(cell)
    if problem:
        raise DomainXMLError(f"capabilities {where}: {problem}")
    return cell


def _read_pages(cell_el: Node, where: str) -> list[PagePool]:
    """<pages size= unit=>count</pages>: totals only, so free == total."""
    pages: dict[int, PagePool] = {}
    for p in cell_el.find_all("pages"):
        size = p.attrs.get("size")
        size_kb = _kib(_int(size, f"{where} pages size", lo=1), p.attrs.get("unit"), f"{where} pages")
        if size_kb <= 0 or size_kb in pages:
            raise DomainXMLError(f"capabilities {where}: bad or duplicate page size {size!r}")
        count = _int(p.text, f"{where} pages[{size_kb}]", hi=MAX_DOC_PAGE_COUNT) if p.text.strip() else 0
        pages[size_kb] = PagePool(size_kb, count, count)
    return list(pages.values())


def _read_distances(cell_el: Node, where: str) -> dict[int, int]:
    """<distances><sibling id= value=>: SLIT distances, 1..255."""
    distances: dict[int, int] = {}
    for s in cell_el.iter_path("distances/sibling"):
        other = _int(s.attrs.get("id"), f"{where} distances sibling id", hi=MAX_HOST_CPU_ID)
        distances[other] = _int(s.attrs.get("value"), f"{where} distances sibling {other}", lo=1, hi=255)
    return distances


def _read_cpus(cell_el: Node, where: str, owner: Mapping[int, int]) -> dict[int, frozenset[int]]:
    """<cpus><cpu id= siblings=>: CPU -> its SMT siblings (itself included), each CPU listed once."""
    sib_of: dict[int, frozenset[int]] = {}
    for cpu_el in cell_el.iter_path("cpus/cpu"):
        cpu = _int(cpu_el.attrs.get("id"), f"{where} cpu id", hi=MAX_HOST_CPU_ID)
        if cpu in owner or cpu in sib_of:
            raise DomainXMLError(f"capabilities {where}: CPU {cpu} listed twice")
        sibs = cpu_el.attrs.get("siblings")
        sib_of[cpu] = (
            _cpus(sibs, f"{where} cpu {cpu} siblings", MAX_SMT_SIBLINGS) | {cpu}
            if sibs is not None
            else frozenset({cpu})
        )
    return sib_of


def _ids(values: Iterable[int]) -> str:
    return f"[{format_id_list(values, at_most=None)}]"


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
        for compare in (_cpu_diffs, _memory_diffs, _hugepage_diffs, _distance_diffs):
            diffs.extend(f"cell {cid}: {d}" for d in compare(a, b))
    return diffs


def _cpu_diffs(a: NumaCell, b: NumaCell) -> list[str]:
    """CPUs, else (same CPUs) the SMT sibling groups."""
    if a.cpus != b.cpus:
        parts = []
        if a.cpus - b.cpus:
            parts.append(f"only sysfs has {_ids(a.cpus - b.cpus)}")
        if b.cpus - a.cpus:
            parts.append(f"only capabilities have {_ids(b.cpus - a.cpus)}")
        return [f"CPUs differ ({'; '.join(parts)})"]
    if a.siblings != b.siblings:
        only_a = sorted(set(a.siblings) - set(b.siblings))
        only_b = sorted(set(b.siblings) - set(a.siblings))
        return [
            f"SMT sibling groups differ (sysfs {[list(g) for g in only_a]}, capabilities {[list(g) for g in only_b]})"
        ]
    return []


def _memory_diffs(a: NumaCell, b: NumaCell) -> list[str]:
    big = max(a.memory_kb, b.memory_kb)
    if big and abs(a.memory_kb - b.memory_kb) > MEMORY_TOLERANCE * big:
        return [
            f"memory differs by more than {MEMORY_TOLERANCE:.0%} "
            f"(sysfs {a.memory_kb} KiB, capabilities {b.memory_kb} KiB)"
        ]
    return []


def _hugepage_diffs(a: NumaCell, b: NumaCell) -> list[str]:
    diffs = []
    sizes = {p.size_kb for p in a.pages} | {p.size_kb for p in b.pages}
    for size in sorted(sizes - {SMALL_PAGE_KB}):
        pa, pb = a.page_pool(size), b.page_pool(size)
        ta, tb = (pa.total if pa else 0), (pb.total if pb else 0)
        if ta != tb:
            diffs.append(f"{size} KiB hugepages total differs (sysfs {ta}, capabilities {tb})")
    return diffs


def _distance_diffs(a: NumaCell, b: NumaCell) -> list[str]:
    if a.distances and b.distances and dict(a.distances) != dict(b.distances):
        da = {str(k): v for k, v in sorted(a.distances.items())}
        db = {str(k): v for k, v in sorted(b.distances.items())}
        return [f"distances differ (sysfs {da}, capabilities {db})"]
    return []


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
