"""Read a domain's placement from its XML: `parse_domain(xml) -> DomainPlacement`.

One small reader per element (identity, <vcpu>, <cpu><numa>, <memory>, <cputune>, <numatune>,
<memoryBacking>, <metadata>). Parsing is agent.xmlsafe's (no DTDs or entities, size, depth and
element limits); every problem raises DomainXMLError naming the element and attribute. Pure: no
I/O, no libvirt.
"""

from __future__ import annotations

import json
from typing import Mapping

from agent.cpuset import format_cpu_set, parse_cpu_set
from agent.errors import DomainXMLError
from agent.libvirt_ops.domain_model import PLACEMENT_NS, DomainPlacement, GuestNumaCell, HugepageBacking
from agent.limits import MAX_METADATA_CHARS, MAX_VCPUS
from agent.units import is_page_size, scale_to_kib
from agent.xmlsafe import Node, parse, to_bytes, uint, where

__all__ = ["parse_domain", "placement_elements", "read_domain"]


def parse_domain(xml: str | bytes) -> DomainPlacement:
    """Read what a domain's XML says about its placement. Raises DomainXMLError on anything
    malformed, unsafe (DTD/entities) or larger than MAX_XML_BYTES."""
    data, utf8 = to_bytes(xml, "domain")
    return read_domain(parse(data, what="domain", root="domain", utf8=utf8))


def read_domain(root: Node) -> DomainPlacement:
    """The DomainPlacement of a parsed <domain> (the checks run in document-reading order)."""
    name, uuid = _read_identity(root)
    vcpus, vcpu_cpuset = _read_vcpu(root)
    guest_cells = _read_guest_cells(root, vcpus)
    memory_kib = _read_memory(root, guest_cells)
    vcpu_pins, emulator_pins, iothread_pins = _read_cputune(root, vcpus)
    numatune_mode, numatune_nodeset, memnodes = _read_numatune(root)
    return DomainPlacement(
        name=name,
        uuid=uuid,
        vcpus=vcpus,
        memory_kib=memory_kib,
        vcpu_cpuset=vcpu_cpuset,
        vcpu_pins=vcpu_pins,
        emulator_pins=emulator_pins,
        iothread_pins=iothread_pins,
        guest_cells=guest_cells,
        numatune_mode=numatune_mode,
        numatune_nodeset=numatune_nodeset,
        memnodes=memnodes,
        hugepages=_read_hugepages(root),
        agent_placement=_read_metadata(root),
    )


# --- values --------------------------------------------------------------------------------------


def _scale_to_kib(value: str, unit: str | None, where_: str) -> int:
    """libvirt memory units (virScaleInteger): b/bytes; k, KiB (1024) vs KB (1000); M, MiB, MB; ...
    Default KiB. Values are rounded up to whole KiB, as libvirt does."""
    n = uint(value)
    if n is None:
        raise DomainXMLError(f"{where_}: memory value {value[:40]!r} is not a non-negative integer")
    try:
        return scale_to_kib(n, unit)  # the same conversion as host capabilities
    except ValueError:
        raise DomainXMLError(f"{where_}: unknown memory unit {(unit or '').strip()!r}") from None


def _required(node: Node, attr: str) -> str:
    raw = node.attrs.get(attr)
    if raw is None:
        raise DomainXMLError(f"{where(node, attr)} is missing")
    return raw


def _attr_int(node: Node, attr: str) -> int:
    raw = _required(node, attr)
    value = uint(raw)
    if value is None:
        raise DomainXMLError(f"{where(node, attr)} = {raw[:40]!r} is not a non-negative integer")
    return value


def _cpu_set(node: Node, attr: str) -> frozenset[int]:
    raw = _required(node, attr)
    try:
        value = parse_cpu_set(raw)
    except ValueError as exc:
        raise DomainXMLError(f"{where(node, attr)} = {raw[:40]!r} is not a CPU/node set: {exc}") from None
    if not value:
        raise DomainXMLError(f"{where(node, attr)} = {raw!r} selects nothing")
    return value


