"""Domain XML: read a domain's placement, rewrite it for a new Placement.

- `parse_domain(xml) -> DomainPlacement`: name, uuid, vCPUs, memory, pinning, guest NUMA cells,
  numatune, hugepages and the agent's own `<metadata>` placement record.
- `rewrite_for_placement(xml, placement, *, floating_cpuset=None) -> str`: the destination XML of a
  live migration (see its docstring for what it owns).

Parsing is hardened (stdlib expat; any DOCTYPE/ENTITY/NOTATION refused, so no billion laughs and
no external entities; nothing is ever fetched; 4 MiB, depth and element-count limits): every
problem raises DomainXMLError naming the element and attribute. Rewriting splices text at the exact
byte offsets expat reports and leaves every other byte of the document as it was. Pure: no I/O,
no libvirt.
"""

from __future__ import annotations

import json
import re
import xml.parsers.expat as _expat
from dataclasses import dataclass, field
from typing import Mapping
from xml.sax.saxutils import escape as _xml_escape

from agent.cpuset import format_cpu_set, parse_cpu_set
from agent.errors import DomainXMLError
from agent.numa.placement import Placement
from agent.units import scale_to_kib

# Namespace of the metadata element the agent writes into domains it places, so that host state
# can count exactly what a domain holds (isolated siblings, emulator CPU) instead of guessing.
PLACEMENT_NS = "https://compute-agent.dev/xmlns/placement/1"


@dataclass(frozen=True, slots=True)
class GuestNumaCell:
    """`<cpu><numa><cell id= cpus= memory=>`: a guest-side NUMA cell."""

    id: int
    cpus: frozenset[int]
    memory_kib: int


@dataclass(frozen=True, slots=True)
class HugepageBacking:
    """One `<memoryBacking><hugepages><page size= nodeset=>`; size None = host default size,
    guest_nodeset None = every guest cell."""

    size_kib: int | None
    guest_nodeset: frozenset[int] | None


@dataclass(frozen=True, slots=True)
class DomainPlacement:
    """What a domain's XML says about where it runs (see DESIGN.md, host state)."""

    name: str
    uuid: str
    vcpus: int
    memory_kib: int
    vcpu_cpuset: frozenset[int] | None = None  # <vcpu cpuset=...>
    vcpu_pins: Mapping[int, frozenset[int]] = field(default_factory=dict)  # cputune/vcpupin
    emulator_pins: frozenset[int] | None = None  # cputune/emulatorpin
    iothread_pins: Mapping[int, frozenset[int]] = field(default_factory=dict)  # cputune/iothreadpin
    guest_cells: tuple[GuestNumaCell, ...] = ()
    numatune_mode: str | None = None  # numatune/memory@mode
    numatune_nodeset: frozenset[int] | None = None  # numatune/memory@nodeset
    memnodes: Mapping[int, frozenset[int]] = field(default_factory=dict)  # guest cell -> host nodes
    hugepages: tuple[HugepageBacking, ...] = ()  # empty = small pages
    # Placement JSON the agent recorded in <metadata> when it placed this domain (None if absent).
    agent_placement: Mapping[str, object] | None = None


# --- hardened parsing -----------------------------------------------------------------------------
#
# We use the stdlib expat parser directly (no lxml, no defusedxml): it never fetches anything, and we
# refuse every DOCTYPE / ENTITY / NOTATION declaration before it can be used (billion laughs, XXE).
# While parsing we record the byte span of every element so that the rewriter can splice text at
# exact offsets instead of re-serializing the document.


MAX_XML_BYTES = 4 * 1024 * 1024
MAX_ELEMENTS = 200_000  # a domain with hundreds of devices has a few thousand
MAX_DEPTH = 64  # libvirt domain XML nests about 8 deep
MAX_VCPUS = 16384  # far above any QEMU machine type; bounds the work a hostile document can cause
# The agent's placement JSON is a few KiB even for hundreds of vCPUs; bounds json.loads' work.
MAX_METADATA_CHARS = 256 * 1024
SMALL_PAGE_KIB = 4
_UINT_RE = re.compile(r"[0-9]{1,19}")


def _uint(text: str) -> int | None:
    """A plain ASCII non-negative integer (no sign, no unicode digits, at most 19 digits)."""
    t = text.strip()
    return int(t) if _UINT_RE.fullmatch(t) else None


