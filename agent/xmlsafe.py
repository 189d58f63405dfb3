"""Hardened, span-preserving XML: the one parser for libvirt's domain and capabilities XML, and the
byte splicer the domain rewriter edits with.

Parsing uses the stdlib expat parser directly (no lxml, no defusedxml): it never fetches anything,
and every DOCTYPE / ENTITY / NOTATION declaration is refused before it can be used (billion laughs,
XXE). Size, depth and element counts are bounded (agent.limits). Every problem raises
DomainXMLError naming the document ("domain XML", "capabilities XML") and, where it can, the element.

With `offsets=True` every element records its byte span in the input, so that `Splicer` can replace
or insert text at exact offsets and copy every other byte (comments, quoting, attribute order,
whitespace) through unchanged.
"""

from __future__ import annotations

import re
import xml.parsers.expat as _expat
from typing import Callable, Iterator, NoReturn
from xml.sax.saxutils import escape as _xml_escape

from agent.errors import DomainXMLError
from agent.limits import MAX_XML_BYTES, MAX_XML_DEPTH, MAX_XML_ELEMENTS
from agent.numbers import uint_or_none

__all__ = ["Node", "Splicer", "parse", "to_bytes", "uint", "where"]


def uint(text: str) -> int | None:
    """A plain ASCII non-negative integer (no sign, no unicode digits, at most 19 digits)."""
    return uint_or_none(text, max_digits=19)


class Node:
    """One element of the parsed document with its byte span in the input.

    `start`: offset of "<tag"; `stag_end`: just after the start tag's ">"; `etag_start`: offset of the
    end tag "</tag" (== stag_end for an empty element); `end`: just after the element. All -1 when
    the document was parsed without offsets.
    """

    __slots__ = ("tag", "attrs", "parent", "children", "text_parts", "start", "stag_end", "etag_start", "end", "empty")

    def __init__(self, tag: str, attrs: dict[str, str], parent: Node | None, start: int) -> None:
        self.tag = tag
        self.attrs = attrs
        self.parent = parent
        self.children: list[Node] = []
        self.text_parts: list[str] = []
        self.start = start
        self.stag_end = -1
        self.etag_start = -1
        self.end = -1
        self.empty = False

    @property
    def text(self) -> str:
        """The element's own character data (its children's left out)."""
        return "".join(self.text_parts)

    def find_all(self, tag: str) -> list[Node]:
        return [c for c in self.children if c.tag == tag]

    def find_one(self, tag: str) -> Node | None:
        """The only `tag` child, None when there is none; DomainXMLError when there are several."""
        found = self.find_all(tag)
        if len(found) > 1:
            raise DomainXMLError(f"<{self.tag}> has {len(found)} <{tag}> elements; at most one is allowed")
        return found[0] if found else None

    def iter_path(self, path: str) -> Iterator[Node]:
        """Every descendant at `path` ("host/topology/cells"), in document order."""
        nodes: list[Node] = [self]
        for tag in path.split("/"):
            nodes = [c for n in nodes for c in n.children if c.tag == tag]
        return iter(nodes)

    def find_path(self, path: str) -> Node | None:
        """The first descendant at `path`, as ElementTree's find()."""
        return next(self.iter_path(path), None)

    def namespace(self) -> str | None:
        """The namespace URI of this element, resolved from xmlns declarations in scope."""
        prefix = self.tag.split(":", 1)[0] if ":" in self.tag else None
        key = f"xmlns:{prefix}" if prefix else "xmlns"
        node: Node | None = self
        while node is not None:
            if key in node.attrs:
                return node.attrs[key] or None
            node = node.parent
        return None


def where(node: Node, attr: str | None = None) -> str:
    """ "<domain/cputune/vcpupin> attribute 'cpuset'": the element's path, for error messages."""
    path = []
    n: Node | None = node
    while n is not None:
        path.append(n.tag)
        n = n.parent
    text = "/".join(reversed(path))
    return f"<{text}> attribute {attr!r}" if attr else f"<{text}>"


# --- parsing ---------------------------------------------------------------------------------------