def _optional_cpu_set(node: Node, attr: str) -> frozenset[int] | None:
    return _cpu_set(node, attr) if attr in node.attrs else None


def _memory_attr(node: Node, attr: str) -> int:
    return _scale_to_kib(_required(node, attr), node.attrs.get("unit"), where(node, attr))


# --- elements ------------------------------------------------------------------------------------


def _read_identity(root: Node) -> tuple[str, str]:
    """<name> (required) and <uuid>."""
    name_el = root.find_one("name")
    if name_el is None or not name_el.text.strip():
        raise DomainXMLError("<domain/name> is missing or empty")
    uuid_el = root.find_one("uuid")
    return name_el.text.strip(), uuid_el.text.strip() if uuid_el is not None else ""


def _read_vcpu(root: Node) -> tuple[int, frozenset[int] | None]:
    """<vcpu cpuset=...>N</vcpu>: the vCPU count (1 when absent) and the floating vCPUs' cpuset."""
    vcpu_el = root.find_one("vcpu")
    if vcpu_el is None:
        return 1, None
    count = uint(vcpu_el.text)
    if count is None or not 1 <= count <= MAX_VCPUS:
        raise DomainXMLError(f"<domain/vcpu> = {vcpu_el.text.strip()[:40]!r} is not a vCPU count (1-{MAX_VCPUS})")
    return count, _optional_cpu_set(vcpu_el, "cpuset")


def _read_guest_cells(root: Node, vcpus: int) -> tuple[GuestNumaCell, ...]:
    """<cpu><numa><cell id= cpus= memory= unit=>: unique ids, each vCPU in at most one cell."""
    cpu_el = root.find_one("cpu")
    numa_el = cpu_el.find_one("numa") if cpu_el is not None else None
    if numa_el is None:
        return ()
    cells = tuple(_read_guest_cell(cell, idx) for idx, cell in enumerate(numa_el.find_all("cell")))
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        raise DomainXMLError("<domain/cpu/numa/cell> ids are not unique")
    seen: set[int] = set()
    for c in cells:
        if c.cpus & seen:
            raise DomainXMLError(
                f"<domain/cpu/numa/cell> id {c.id}: vCPUs {format_cpu_set(c.cpus & seen)} in two cells"
            )
        if any(v >= vcpus for v in c.cpus):
            raise DomainXMLError(f"<domain/cpu/numa/cell> id {c.id}: cpus beyond the {vcpus} vCPUs")
        seen |= c.cpus
    return cells


def _read_guest_cell(cell: Node, index: int) -> GuestNumaCell:
    cell_id = _attr_int(cell, "id") if "id" in cell.attrs else index  # libvirt numbers cells in order
    cpus = _optional_cpu_set(cell, "cpus") or frozenset()
    return GuestNumaCell(id=cell_id, cpus=cpus, memory_kib=_memory_attr(cell, "memory"))


def _read_memory(root: Node, guest_cells: tuple[GuestNumaCell, ...]) -> int:
    """<memory unit=...>: required unless the guest cells give it."""
    memory_el = root.find_one("memory")
    if memory_el is not None:
        return _scale_to_kib(memory_el.text, memory_el.attrs.get("unit"), "<domain/memory>")
    if guest_cells:
        return sum(c.memory_kib for c in guest_cells)
    raise DomainXMLError("<domain/memory> is missing")


def _read_pins(parent: Node, tag: str, key: str, limit: int | None = None) -> dict[int, frozenset[int]]:
    """<tag key=N cpuset=...> children of `parent`: N -> cpuset, each N once (and < `limit`)."""
    pins: dict[int, frozenset[int]] = {}
    for pin in parent.find_all(tag):
        n = _attr_int(pin, key)
        if limit is not None and n >= limit:
            raise DomainXMLError(f"{where(pin, key)} = {n}: the domain has {limit} vCPUs")
        if n in pins:
            raise DomainXMLError(f"{where(pin, key)} = {n} is pinned twice")
        pins[n] = _cpu_set(pin, "cpuset")
    return pins