class _Node:
    """One element of the parsed document with its byte span in the input.

    `start`: offset of "<tag"; `stag_end`: just after the start tag's ">"; `etag_start`: offset of the
    end tag "</tag" (== stag_end for an empty element); `end`: just after the element.
    """

    __slots__ = ("tag", "attrs", "parent", "children", "text_parts", "start", "stag_end", "etag_start", "end", "empty")

    def __init__(self, tag: str, attrs: dict[str, str], parent: "_Node | None", start: int) -> None:
        self.tag = tag
        self.attrs = attrs
        self.parent = parent
        self.children: list[_Node] = []
        self.text_parts: list[str] = []
        self.start = start
        self.stag_end = -1
        self.etag_start = -1
        self.end = -1
        self.empty = False

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def find_all(self, tag: str) -> list["_Node"]:
        return [c for c in self.children if c.tag == tag]

    def find_one(self, tag: str) -> "_Node | None":
        found = self.find_all(tag)
        if len(found) > 1:
            raise DomainXMLError(f"<{self.tag}> has {len(found)} <{tag}> elements; at most one is allowed")
        return found[0] if found else None

    def namespace(self) -> str | None:
        """The namespace URI of this element, resolved from xmlns declarations in scope."""
        prefix = self.tag.split(":", 1)[0] if ":" in self.tag else None
        key = f"xmlns:{prefix}" if prefix else "xmlns"
        node: _Node | None = self
        while node is not None:
            if key in node.attrs:
                return node.attrs[key] or None
            node = node.parent
        return None


def _start_tag_end(data: bytes, start: int) -> int:
    """Offset just after the ">" closing the start tag at `start` (quotes respected)."""
    quote = 0
    i = start + 1
    n = len(data)
    while i < n:
        ch = data[i]
        if quote:
            if ch == quote:
                quote = 0
        elif ch in (0x22, 0x27):  # " '
            quote = ch
        elif ch == 0x3E:  # >
            return i + 1
        i += 1
    raise DomainXMLError("domain XML: unterminated start tag")  # expat would have said so first


def _refuse(what: str):
    def handler(*_args: object) -> None:
        raise DomainXMLError(f"domain XML: {what} are not allowed (no DTDs, entities or external references)")

    return handler


def _to_bytes(xml: str | bytes) -> tuple[bytes, bool]:
    if isinstance(xml, str):
        try:
            return xml.encode("utf-8"), True
        except UnicodeEncodeError as exc:
            raise DomainXMLError(f"domain XML is not valid text: {exc}") from None
    if isinstance(xml, (bytes, bytearray, memoryview)):
        return bytes(xml), False
    raise DomainXMLError(f"domain XML must be str or bytes, not {type(xml).__name__}")