def to_bytes(xml: str | bytes, what: str, *, require_utf8: bool = False) -> tuple[bytes, bool]:
    """(the document's bytes, whether they are known to be UTF-8). Bytes are passed through as
    they are (expat reads their XML declaration) unless `require_utf8`."""
    if isinstance(xml, str):
        try:
            return xml.encode("utf-8"), True
        except UnicodeEncodeError as exc:
            raise DomainXMLError(f"{what} XML is not valid text: {exc}") from None
    if not isinstance(xml, (bytes, bytearray, memoryview)):
        raise DomainXMLError(f"{what} XML must be str or bytes, not {type(xml).__name__}")
    data = bytes(xml)
    _check_encoding(data, what)
    if not require_utf8:
        return data, True  # parsed as UTF-8 (ASCII is a subset); invalid bytes are "not well-formed"
    _check_size(data, what)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DomainXMLError(f"{what} XML is not UTF-8: {exc}") from None
    return data, True


# the encoding in an XML declaration (which must open the document, after an optional UTF-8 BOM)
_DECL_ENCODING_RE = re.compile(rb"""(?:\xef\xbb\xbf)?<\?xml\s[^>]{0,200}?\bencoding\s*=\s*["']([^"']{0,40})["']""")
_UTF8_NAMES = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})


def _check_encoding(data: bytes, what: str) -> None:
    """Refuse a declared encoding other than UTF-8/ASCII, and UTF-16/32 byte order marks: libvirt
    writes UTF-8 only, and expat's support of other encodings raises untyped errors (UTF-7)."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or data[:4] in (b"\x00\x00\xfe\xff", b"\xff\xfe\x00\x00"):
        raise DomainXMLError(f"{what} XML: UTF-16/UTF-32 documents are not accepted (UTF-8 only)")
    match = _DECL_ENCODING_RE.match(data)
    if match is not None and match.group(1).decode("latin-1").strip().lower() not in _UTF8_NAMES:
        declared = match.group(1).decode("latin-1")
        raise DomainXMLError(f"{what} XML: encoding {declared!r} is not accepted (UTF-8 or ASCII only)")


def _check_size(data: bytes, what: str) -> None:
    if len(data) > MAX_XML_BYTES:
        raise DomainXMLError(f"{what} XML is {len(data)} bytes, larger than the {MAX_XML_BYTES}-byte limit")


def _start_tag_end(data: bytes, start: int) -> int:
    """Offset just after the ">" closing the start tag at `start` (quotes respected)."""
    quote = 0
    for i in range(start + 1, len(data)):
        ch = data[i]
        if quote:
            quote = 0 if ch == quote else quote
        elif ch in (0x22, 0x27):  # " '
            quote = ch
        elif ch == 0x3E:  # >
            return i + 1
    raise DomainXMLError("XML: unterminated start tag")  # expat would have said so first


def _refuse(what: str, kind: str) -> Callable[..., NoReturn]:
    def handler(*_args: object) -> NoReturn:
        raise DomainXMLError(f"{what} XML: {kind} are not allowed (no DTDs, entities or external references)")

    return handler


def _hardened_parser(what: str, utf8: bool) -> _expat.XMLParserType:
    parser = _expat.ParserCreate(encoding="UTF-8" if utf8 else None)
    parser.SetParamEntityParsing(_expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _refuse(what, "DOCTYPE declarations")
    parser.EntityDeclHandler = _refuse(what, "ENTITY declarations")
    parser.UnparsedEntityDeclHandler = _refuse(what, "ENTITY declarations")
    parser.NotationDeclHandler = _refuse(what, "NOTATION declarations")
    parser.ExternalEntityRefHandler = _refuse(what, "external entities")
    parser.SkippedEntityHandler = _refuse(what, "undefined entities")
    return parser


class _TreeBuilder:
    """expat callbacks that build the Node tree, bounded in depth and element count."""

    def __init__(self, parser: _expat.XMLParserType, data: bytes, what: str, offsets: bool) -> None:
        self.parser, self.data, self.what, self.offsets = parser, data, what, offsets
        self.roots: list[Node] = []
        self.stack: list[Node] = []
        self.count = 0
        parser.StartElementHandler = self.start
        parser.EndElementHandler = self.end
        parser.CharacterDataHandler = self.chars

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        self.count += 1
        if self.count > MAX_XML_ELEMENTS:
            raise DomainXMLError(f"{self.what} XML has more than {MAX_XML_ELEMENTS} elements")
        if len(self.stack) >= MAX_XML_DEPTH:
            raise DomainXMLError(f"{self.what} XML nests elements more than {MAX_XML_DEPTH} deep (at <{tag}>)")
        parent = self.stack[-1] if self.stack else None
        node = Node(tag, attrs, parent, self.parser.CurrentByteIndex if self.offsets else -1)
        if self.offsets:
            node.stag_end = _start_tag_end(self.data, node.start)
            node.empty = self.data[node.stag_end - 2 : node.stag_end] == b"/>"
        (self.roots if parent is None else parent.children).append(node)
        self.stack.append(node)

    def end(self, _tag: str) -> None:
        node = self.stack.pop()
        if not self.offsets:
            return
        if node.empty:
            node.etag_start = node.end = node.stag_end
        else:
            node.etag_start = self.parser.CurrentByteIndex
            node.end = self.data.index(b">", node.etag_start) + 1

    def chars(self, text: str) -> None:
        if self.stack:
            self.stack[-1].text_parts.append(text)


def parse(data: bytes, *, what: str, root: str, utf8: bool, offsets: bool = False) -> Node:
    """Parse `data` (from to_bytes) into its root element, which must be <`root`>. With `offsets`,
    every Node carries its byte span (for Splicer)."""
    _check_size(data, what)
    parser = _hardened_parser(what, utf8)
    tree = _TreeBuilder(parser, data, what, offsets)
    try:
        parser.Parse(data, True)
    except _expat.ExpatError as exc:
        raise DomainXMLError(
            f"{what} XML is not well-formed: {_expat.ErrorString(exc.code)} (line {exc.lineno}, column {exc.offset})"
        ) from None
    except RecursionError:  # pragma: no cover - expat is iterative; belt and braces
        raise DomainXMLError(f"{what} XML is nested too deeply") from None
    if not tree.roots:
        raise DomainXMLError(f"{what} XML has no root element")
    if tree.roots[0].tag != root:
        raise DomainXMLError(f"{what} XML: root element is <{tree.roots[0].tag}>, expected <{root}>")
    return tree.roots[0]


# --- splicing --------------------------------------------------------------------------------------
#
# Edits are (start, end, replacement) ranges of the original bytes, applied in one pass. Removed
# elements take their own line (newline + indentation) with them; inserted ones get the indentation
# of their siblings, so that editing twice gives the same bytes.

_ATTR_RE = re.compile(rb"""(\s+)([^\s=/>]+)(\s*=\s*)("[^"]*"|'[^']*')""")
_NAME_RE = re.compile(rb"<[^\s/>]+")


