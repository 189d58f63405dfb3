"""Rewrite a domain's XML for a new Placement: `rewrite_for_placement(xml, placement)` gives the
destination XML of a live migration.

Method: agent.xmlsafe parses with byte spans; a chain of small per-element updates (in the manner
of Nova's `get_updated_guest_xml`) records splices of the owned elements; every other byte
(comments, quoting style, attribute order, devices, whitespace) is copied through unchanged. The
result is read back (`_verify`) and must say exactly what the placement says.

Owned by the rewriter:
  <vcpu cpuset=...> (and placement='auto' -> 'static', since libvirt ignores cpuset with auto)
  <cputune>/<vcpupin>, <emulatorpin>, <iothreadpin>
  <numatune>/<memory>, <memnode>: their nodesets only (each keeps its mode and other attributes)
  <metadata>/<ca:placement xmlns:ca=PLACEMENT_NS>
New elements go where the first removed one was, else at a libvirt-like position, each on its own
line with the indentation of its siblings, so rewriting twice gives the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterable
from xml.sax.saxutils import escape as _xml_escape

from agent.cpuset import format_cpu_set
from agent.errors import DomainXMLError
from agent.libvirt_ops.domain_model import PLACEMENT_NS, DomainPlacement, guest_cell_page_kib
from agent.libvirt_ops.domain_read import placement_elements, read_domain
from agent.numa.placement import CellPlacement, Placement
from agent.units import SMALL_PAGE_KB, mib_from_kib
from agent.xmlsafe import Node, Splicer, parse, to_bytes, uint

__all__ = ["floating_vcpus", "placement_json_text", "rewrite_for_placement"]

# where a missing container goes: after the last of these children of <domain> (libvirt's order)
_METADATA_AFTER = ("name", "uuid", "genid", "title", "description")
_CPUTUNE_AFTER = _METADATA_AFTER + (
    "metadata", "maxMemory", "memory", "currentMemory", "blkiotune", "memtune", "memoryBacking",
    "vcpu", "vcpus", "iothreads", "iothreadids", "defaultiothread",
)  # fmt: skip
_NUMATUNE_AFTER = _CPUTUNE_AFTER + ("cputune",)
# inside an existing <cputune> without pins: pins go before the first of these (libvirt's order)
_CPUTUNE_PINS_BEFORE = ("vcpusched", "iothreadsched", "emulatorsched", "cachetune", "memorytune")


def floating_vcpus(placement: Placement) -> frozenset[int]:
    """vCPUs of the placement that are not pinned one-to-one."""
    return frozenset(v for c in placement.cells for v in c.vcpus if v not in c.dedicated_vcpus)


def placement_json_text(placement: Placement) -> str:
    """The exact JSON the rewriter stores in <metadata>."""
    return json.dumps(placement.to_json(), sort_keys=True)


@dataclass(frozen=True, slots=True)
class _Rewrite:
    """Everything an element update needs: the parsed document, the splicer collecting the edits,
    what the domain says today, and what it must say afterwards."""

    root: Node
    splicer: Splicer
    unit: bytes  # the document's indentation step
    dom: DomainPlacement
    placement: Placement
    emulator_pins: tuple[int, ...]  # sorted
    floating_cpuset: frozenset[int]  # empty when every vCPU is dedicated


def rewrite_for_placement(
    xml: str | bytes, placement: Placement, *, floating_cpuset: frozenset[int] | None = None
) -> str:
    """The domain XML for the destination of a live migration, pinned to `placement`.

    - `cputune/vcpupin`: one per vCPU, cpuset = the vCPU's cpu_pins (floating vCPUs included).
    - `cputune/emulatorpin`: placement.emulator_pins (removed when the placement has none).
    - `cputune/iothreadpin`: only those already present, each pinned to emulator_pins (Nova's
      choice: I/O threads are emulator-side work and share the emulator's CPUs); removed when the
      placement has no emulator pins (they would point at source-host CPUs).
    - `<vcpu cpuset=...>`: with floating vCPUs, `floating_cpuset` if given, else the union of the
      floating vCPUs' pins; removed when every vCPU is dedicated. placement='auto' becomes 'static'.
    - `numatune/memory nodeset=<host cells>`, plus one `memnode cellid=G nodeset=H` per guest cell
      when the domain has a guest NUMA topology (libvirt refuses memnode without `<cpu><numa>`).
      Only the nodesets change: an existing element keeps its mode (strict, interleave, preferred,
      restrictive); a missing one is created with libvirt's default mode, strict. Memory is bound
      only where the placement pins it (`_binds_memory`): a floating guest without guest NUMA
      topology on small pages, which may overcommit RAM, gets no binding it did not have.
    - `<metadata><ca:placement xmlns:ca=PLACEMENT_NS>` = placement_json_text(placement).

    Guest-side elements (`cpu/numa`, hugepage `page@nodeset`, vCPU count) and every other byte of
    the document stay as they were. Raises DomainXMLError when the XML is bad or the placement is
    not for this domain (other vCPU count or guest cells).
    """
    data, _ = to_bytes(xml, "domain", require_utf8=True)
    root = parse(data, what="domain", root="domain", utf8=True, offsets=True)
    dom = read_domain(root)
    check_matches(dom, placement)
    if floating_cpuset is not None and not floating_cpuset:
        raise DomainXMLError("floating_cpuset must not be empty")
    splicer = Splicer(data)
    rw = _Rewrite(
        root=root,
        splicer=splicer,
        unit=splicer.indent_unit(root),
        dom=dom,
        placement=placement,
        emulator_pins=tuple(sorted(set(placement.emulator_pins))),
        floating_cpuset=_floating_cpuset(placement, floating_cpuset),
    )
    for update in _UPDATES:
        update(rw)
    out = splicer.apply().decode("utf-8")
    _verify(out, rw)
    return out


def _floating_cpuset(placement: Placement, given: frozenset[int] | None) -> frozenset[int]:
    """<vcpu cpuset>: `given`, else the union of the floating vCPUs' pins; empty without floating vCPUs."""
    floating = floating_vcpus(placement)
    if not floating:
        return frozenset()
    if given is not None:
        return frozenset(given)
    return frozenset(p for c in placement.cells for v in c.vcpus if v in floating for p in c.cpu_pins[v])


# --- per-element updates -------------------------------------------------------------------------


def _update_vcpu(rw: _Rewrite) -> None:
    """<vcpu cpuset=...>: the floating vCPUs' CPUs, or no cpuset; placement='auto' -> 'static'."""
    vcpu_el = rw.root.find_one("vcpu")
    if vcpu_el is None:
        if rw.floating_cpuset:
            raise DomainXMLError("domain has no <vcpu> element to carry the floating vCPUs' cpuset")
        return
    changes: dict[str, str | None] = {"cpuset": format_cpu_set(rw.floating_cpuset) if rw.floating_cpuset else None}
    if vcpu_el.attrs.get("placement") == "auto":
        changes["placement"] = "static"
    rw.splicer.edit_attrs(vcpu_el, changes)


def _cputune_items(rw: _Rewrite, with_iothreads: bool) -> list[bytes]:
    pins = {v: c.cpu_pins[v] for c in rw.placement.cells for v in c.vcpus}
    items = [f"<vcpupin vcpu='{v}' cpuset='{format_cpu_set(pins[v])}'/>".encode() for v in sorted(pins)]
    if rw.emulator_pins:
        emu = format_cpu_set(rw.emulator_pins)
        items.append(f"<emulatorpin cpuset='{emu}'/>".encode())
        if with_iothreads:
            items += [f"<iothreadpin iothread='{t}' cpuset='{emu}'/>".encode() for t in rw.dom.iothread_pins]
    return items


def _update_cputune(rw: _Rewrite) -> None:
    """<cputune>: vcpupin per vCPU, emulatorpin, and the existing iothreadpins on the emulator's CPUs."""
    cputune = rw.root.find_one("cputune")
    if cputune is None:
        rw.splicer.create_container(rw.root, "cputune", _cputune_items(rw, False), rw.unit, _CPUTUNE_AFTER)
        return
    owned = [c for c in cputune.children if c.tag in ("vcpupin", "emulatorpin", "iothreadpin")]
    rw.splicer.replace_children(cputune, owned, _cputune_items(rw, True), rw.unit, before=_CPUTUNE_PINS_BEFORE)


def _update_numatune(rw: _Rewrite) -> None:
    """<numatune>: only the nodesets change (the placement's host cells); every element keeps its
    mode (strict, interleave, preferred, restrictive) and its other attributes. What is missing is
    created in libvirt's default mode, strict: <memory> on the placement's host cells, one <memnode>
    per guest cell when the domain has a guest NUMA topology (libvirt refuses memnode without
    `<cpu><numa>`); a memnode of no guest cell goes. Nothing is bound that the placement does not
    pin (`_binds_memory`)."""
    numatune = rw.root.find_one("numatune")
    binds = _binds_memory(rw.dom, rw.placement)
    if numatune is None:
        if binds:
            items = [_memory_item(rw), *(_memnode_item(c) for c in _memnode_cells(rw, frozenset()))]
            rw.splicer.create_container(rw.root, "numatune", items, rw.unit, _NUMATUNE_AFTER)
        return
    memory = numatune.find_one("memory")
    if memory is not None and binds:
        rw.splicer.edit_attrs(memory, _nodeset_change(memory, rw.placement.host_nodeset))
    kept = _update_memnodes(rw, numatune)
    front = [_memory_item(rw)] if memory is None and binds else []
    back = [_memnode_item(c) for c in _memnode_cells(rw, frozenset(kept))]
    if kept and front:  # libvirt's order: <memory> before the memnodes
        rw.splicer.replace_children(numatune, [], front, rw.unit, before=("memnode",))
        front = []
    if front or back:
        rw.splicer.replace_children(numatune, [], front + back, rw.unit)


def _binds_memory(dom: DomainPlacement, placement: Placement) -> bool:
    """Whether the destination XML binds the guest's memory to the placement's host cells: when the
    placement pins it - a guest NUMA topology, hugepages (drawn from one cell's pools), dedicated
    vCPUs or an isolated emulator (the fitter charges those to the cell, never overcommitted) - or
    when the domain already had a binding (<numatune><memory nodeset>: re-pointed, mode kept).
    A floating guest without NUMA topology on small pages is the one the fitter lets overcommit RAM
    (ram_allocation_ratio): a strict binding to one node could run that node out of memory, so it
    gets no binding it did not have (Nova binds nothing for an instance without NUMA topology)."""
    if dom.guest_cells or dom.numatune_nodeset is not None or placement.emulator_isolated:
        return True
    return any(c.dedicated_vcpus or c.pagesize_kb != SMALL_PAGE_KB for c in placement.cells)


def _update_memnodes(rw: _Rewrite, numatune: Node) -> dict[int, Node]:
    """Point each existing memnode of a guest cell at its host cell (mode kept), remove the others;
    returns the kept ones by guest cell."""
    host_of = {c.guest_cell: c.host_cell for c in rw.placement.cells} if rw.dom.guest_cells else {}
    kept: dict[int, Node] = {}
    for memnode in numatune.find_all("memnode"):
        cell = uint(memnode.attrs.get("cellid", ""))
        if cell is None or cell not in host_of:
            rw.splicer.remove(memnode)
            continue
        rw.splicer.edit_attrs(memnode, _nodeset_change(memnode, (host_of[cell],)))
        kept[cell] = memnode
    return kept


def _memnode_cells(rw: _Rewrite, present: frozenset[int]) -> list[CellPlacement]:
    """The placement's cells that need a new memnode: none without a guest NUMA topology."""
    if not rw.dom.guest_cells:
        return []
    return sorted((c for c in rw.placement.cells if c.guest_cell not in present), key=lambda c: c.guest_cell)


def _memory_item(rw: _Rewrite) -> bytes:
    return f"<memory mode='strict' nodeset='{format_cpu_set(rw.placement.host_nodeset)}'/>".encode()


def _memnode_item(cell: CellPlacement) -> bytes:
    return f"<memnode cellid='{cell.guest_cell}' mode='strict' nodeset='{cell.host_cell}'/>".encode()


def _nodeset_change(node: Node, nodes: Iterable[int]) -> dict[str, str | None]:
    """The attribute edits that bind `node` to `nodes`: the nodeset, and placement 'auto' ->
    'static' (libvirt would let numad choose the nodes and ignore ours)."""
    changes: dict[str, str | None] = {"nodeset": format_cpu_set(nodes)}
    if node.attrs.get("placement") == "auto":
        changes["placement"] = "static"
    return changes


def _update_metadata(rw: _Rewrite) -> None:
    """<metadata><ca:placement>: the placement JSON, replacing ours if present."""
    text = _xml_escape(placement_json_text(rw.placement))
    element = f'<ca:placement xmlns:ca="{PLACEMENT_NS}">{text}</ca:placement>'.encode()
    metadata = rw.root.find_one("metadata")
    if metadata is None:
        rw.splicer.create_container(rw.root, "metadata", [element], rw.unit, _METADATA_AFTER)
        return
    ours = placement_elements(metadata)
    if ours:
        rw.splicer.replace(ours[0].start, ours[0].end, element)
    else:
        rw.splicer.replace_children(metadata, [], [element], rw.unit)


_UPDATES: tuple[Callable[[_Rewrite], None], ...] = (_update_vcpu, _update_cputune, _update_numatune, _update_metadata)


# --- the placement must be for this domain -------------------------------------------------------


def check_matches(dom: DomainPlacement, placement: Placement) -> None:
    """The placement must be for this domain: same vCPUs, same guest cells, same memory and page size."""
    _check_vcpus(dom, placement)
    _check_guest_cells(dom, placement)
    for c in placement.cells:
        _check_cell_memory(dom, c.guest_cell, c.memory_mb, c.pagesize_kb)


def _check_vcpus(dom: DomainPlacement, placement: Placement) -> None:
    """Each vCPU of the domain in exactly one cell, pinned to some host CPUs."""
    if not placement.cells:
        raise DomainXMLError("placement has no cells")
    seen: set[int] = set()
    for c in placement.cells:
        vs = set(c.vcpus)
        if vs & seen:
            raise DomainXMLError(f"placement: vCPUs {format_cpu_set(vs & seen)} appear in two cells")
        seen |= vs
        if set(c.cpu_pins) != vs or any(not c.cpu_pins[v] for v in vs):
            raise DomainXMLError(f"placement cell {c.guest_cell}: cpu_pins must give host CPUs to exactly its vCPUs")
    if seen != set(range(dom.vcpus)):
        raise DomainXMLError(
            f"placement covers vCPUs {format_cpu_set(seen) or 'none'} but domain {dom.name!r} has "
            f"{dom.vcpus} vCPUs (0-{dom.vcpus - 1})"
        )


def _check_guest_cells(dom: DomainPlacement, placement: Placement) -> None:
    """The placement's guest cells are the domain's <cpu><numa> cells (one cell without them)."""
    if not dom.guest_cells:
        if len(placement.cells) != 1:
            raise DomainXMLError(
                f"placement has {len(placement.cells)} guest cells but domain {dom.name!r} has no <cpu><numa> topology"
            )
        return
    want = {c.id: c.cpus for c in dom.guest_cells}
    got = {c.guest_cell: frozenset(c.vcpus) for c in placement.cells}
    if set(want) != set(got):
        raise DomainXMLError(
            f"placement guest cells {sorted(got)} do not match the domain's <cpu><numa> cells {sorted(want)}"
        )
    for cid, cpus in want.items():
        if cpus != got[cid]:
            raise DomainXMLError(
                f"placement guest cell {cid} has vCPUs {format_cpu_set(got[cid])}, the domain's cell "
                f"{cid} has {format_cpu_set(cpus) or 'none'}"
            )


def _check_cell_memory(dom: DomainPlacement, guest_cell: int, memory_mb: int, pagesize_kb: int) -> None:
    """Memory and page size: the placement must be for this domain's memory, or the host it claims
    resources on would be charged something other than what the guest will take."""
    cell_kib = {c.id: c.memory_kib for c in dom.guest_cells}
    kib = cell_kib.get(guest_cell, dom.memory_kib) if dom.guest_cells else dom.memory_kib
    want_mb = mib_from_kib(kib)
    if memory_mb != want_mb:
        what = f"guest cell {guest_cell}" if dom.guest_cells else f"domain {dom.name!r}"
        raise DomainXMLError(
            f"placement guest cell {guest_cell} has {memory_mb} MiB of memory, {what} has {want_mb} MiB ({kib} KiB)"
        )
    size = guest_cell_page_kib(dom, guest_cell if dom.guest_cells else 0)
    if size is None:  # bare <hugepages/>: the host's default hugepage size, whatever it is
        ok, wanted = pagesize_kb != SMALL_PAGE_KB, "a hugepage size (bare <hugepages/>)"
    else:
        ok, wanted = pagesize_kb == size, f"{size} KiB pages"
    if not ok:
        raise DomainXMLError(
            f"placement guest cell {guest_cell} uses {pagesize_kb} KiB pages, the domain's "
            f"{'guest cell ' + str(guest_cell) if dom.guest_cells else 'memory'} uses {wanted}"
        )


# --- read-back -----------------------------------------------------------------------------------


def _verify(out: str, rw: _Rewrite) -> None:
    """Read the result back: it must say exactly what the placement says (guards the splicer)."""
    after_root = parse(out.encode("utf-8"), what="domain", root="domain", utf8=True)
    after, before, placement, emu = read_domain(after_root), rw.dom, rw.placement, frozenset(rw.emulator_pins)
    want_memnodes = {c.guest_cell: frozenset([c.host_cell]) for c in placement.cells} if before.guest_cells else {}
    modes_before = _memnode_modes(rw.root)
    checks = {
        "vcpupin": dict(after.vcpu_pins) == {v: frozenset(c.cpu_pins[v]) for c in placement.cells for v in c.vcpus},
        "emulatorpin": after.emulator_pins == (emu or None),
        "iothreadpin": dict(after.iothread_pins) == ({t: emu for t in before.iothread_pins} if emu else {}),
        "vcpu cpuset": after.vcpu_cpuset == (rw.floating_cpuset or None),
        "numatune memory": _memory_binding(after) == _want_memory_binding(before, placement),
        "numatune memnode": dict(after.memnodes) == want_memnodes,
        "numatune memnode mode": _memnode_modes(after_root)
        == {g: modes_before.get(g, "strict") for g in want_memnodes},
        "metadata placement": after.agent_placement == json.loads(placement_json_text(placement)),
        "guest-side elements": _guest_side(after) == _guest_side(before),
    }
    problems = [name for name, ok in checks.items() if not ok]
    if problems:
        raise DomainXMLError(f"internal error: rewritten XML does not reflect the placement ({', '.join(problems)})")


def _memory_binding(dom: DomainPlacement) -> tuple[str | None, frozenset[int] | None]:
    return dom.numatune_mode, dom.numatune_nodeset


def _want_memory_binding(before: DomainPlacement, placement: Placement) -> tuple[str | None, frozenset[int] | None]:
    """<numatune><memory> (mode, nodeset) after the rewrite: the placement's host cells in the mode
    the domain had (strict when new) when the memory is bound, else what the domain had."""
    if not _binds_memory(before, placement):
        return _memory_binding(before)
    return before.numatune_mode or "strict", frozenset(placement.host_nodeset)


def _memnode_modes(root: Node) -> dict[int, str]:
    """Guest cell -> mode of its <numatune><memnode> (libvirt's default: strict)."""
    numatune = root.find_one("numatune")
    memnodes = numatune.find_all("memnode") if numatune is not None else []
    return {
        cell: m.attrs.get("mode", "strict") for m in memnodes if (cell := uint(m.attrs.get("cellid", ""))) is not None
    }


def _guest_side(dom: DomainPlacement) -> tuple[object, ...]:
    return dom.name, dom.uuid, dom.vcpus, dom.memory_kib, dom.guest_cells, dom.hugepages