def _read_cputune(
    root: Node, vcpus: int
) -> tuple[dict[int, frozenset[int]], frozenset[int] | None, dict[int, frozenset[int]]]:
    """<cputune>: vcpupin (vCPU -> CPUs), emulatorpin, iothreadpin (I/O thread -> CPUs)."""
    cputune = root.find_one("cputune")
    if cputune is None:
        return {}, None, {}
    vcpu_pins = _read_pins(cputune, "vcpupin", "vcpu", limit=vcpus)
    emu = cputune.find_one("emulatorpin")
    emulator_pins = _cpu_set(emu, "cpuset") if emu is not None else None
    return vcpu_pins, emulator_pins, _read_pins(cputune, "iothreadpin", "iothread")


def _read_numatune(root: Node) -> tuple[str | None, frozenset[int] | None, dict[int, frozenset[int]]]:
    """<numatune>: <memory mode= nodeset=> and <memnode cellid= nodeset=> (guest cell -> host nodes)."""
    numatune = root.find_one("numatune")
    if numatune is None:
        return None, None, {}
    mode, nodeset = None, None
    mem = numatune.find_one("memory")
    if mem is not None:
        mode, nodeset = mem.attrs.get("mode", "strict"), _optional_cpu_set(mem, "nodeset")
    memnodes: dict[int, frozenset[int]] = {}
    for mn in numatune.find_all("memnode"):
        cell_id = _attr_int(mn, "cellid")
        if cell_id in memnodes:
            raise DomainXMLError(f"{where(mn, 'cellid')} = {cell_id} appears twice")
        memnodes[cell_id] = _cpu_set(mn, "nodeset")
    return mode, nodeset, memnodes


def _read_hugepages(root: Node) -> tuple[HugepageBacking, ...]:
    """<memoryBacking><hugepages>: one backing per <page>, or one of the default size when bare."""
    backing = root.find_one("memoryBacking")
    hp = backing.find_one("hugepages") if backing is not None else None
    if hp is None:
        return ()
    pages = hp.find_all("page")
    if not pages:
        return (HugepageBacking(None, None),)
    return tuple(HugepageBacking(_page_size(p), _optional_cpu_set(p, "nodeset")) for p in pages)


def _page_size(page: Node) -> int:
    size_kb = _memory_attr(page, "size")
    if not is_page_size(size_kb):
        raise DomainXMLError(f"{where(page, 'size')}: {size_kb} KiB is not a page size (a power of two >= 4 KiB)")
    return size_kb


def placement_elements(metadata: Node | None) -> list[Node]:
    """The children of <metadata> in the agent's namespace."""
    if metadata is None:
        return []
    return [c for c in metadata.children if c.namespace() == PLACEMENT_NS]


def _read_metadata(root: Node) -> Mapping[str, object] | None:
    """The placement JSON object the agent recorded in <metadata> (None without one)."""
    ours = placement_elements(root.find_one("metadata"))
    if len(ours) > 1:
        raise DomainXMLError(f"<domain/metadata> holds {len(ours)} elements in namespace {PLACEMENT_NS}")
    if not ours:
        return None
    what, text = f"<domain/metadata/{ours[0].tag}>", ours[0].text
    if len(text) > MAX_METADATA_CHARS:
        raise DomainXMLError(f"{what}: {len(text)} characters, more than the {MAX_METADATA_CHARS}-character limit")
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise DomainXMLError(f"{what}: invalid JSON: {exc}") from None
    except RecursionError:  # "[[[[...]]]]": the C decoder recurses once per level
        raise DomainXMLError(f"{what}: JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise DomainXMLError(f"{what}: JSON is not an object")
    return doc