def _parse_tree(data: bytes, *, utf8: bool, offsets: bool) -> _Node:
    if len(data) > MAX_XML_BYTES:
        raise DomainXMLError(f"domain XML is {len(data)} bytes, more than the {MAX_XML_BYTES}-byte limit")
    parser = _expat.ParserCreate(encoding="UTF-8" if utf8 else None)
    parser.SetParamEntityParsing(_expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _refuse("DOCTYPE declarations")
    parser.EntityDeclHandler = _refuse("ENTITY declarations")
    parser.UnparsedEntityDeclHandler = _refuse("ENTITY declarations")
    parser.NotationDeclHandler = _refuse("NOTATION declarations")
    parser.ExternalEntityRefHandler = _refuse("external entities")
    parser.SkippedEntityHandler = _refuse("undefined entities")

    root: list[_Node] = []
    stack: list[_Node] = []
    count = [0]

    def start(tag: str, attrs: dict[str, str]) -> None:
        count[0] += 1
        if count[0] > MAX_ELEMENTS:
            raise DomainXMLError(f"domain XML has more than {MAX_ELEMENTS} elements")
        if len(stack) >= MAX_DEPTH:
            raise DomainXMLError(f"domain XML nests elements more than {MAX_DEPTH} deep (at <{tag}>)")
        parent = stack[-1] if stack else None
        node = _Node(tag, attrs, parent, parser.CurrentByteIndex if offsets else -1)
        if offsets:
            node.stag_end = _start_tag_end(data, node.start)
            node.empty = data[node.stag_end - 2 : node.stag_end] == b"/>"
        if parent is None:
            root.append(node)
        else:
            parent.children.append(node)
        stack.append(node)

    def end(_tag: str) -> None:
        node = stack.pop()
        if offsets:
            if node.empty:
                node.etag_start = node.end = node.stag_end
            else:
                node.etag_start = parser.CurrentByteIndex
                node.end = data.index(b">", node.etag_start) + 1

    def chars(text: str) -> None:
        if stack:
            stack[-1].text_parts.append(text)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    try:
        parser.Parse(data, True)
    except _expat.ExpatError as exc:
        raise DomainXMLError(
            f"domain XML is not well-formed: {_expat.ErrorString(exc.code)} (line {exc.lineno}, column {exc.offset})"
        ) from None
    except RecursionError:  # pragma: no cover - expat is iterative; belt and braces
        raise DomainXMLError("domain XML is nested too deeply") from None
    if not root:
        raise DomainXMLError("domain XML has no root element")
    if root[0].tag != "domain":
        raise DomainXMLError(f"domain XML: root element is <{root[0].tag}>, expected <domain>")
    return root[0]


# --- reading values -------------------------------------------------------------------------------


def _scale_to_kib(value: str, unit: str | None, where: str) -> int:
    """libvirt memory units (virScaleInteger): b/bytes; k, KiB (1024) vs KB (1000); M, MiB, MB; ...
    Default KiB. Values are rounded up to whole KiB, as libvirt does."""
    n = _uint(value)
    if n is None:
        raise DomainXMLError(f"{where}: memory value {value[:40]!r} is not a non-negative integer")
    try:
        return scale_to_kib(n, unit)  # the same conversion as host capabilities
    except ValueError:
        raise DomainXMLError(f"{where}: unknown memory unit {(unit or '').strip()!r}") from None


def _where(node: _Node, attr: str | None = None) -> str:
    path = []
    n: _Node | None = node
    while n is not None:
        path.append(n.tag)
        n = n.parent
    text = "/".join(reversed(path))
    return f"<{text}> attribute {attr!r}" if attr else f"<{text}>"


def _attr_int(node: _Node, attr: str, *, required: bool = True) -> int | None:
    raw = node.attrs.get(attr)
    if raw is None:
        if required:
            raise DomainXMLError(f"{_where(node, attr)} is missing")
        return None
    value = _uint(raw)
    if value is None:
        raise DomainXMLError(f"{_where(node, attr)} = {raw[:40]!r} is not a non-negative integer")
    return value


def _cpu_set(node: _Node, attr: str, *, required: bool = True) -> frozenset[int] | None:
    raw = node.attrs.get(attr)
    if raw is None:
        if required:
            raise DomainXMLError(f"{_where(node, attr)} is missing")
        return None
    try:
        value = parse_cpu_set(raw)
    except ValueError as exc:
        raise DomainXMLError(f"{_where(node, attr)} = {raw[:40]!r} is not a CPU/node set: {exc}") from None
    if not value:
        raise DomainXMLError(f"{_where(node, attr)} = {raw!r} selects nothing")
    return value


def _placement_element(metadata: _Node | None) -> list[_Node]:
    if metadata is None:
        return []
    return [c for c in metadata.children if c.namespace() == PLACEMENT_NS]


def _read(root: _Node) -> DomainPlacement:
    name_el = root.find_one("name")
    if name_el is None or not name_el.text.strip():
        raise DomainXMLError("<domain/name> is missing or empty")
    uuid_el = root.find_one("uuid")
    uuid = uuid_el.text.strip() if uuid_el is not None else ""

    vcpu_el = root.find_one("vcpu")
    vcpus = 1
    vcpu_cpuset = None
    if vcpu_el is not None:
        count = _uint(vcpu_el.text)
        if count is None or not 1 <= count <= MAX_VCPUS:
            raise DomainXMLError(f"<domain/vcpu> = {vcpu_el.text.strip()[:40]!r} is not a vCPU count (1-{MAX_VCPUS})")
        vcpus = count
        vcpu_cpuset = _cpu_set(vcpu_el, "cpuset", required=False)

    guest_cells: list[GuestNumaCell] = []
    cpu_el = root.find_one("cpu")
    numa_el = cpu_el.find_one("numa") if cpu_el is not None else None
    if numa_el is not None:
        for idx, cell in enumerate(numa_el.find_all("cell")):
            cid = _attr_int(cell, "id", required=False)
            cid = idx if cid is None else cid
            cpus = _cpu_set(cell, "cpus", required=False) or frozenset()
            if "memory" not in cell.attrs:
                raise DomainXMLError(f"{_where(cell, 'memory')} is missing")
            mem = _scale_to_kib(cell.attrs["memory"], cell.attrs.get("unit"), _where(cell, "memory"))
            guest_cells.append(GuestNumaCell(id=cid, cpus=cpus, memory_kib=mem))
        ids = [c.id for c in guest_cells]
        if len(set(ids)) != len(ids):
            raise DomainXMLError("<domain/cpu/numa/cell> ids are not unique")
        seen: set[int] = set()
        for c in guest_cells:
            if c.cpus & seen:
                raise DomainXMLError(
                    f"<domain/cpu/numa/cell> id {c.id}: vCPUs {format_cpu_set(c.cpus & seen)} in two cells"
                )
            if any(v >= vcpus for v in c.cpus):
                raise DomainXMLError(f"<domain/cpu/numa/cell> id {c.id}: cpus beyond the {vcpus} vCPUs")
            seen |= c.cpus

    memory_el = root.find_one("memory")
    if memory_el is not None:
        memory_kib = _scale_to_kib(memory_el.text, memory_el.attrs.get("unit"), "<domain/memory>")
    elif guest_cells:
        memory_kib = sum(c.memory_kib for c in guest_cells)
    else:
        raise DomainXMLError("<domain/memory> is missing")

    vcpu_pins: dict[int, frozenset[int]] = {}
    emulator_pins = None
    iothread_pins: dict[int, frozenset[int]] = {}
    cputune = root.find_one("cputune")
    if cputune is not None:
        for pin in cputune.find_all("vcpupin"):
            v = _attr_int(pin, "vcpu")
            assert v is not None
            if v >= vcpus:
                raise DomainXMLError(f"{_where(pin, 'vcpu')} = {v}: the domain has {vcpus} vCPUs")
            if v in vcpu_pins:
                raise DomainXMLError(f"{_where(pin, 'vcpu')} = {v} is pinned twice")
            vcpu_pins[v] = _cpu_set(pin, "cpuset")  # type: ignore[assignment]
        emu = cputune.find_one("emulatorpin")
        if emu is not None:
            emulator_pins = _cpu_set(emu, "cpuset")
        for pin in cputune.find_all("iothreadpin"):
            t = _attr_int(pin, "iothread")
            assert t is not None
            if t in iothread_pins:
                raise DomainXMLError(f"{_where(pin, 'iothread')} = {t} is pinned twice")
            iothread_pins[t] = _cpu_set(pin, "cpuset")  # type: ignore[assignment]

    numatune_mode = None
    numatune_nodeset = None
    memnodes: dict[int, frozenset[int]] = {}
    numatune = root.find_one("numatune")
    if numatune is not None:
        mem = numatune.find_one("memory")
        if mem is not None:
            numatune_mode = mem.attrs.get("mode", "strict")
            numatune_nodeset = _cpu_set(mem, "nodeset", required=False)
        for mn in numatune.find_all("memnode"):
            cid = _attr_int(mn, "cellid")
            assert cid is not None
            if cid in memnodes:
                raise DomainXMLError(f"{_where(mn, 'cellid')} = {cid} appears twice")
            memnodes[cid] = _cpu_set(mn, "nodeset")  # type: ignore[assignment]

    hugepages: list[HugepageBacking] = []
    backing = root.find_one("memoryBacking")
    hp = backing.find_one("hugepages") if backing is not None else None
    if hp is not None:
        pages = hp.find_all("page")
        if not pages:
            hugepages.append(HugepageBacking(None, None))
        for page in pages:
            if "size" not in page.attrs:
                raise DomainXMLError(f"{_where(page, 'size')} is missing")
            size = _scale_to_kib(page.attrs["size"], page.attrs.get("unit"), _where(page, "size"))
            hugepages.append(HugepageBacking(size, _cpu_set(page, "nodeset", required=False)))

    agent_placement = None
    ours = _placement_element(root.find_one("metadata"))
    if len(ours) > 1:
        raise DomainXMLError(f"<domain/metadata> holds {len(ours)} elements in namespace {PLACEMENT_NS}")
    if ours:
        text = ours[0].text
        if len(text) > MAX_METADATA_CHARS:
            raise DomainXMLError(
                f"<domain/metadata/{ours[0].tag}>: {len(text)} characters, more than the "
                f"{MAX_METADATA_CHARS}-character limit"
            )
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise DomainXMLError(f"<domain/metadata/{ours[0].tag}>: invalid JSON: {exc}") from None
        except RecursionError:  # "[[[[...]]]]": the C decoder recurses once per level
            raise DomainXMLError(f"<domain/metadata/{ours[0].tag}>: JSON nested too deeply") from None
        if not isinstance(doc, dict):
            raise DomainXMLError(f"<domain/metadata/{ours[0].tag}>: JSON is not an object")
        agent_placement = doc

    return DomainPlacement(
        name=name_el.text.strip(),
        uuid=uuid,
        vcpus=vcpus,
        memory_kib=memory_kib,
        vcpu_cpuset=vcpu_cpuset,
        vcpu_pins=vcpu_pins,
        emulator_pins=emulator_pins,
        iothread_pins=iothread_pins,
        guest_cells=tuple(guest_cells),
        numatune_mode=numatune_mode,
        numatune_nodeset=numatune_nodeset,
        memnodes=memnodes,
        hugepages=tuple(hugepages),
        agent_placement=agent_placement,
    )


def parse_domain(xml: str | bytes) -> DomainPlacement:
    """Read what a domain's XML says about its placement. Raises DomainXMLError on anything
    malformed, unsafe (DTD/entities) or larger than MAX_XML_BYTES."""
    data, utf8 = _to_bytes(xml)
    return _read(_parse_tree(data, utf8=utf8, offsets=False))


# --- rewriting ------------------------------------------------------------------------------------
#
# Method: parse with expat while recording every element's byte span (CurrentByteIndex at the start
# tag and at the end tag, plus a quote-aware scan for the ">" that closes a start tag), then apply a
# list of (start, end, replacement) edits to the original UTF-8 bytes. Only the owned elements below
# are touched; every other byte (comments, quoting style, attribute order, devices, whitespace) is
# copied through unchanged.
#
# Owned by the rewriter:
#   <vcpu cpuset=...> (and placement='auto' -> 'static', since libvirt ignores cpuset with auto)
#   <cputune>/<vcpupin>, <emulatorpin>, <iothreadpin>
#   <numatune>/<memory>, <memnode>
#   <metadata>/<ca:placement xmlns:ca=PLACEMENT_NS>
# Removed owned elements take their own line (newline + indentation) with them; new ones are
# inserted where the first removed one was (else at a libvirt-like position), each on its own line
# with the indentation of its siblings, so rewriting twice gives the same bytes.

_ATTR_RE = re.compile(rb"""(\s+)([^\s=/>]+)(\s*=\s*)("[^"]*"|'[^']*')""")
_NAME_RE = re.compile(rb"<[^\s/>]+")

# where a missing container goes: after the last of these children of <domain> (libvirt's order)
_METADATA_AFTER = ("name", "uuid", "genid", "title", "description")
_CPUTUNE_AFTER = _METADATA_AFTER + (
    "metadata", "maxMemory", "memory", "currentMemory", "blkiotune", "memtune", "memoryBacking",
    "vcpu", "vcpus", "iothreads", "iothreadids", "defaultiothread",
)  # fmt: skip
_NUMATUNE_AFTER = _CPUTUNE_AFTER + ("cputune",)
# inside an existing <cputune> without pins: pins go before the first of these (libvirt's order)
_CPUTUNE_PINS_BEFORE = ("vcpusched", "iothreadsched", "emulatorsched", "cachetune", "memorytune")


class _Splicer:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self._edits: list[tuple[int, int, int, int, bytes]] = []

    def replace(self, start: int, end: int, text: bytes) -> None:
        self._edits.append((start, 0 if start == end else 1, len(self._edits), end, text))

    def insert(self, pos: int, text: bytes) -> None:
        self.replace(pos, pos, text)

    def remove(self, node: _Node) -> None:
        ws_start, _ = self.line_prefix(node)
        self.replace(ws_start, node.end, b"")

    def line_prefix(self, node: _Node) -> tuple[int, bytes]:
        """(offset, text) of the newline + indentation right before `node`, or (start, b"") when the
        element does not start its own line."""
        i = node.start
        while i > 0 and self.data[i - 1] in b" \t":
            i -= 1
        if i > 0 and self.data[i - 1] == 0x0A:
            i -= 1
            if i > 0 and self.data[i - 1] == 0x0D:
                i -= 1
            return i, self.data[i : node.start]
        return node.start, b""

    def apply(self) -> bytes:
        out: list[bytes] = []
        cursor = 0
        for start, _kind, _seq, end, text in sorted(self._edits):
            if start < cursor:
                raise AssertionError("overlapping edits")  # a bug in the rewriter, not bad input
            out.append(self.data[cursor:start])
            out.append(text)
            cursor = max(cursor, end)
        out.append(self.data[cursor:])
        return b"".join(out)


def _indent_unit(sp: _Splicer, root: _Node) -> bytes:
    _, root_prefix = sp.line_prefix(root)
    root_indent = root_prefix.lstrip(b"\r\n")
    for child in root.children:
        _, p = sp.line_prefix(child)
        indent = p.lstrip(b"\r\n")
        if p and len(indent) > len(root_indent):
            return indent[len(root_indent) :]
    return b"  "


def _newline(sp: _Splicer) -> bytes:
    return b"\r\n" if b"\r\n" in sp.data else b"\n"


def _child_prefix(sp: _Splicer, container: _Node, unit: bytes) -> bytes:
    for c in container.children:
        _, p = sp.line_prefix(c)
        if p:
            return p
    _, p = sp.line_prefix(container)
    if not p:  # a one-line document (or container): keep it on one line
        return b""
    return p + unit


def _replace_children(
    sp: _Splicer,
    container: _Node,
    owned: list[_Node],
    items: list[bytes],
    unit: bytes,
    before: tuple[str, ...] = (),
) -> None:
    """Remove `owned` (children of `container`) and put `items` where the first of them was, else
    before the first child whose tag is in `before`, else at the end of the container."""
    for node in owned:
        sp.remove(node)
    if not items:
        return
    child_prefix = _child_prefix(sp, container, unit)
    if owned:
        pos, prefix = sp.line_prefix(owned[0])
        sp.insert(pos, b"".join(prefix + it for it in items))
        return
    anchor = next((c for c in container.children if c.tag in before), None)
    if anchor is not None:
        pos, prefix = sp.line_prefix(anchor)
        sp.insert(pos, b"".join(prefix + it for it in items))
        return
    _, own_prefix = sp.line_prefix(container)
    body = b"".join(child_prefix + it for it in items)
    if container.empty:  # <cputune/> -> <cputune>...</cputune>
        stag = sp.data[container.start : container.stag_end]
        stag = stag[:-2].rstrip() + b">"
        close = own_prefix if child_prefix else b""
        sp.replace(container.start, container.end, stag + body + close + f"</{container.tag}>".encode())
        return
    i = container.etag_start
    while i > container.stag_end and sp.data[i - 1] in b" \t":
        i -= 1
    if i > container.stag_end and sp.data[i - 1] == 0x0A:
        i -= 1
        if i > container.stag_end and sp.data[i - 1] == 0x0D:
            i -= 1
        sp.insert(i, body)
    else:
        sp.insert(container.etag_start, body + (own_prefix if child_prefix else b""))


def _create_container(
    sp: _Splicer, root: _Node, tag: str, items: list[bytes], unit: bytes, after: tuple[str, ...]
) -> None:
    anchors = [c for c in root.children if c.tag in after]
    if anchors:
        anchor = anchors[-1]
        _, prefix = sp.line_prefix(anchor)
        pos = anchor.end
    else:
        pos, prefix = sp.line_prefix(root.children[0])
    child_prefix = prefix + unit if prefix else b""
    body = b"".join(child_prefix + it for it in items)
    sp.insert(pos, prefix + f"<{tag}>".encode() + body + prefix + f"</{tag}>".encode())


def _edit_attrs(sp: _Splicer, node: _Node, changes: dict[str, str | None]) -> None:
    """Set (str) or remove (None) attributes in `node`'s start tag, keeping the others' bytes."""
    stag = sp.data[node.start : node.stag_end]
    m = _NAME_RE.match(stag)
    assert m is not None
    pos = m.end()
    found: dict[str, re.Match[bytes]] = {}
    while True:
        am = _ATTR_RE.match(stag, pos)
        if am is None:
            break
        found[am.group(2).decode("utf-8", "replace")] = am
        pos = am.end()
    last_end = pos
    for name, value in changes.items():
        am = found.get(name)
        if am is None:
            if value is not None:
                sp.insert(node.start + last_end, f" {name}='{_xml_escape(value, {chr(39): '&apos;'})}'".encode())
            continue
        if value is None:
            sp.replace(node.start + am.start(), node.start + am.end(), b"")
        else:
            q = am.group(4)[:1].decode()
            esc = _xml_escape(value, {'"': "&quot;"} if q == '"' else {"'": "&apos;"})
            sp.replace(node.start + am.start(4), node.start + am.end(4), f"{q}{esc}{q}".encode())


def _check_matches(dom: DomainPlacement, placement: Placement) -> None:
    """The placement must be for this domain: same vCPUs, same guest cells."""
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
    if dom.guest_cells:
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
    elif len(placement.cells) != 1:
        raise DomainXMLError(
            f"placement has {len(placement.cells)} guest cells but domain {dom.name!r} has no <cpu><numa> topology"
        )
    # memory and page size: the placement must be for this domain's memory, or the host it claims
    # resources on would be charged something other than what the guest will take
    cell_kib = {c.id: c.memory_kib for c in dom.guest_cells}
    for c in placement.cells:
        kib = cell_kib.get(c.guest_cell, dom.memory_kib) if dom.guest_cells else dom.memory_kib
        want_mb = _mib(kib)
        if c.memory_mb != want_mb:
            what = f"guest cell {c.guest_cell}" if dom.guest_cells else f"domain {dom.name!r}"
            raise DomainXMLError(
                f"placement guest cell {c.guest_cell} has {c.memory_mb} MiB of memory, {what} has "
                f"{want_mb} MiB ({kib} KiB)"
            )
        size = guest_cell_page_kib(dom, c.guest_cell if dom.guest_cells else 0)
        if size is None:  # bare <hugepages/>: the host's default hugepage size, whatever it is
            ok = c.pagesize_kb != SMALL_PAGE_KIB
            want = "a hugepage size (bare <hugepages/>)"
        else:
            ok = c.pagesize_kb == size
            want = f"{size} KiB pages"
        if not ok:
            raise DomainXMLError(
                f"placement guest cell {c.guest_cell} uses {c.pagesize_kb} KiB pages, the domain's "
                f"{'guest cell ' + str(c.guest_cell) if dom.guest_cells else 'memory'} uses {want}"
            )


def _mib(kib: int) -> int:
    """KiB -> MiB rounded up (what host state charges a guest, agent.claims.hoststate._mib)."""
    return -(-kib // 1024)


def guest_cell_page_kib(dom: DomainPlacement, guest_cell: int) -> int | None:
    """The page size (KiB) backing guest cell `guest_cell` (0 for a domain without guest NUMA cells):
    4 without <hugepages>; else the size of the <page> whose nodeset holds the cell, else of the
    <page> without nodeset, else 4 (libvirt's choice); None for a bare <hugepages/> or a <page>
    without size, i.e. the host's default hugepage size."""
    if not dom.hugepages:
        return SMALL_PAGE_KIB
    chosen = next((h for h in dom.hugepages if h.guest_nodeset is not None and guest_cell in h.guest_nodeset), None)
    if chosen is None:
        chosen = next((h for h in dom.hugepages if h.guest_nodeset is None), None)
    if chosen is None:
        return SMALL_PAGE_KIB
    return chosen.size_kib


def floating_vcpus(placement: Placement) -> frozenset[int]:
    """vCPUs of the placement that are not pinned one-to-one."""
    out: set[int] = set()
    for c in placement.cells:
        out.update(v for v in c.vcpus if v not in c.dedicated_vcpus)
    return frozenset(out)


def placement_json_text(placement: Placement) -> str:
    """The exact JSON the rewriter stores in <metadata>."""
    return json.dumps(placement.to_json(), sort_keys=True)


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
    - `numatune/memory mode=strict nodeset=<host cells>`, plus one `memnode cellid=G mode=strict
      nodeset=H` per guest cell when the domain has a guest NUMA topology (libvirt refuses memnode
      without `<cpu><numa>`).
    - `<metadata><ca:placement xmlns:ca=PLACEMENT_NS>` = placement_json_text(placement).

    Guest-side elements (`cpu/numa`, hugepage `page@nodeset`, vCPU count) and every other byte of
    the document stay as they were. Raises DomainXMLError when the XML is bad or the placement is
    not for this domain (other vCPU count or guest cells).
    """
    if isinstance(xml, (bytes, bytearray, memoryview)):
        try:
            xml = bytes(xml).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DomainXMLError(f"domain XML is not UTF-8: {exc}") from None
    data, _ = _to_bytes(xml)
    root = _parse_tree(data, utf8=True, offsets=True)
    dom = _read(root)
    _check_matches(dom, placement)
    if floating_cpuset is not None and not floating_cpuset:
        raise DomainXMLError("floating_cpuset must not be empty")

    sp = _Splicer(data)
    unit = _indent_unit(sp, root)
    cpuset = format_cpu_set
    emu = tuple(sorted(set(placement.emulator_pins)))

    # <vcpu cpuset=... placement=...>
    floating = floating_vcpus(placement)
    if floating:
        if floating_cpuset is not None:
            float_set = frozenset(floating_cpuset)
        else:
            float_set = frozenset(p for c in placement.cells for v in c.vcpus if v in floating for p in c.cpu_pins[v])
    else:
        float_set = frozenset()
    vcpu_el = root.find_one("vcpu")
    if vcpu_el is None:
        if float_set:
            raise DomainXMLError("domain has no <vcpu> element to carry the floating vCPUs' cpuset")
    else:
        changes: dict[str, str | None] = {"cpuset": cpuset(float_set) if float_set else None}
        if vcpu_el.attrs.get("placement") == "auto":
            changes["placement"] = "static"
        _edit_attrs(sp, vcpu_el, changes)

    # <cputune>
    pins: dict[int, tuple[int, ...]] = {}
    for c in placement.cells:
        for v in c.vcpus:
            pins[v] = tuple(sorted(set(c.cpu_pins[v])))
    items = [f"<vcpupin vcpu='{v}' cpuset='{cpuset(pins[v])}'/>".encode() for v in sorted(pins)]
    if emu:
        items.append(f"<emulatorpin cpuset='{cpuset(emu)}'/>".encode())
    cputune = root.find_one("cputune")
    if cputune is not None:
        owned = [c for c in cputune.children if c.tag in ("vcpupin", "emulatorpin", "iothreadpin")]
        if emu:
            for t in dom.iothread_pins:
                items.append(f"<iothreadpin iothread='{t}' cpuset='{cpuset(emu)}'/>".encode())
        _replace_children(sp, cputune, owned, items, unit, before=_CPUTUNE_PINS_BEFORE)
    else:
        _create_container(sp, root, "cputune", items, unit, _CPUTUNE_AFTER)

    # <numatune>
    host_nodes = placement.host_nodeset
    items = [f"<memory mode='strict' nodeset='{cpuset(host_nodes)}'/>".encode()]
    if dom.guest_cells:
        for c in sorted(placement.cells, key=lambda c: c.guest_cell):
            items.append(f"<memnode cellid='{c.guest_cell}' mode='strict' nodeset='{c.host_cell}'/>".encode())
    numatune = root.find_one("numatune")
    if numatune is not None:
        owned = [c for c in numatune.children if c.tag in ("memory", "memnode")]
        _replace_children(sp, numatune, owned, items, unit)
    else:
        _create_container(sp, root, "numatune", items, unit, _NUMATUNE_AFTER)

    # <metadata><ca:placement>
    element = (
        f'<ca:placement xmlns:ca="{PLACEMENT_NS}">{_xml_escape(placement_json_text(placement))}</ca:placement>'
    ).encode()
    metadata = root.find_one("metadata")
    if metadata is None:
        _create_container(sp, root, "metadata", [element], unit, _METADATA_AFTER)
    else:
        ours = _placement_element(metadata)
        if ours:
            sp.replace(ours[0].start, ours[0].end, element)
        else:
            _replace_children(sp, metadata, [], [element], unit)

    out = sp.apply().decode("utf-8")
    _verify(out, placement, dom, emu, float_set)
    return out


def _verify(
    out: str, placement: Placement, before: DomainPlacement, emu: tuple[int, ...], float_set: frozenset[int]
) -> None:
    """Read the result back: it must say exactly what the placement says (guards the splicer)."""
    after = parse_domain(out)
    want_pins = {v: frozenset(c.cpu_pins[v]) for c in placement.cells for v in c.vcpus}
    problems = []
    if dict(after.vcpu_pins) != want_pins:
        problems.append("vcpupin")
    if after.emulator_pins != (frozenset(emu) if emu else None):
        problems.append("emulatorpin")
    if dict(after.iothread_pins) != ({t: frozenset(emu) for t in before.iothread_pins} if emu else {}):
        problems.append("iothreadpin")
    if after.vcpu_cpuset != (float_set or None):
        problems.append("vcpu cpuset")
    if after.numatune_mode != "strict" or after.numatune_nodeset != frozenset(placement.host_nodeset):
        problems.append("numatune memory")
    want_memnodes = {c.guest_cell: frozenset([c.host_cell]) for c in placement.cells} if before.guest_cells else {}
    if dict(after.memnodes) != want_memnodes:
        problems.append("numatune memnode")
    if after.agent_placement != json.loads(placement_json_text(placement)):
        problems.append("metadata placement")
    if (after.name, after.uuid, after.vcpus, after.memory_kib, after.guest_cells, after.hugepages) != (
        before.name,
        before.uuid,
        before.vcpus,
        before.memory_kib,
        before.guest_cells,
        before.hugepages,
    ):
        problems.append("guest-side elements")
    if problems:
        raise DomainXMLError(f"internal error: rewritten XML does not reflect the placement ({', '.join(problems)})")