class Splicer:
    """Collects edits to a document's bytes and applies them at once (`apply`)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._edits: list[tuple[int, int, int, int, bytes]] = []

    def replace(self, start: int, end: int, text: bytes) -> None:
        self._edits.append((start, 0 if start == end else 1, len(self._edits), end, text))

    def insert(self, pos: int, text: bytes) -> None:
        self.replace(pos, pos, text)

    def remove(self, node: Node) -> None:
        ws_start, _ = self.line_prefix(node)
        self.replace(ws_start, node.end, b"")

    def line_prefix(self, node: Node) -> tuple[int, bytes]:
        """(offset, text) of the newline + indentation right before `node`, or (start, b"") when the
        element does not start its own line."""
        i = _skip_back(self.data, node.start, 0, b" \t")
        if i > 0 and self.data[i - 1] == 0x0A:
            i = _skip_back(self.data, i - 1, 0, b"\r", most=1)
            return i, self.data[i : node.start]
        return node.start, b""

    def apply(self) -> bytes:
        out: list[bytes] = []
        cursor = 0
        for start, _kind, _seq, end, text in sorted(self._edits):
            if start < cursor:
                raise AssertionError("overlapping edits")  # a bug in the caller, not bad input
            out.append(self.data[cursor:start])
            out.append(text)
            cursor = max(cursor, end)
        out.append(self.data[cursor:])
        return b"".join(out)

    # --- element-level edits -----------------------------------------------------------------------

    def indent_unit(self, root: Node) -> bytes:
        """The document's indentation step (what a child adds to its parent's), "  " if unknown."""
        _, root_prefix = self.line_prefix(root)
        root_indent = root_prefix.lstrip(b"\r\n")
        for child in root.children:
            _, p = self.line_prefix(child)
            indent = p.lstrip(b"\r\n")
            if p and len(indent) > len(root_indent):
                return indent[len(root_indent) :]
        return b"  "

    def _child_prefix(self, container: Node, unit: bytes) -> bytes:
        for c in container.children:
            _, p = self.line_prefix(c)
            if p:
                return p
        _, p = self.line_prefix(container)
        if not p:  # a one-line document (or container): keep it on one line
            return b""
        return p + unit

    def _insert_before(self, anchor: Node, items: list[bytes]) -> None:
        pos, prefix = self.line_prefix(anchor)
        self.insert(pos, b"".join(prefix + it for it in items))

    def replace_children(
        self, container: Node, owned: list[Node], items: list[bytes], unit: bytes, before: tuple[str, ...] = ()
    ) -> None:
        """Remove `owned` (children of `container`) and put `items` where the first of them was, else
        before the first child whose tag is in `before`, else at the end of the container."""
        for node in owned:
            self.remove(node)
        if not items:
            return
        anchor = owned[0] if owned else next((c for c in container.children if c.tag in before), None)
        if anchor is not None:
            self._insert_before(anchor, items)
        elif container.empty:
            self._fill_empty(container, items, unit)
        else:
            self._append(container, items, unit)

    def _fill_empty(self, container: Node, items: list[bytes], unit: bytes) -> None:
        """<cputune/> -> <cputune>items</cputune>."""
        child_prefix = self._child_prefix(container, unit)
        _, own_prefix = self.line_prefix(container)
        body = b"".join(child_prefix + it for it in items)
        stag = self.data[container.start : container.stag_end][:-2].rstrip() + b">"
        close = own_prefix if child_prefix else b""
        self.replace(container.start, container.end, stag + body + close + f"</{container.tag}>".encode())

    def _append(self, container: Node, items: list[bytes], unit: bytes) -> None:
        """Put `items` after the container's last child, before the line that closes it."""
        child_prefix = self._child_prefix(container, unit)
        _, own_prefix = self.line_prefix(container)
        body = b"".join(child_prefix + it for it in items)
        i = _skip_back(self.data, container.etag_start, container.stag_end, b" \t")
        if i > container.stag_end and self.data[i - 1] == 0x0A:
            self.insert(_skip_back(self.data, i - 1, container.stag_end, b"\r", most=1), body)
        else:
            self.insert(container.etag_start, body + (own_prefix if child_prefix else b""))

    def create_container(self, root: Node, tag: str, items: list[bytes], unit: bytes, after: tuple[str, ...]) -> None:
        """A new <tag> holding `items`, after the last child of `root` whose tag is in `after`
        (else before the first child)."""
        anchors = [c for c in root.children if c.tag in after]
        if anchors:
            _, prefix = self.line_prefix(anchors[-1])
            pos = anchors[-1].end
        else:
            pos, prefix = self.line_prefix(root.children[0])
        child_prefix = prefix + unit if prefix else b""
        body = b"".join(child_prefix + it for it in items)
        self.insert(pos, prefix + f"<{tag}>".encode() + body + prefix + f"</{tag}>".encode())

    def edit_attrs(self, node: Node, changes: dict[str, str | None]) -> None:
        """Set (str) or remove (None) attributes in `node`'s start tag, keeping the others' bytes."""
        found, last_end = _start_tag_attrs(self.data[node.start : node.stag_end])
        for name, value in changes.items():
            am = found.get(name)
            if am is None:
                if value is not None:
                    self.insert(node.start + last_end, f" {name}='{_xml_escape(value, {chr(39): '&apos;'})}'".encode())
            elif value is None:
                self.replace(node.start + am.start(), node.start + am.end(), b"")
            else:
                q = am.group(4)[:1].decode()
                esc = _xml_escape(value, {'"': "&quot;"} if q == '"' else {"'": "&apos;"})
                self.replace(node.start + am.start(4), node.start + am.end(4), f"{q}{esc}{q}".encode())


def _skip_back(data: bytes, i: int, floor: int, chars: bytes, most: int = -1) -> int:
    """Move `i` back over `chars` (at most `most` of them when >= 0), not below `floor`."""
    while i > floor and data[i - 1] in chars and most != 0:
        i -= 1
        most -= 1
    return i


def _start_tag_attrs(stag: bytes) -> tuple[dict[str, re.Match[bytes]], int]:
    """The attributes of a start tag by name, and the offset just after the last of them."""
    m = _NAME_RE.match(stag)
    assert m is not None
    pos = m.end()
    found: dict[str, re.Match[bytes]] = {}
    while (am := _ATTR_RE.match(stag, pos)) is not None:
        found[am.group(2).decode("utf-8", "replace")] = am
        pos = am.end()
    return found, pos
