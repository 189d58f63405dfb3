"""The instance's flavor extra specs and image properties, kept with the domain in its `<metadata>`.

Stored as one element next to the agent's placement record:

    <metadata>
      <ca:placement xmlns:ca="https://compute-agent.dev/xmlns/placement/1">{...}</ca:placement>
      <ci:instance xmlns:ci="https://compute-agent.dev/xmlns/instance/1">{"extra_specs": {...},
        "image_properties": {...}, "uuid": "..."}</ci:instance>
    </metadata>

Why a namespace of its own and not a second element under PLACEMENT_NS: libvirt keeps exactly one
top-level element per namespace in `<metadata>` (virDomainSetMetadata replaces it, the parser drops
later ones), and `domain_read` refuses two elements in the placement namespace.

Pure functions (`read_instance_metadata`, `write_instance_metadata`: XML in, XML out, every other
byte kept, the result read back) and the libvirt edge (`load_instance_metadata`,
`store_instance_metadata`: `virDomainSetMetadata` on the live and persistent definitions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated, Any, Mapping
from xml.sax.saxutils import escape as _xml_escape

import msgspec

from agent.errors import DomainXMLError, InvalidInput
from agent.libvirt_ops.connection import _libvirt, lookup_domain
from agent.libvirt_ops.domain_read import parse_domain, read_domain
from agent.libvirt_ops.domain_rewrite import _METADATA_AFTER
from agent.libvirt_ops.errors import LibvirtOpError
from agent.limits import MAX_INSTANCE_METADATA_CHARS
from agent.xmlsafe import Node, Splicer, parse, to_bytes

__all__ = [
    "INSTANCE_NS",
    "InstanceMetadata",
    "load_instance_metadata",
    "read_instance_metadata",
    "store_instance_metadata",
    "write_instance_metadata",
]

INSTANCE_NS = "https://compute-agent.dev/xmlns/instance/1"
INSTANCE_PREFIX = "ci"
INSTANCE_TAG = "instance"

MAX_KEYS = 1024  # per map: docs/protocol.md's metadata bound, far above any flavor or image
MAX_KEY_CHARS = 255  # Nova's and Glance's key column width
MAX_VALUE_CHARS = 65535  # Glance's property value column width (Nova's extra specs: 255)

_Key = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_KEY_CHARS)]
_Value = Annotated[str, msgspec.Meta(max_length=MAX_VALUE_CHARS)]
_Map = Annotated[dict[_Key, _Value], msgspec.Meta(max_length=MAX_KEYS)]


class _MetadataDoc(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """The JSON inside `<ci:instance>` (unknown keys ignored: a newer agent may add some)."""

    extra_specs: _Map = {}
    image_properties: _Map = {}
    uuid: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None


def _frozen(items: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(sorted(items.items())))


@dataclass(frozen=True, slots=True)
class InstanceMetadata:
    """What the instance asks of a host, as Nova would hand it over: flavor extra specs and image
    properties (strings), and optionally the instance's UUID when it differs from the domain's."""

    extra_specs: Mapping[str, str] = field(default_factory=dict)
    image_properties: Mapping[str, str] = field(default_factory=dict)
    uuid: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra_specs", _frozen(self.extra_specs))
        object.__setattr__(self, "image_properties", _frozen(self.image_properties))
        _check_bounds(self)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"extra_specs": dict(self.extra_specs), "image_properties": dict(self.image_properties)}
        if self.uuid is not None:
            doc["uuid"] = self.uuid
        return doc

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any]) -> InstanceMetadata:
        """From the stored JSON (text) or a decoded object; InvalidInput naming the field."""
        try:
            if isinstance(data, (str, bytes)):
                doc = msgspec.json.decode(data, type=_MetadataDoc)
            else:
                doc = msgspec.convert(data, type=_MetadataDoc)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidInput(f"instance metadata: {exc}") from None
        return cls(doc.extra_specs, doc.image_properties, doc.uuid)

    def request_doc(self, *, uuid: str, vcpus: int, memory_mb: int) -> dict[str, Any]:
        """The formats.md instance request of this instance (for agent.numa.request.parse_request)."""
        return {
            "uuid": self.uuid or uuid,
            "vcpus": vcpus,
            "memory_mb": memory_mb,
            "extra_specs": dict(self.extra_specs),
            "image_properties": dict(self.image_properties),
        }

    def merged(self, extra_specs: Mapping[str, str], image_properties: Mapping[str, str]) -> InstanceMetadata:
        """These keys set on top of the present ones."""
        return InstanceMetadata(
            {**self.extra_specs, **extra_specs}, {**self.image_properties, **image_properties}, self.uuid
        )


def _check_bounds(meta: InstanceMetadata) -> None:
    for what, items in (("extra_specs", meta.extra_specs), ("image_properties", meta.image_properties)):
        if len(items) > MAX_KEYS:
            raise InvalidInput(f"instance metadata {what}: {len(items)} keys, more than {MAX_KEYS}")
        for key, value in items.items():
            if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_CHARS:
                raise InvalidInput(f"instance metadata {what}: key {str(key)[:40]!r} is not 1-{MAX_KEY_CHARS} chars")
            if not isinstance(value, str) or len(value) > MAX_VALUE_CHARS:
                raise InvalidInput(f"instance metadata {what}[{key!r}]: not a string of at most {MAX_VALUE_CHARS}")
    if len(json_text(meta)) > MAX_INSTANCE_METADATA_CHARS:
        raise InvalidInput(f"instance metadata: more than {MAX_INSTANCE_METADATA_CHARS} characters of JSON")


def json_text(meta: InstanceMetadata) -> str:
    """The exact JSON stored in the element (sorted keys: writing twice gives the same bytes)."""
    return json.dumps(meta.to_json(), sort_keys=True)  # ASCII: any character survives XML


def element_xml(meta: InstanceMetadata, *, with_namespace: bool = True) -> str:
    """`<ci:instance xmlns:ci=...>JSON</ci:instance>`; without namespace for virDomainSetMetadata,
    which adds the prefix and namespace itself."""
    text = _xml_escape(json_text(meta))
    if not with_namespace:
        return f"<{INSTANCE_TAG}>{text}</{INSTANCE_TAG}>"
    tag = f"{INSTANCE_PREFIX}:{INSTANCE_TAG}"
    return f'<{tag} xmlns:{INSTANCE_PREFIX}="{INSTANCE_NS}">{text}</{tag}>'


# --- pure: read and write the element -------------------------------------------------------------


def _instance_elements(root: Node) -> list[Node]:
    metadata = root.find_one("metadata")
    if metadata is None:
        return []
    return [c for c in metadata.children if c.namespace() == INSTANCE_NS]


def _read_node(root: Node) -> InstanceMetadata | None:
    ours = _instance_elements(root)
    if len(ours) > 1:
        raise DomainXMLError(f"<domain/metadata> holds {len(ours)} elements in namespace {INSTANCE_NS}")
    if not ours:
        return None
    text = ours[0].text
    if len(text) > MAX_INSTANCE_METADATA_CHARS:
        raise DomainXMLError(f"<domain/metadata/{ours[0].tag}>: more than {MAX_INSTANCE_METADATA_CHARS} characters")
    try:
        return InstanceMetadata.from_json(text)
    except InvalidInput as exc:
        raise DomainXMLError(f"<domain/metadata/{ours[0].tag}>: {exc}") from None


def read_instance_metadata(xml: str | bytes) -> InstanceMetadata | None:
    """The instance metadata recorded in a domain's XML (None when there is none). Raises
    DomainXMLError for a malformed document or element; bounded by agent.xmlsafe's limits."""
    data, utf8 = to_bytes(xml, "domain")
    return _read_node(parse(data, what="domain", root="domain", utf8=utf8))


def write_instance_metadata(xml: str | bytes, meta: InstanceMetadata) -> str:
    """The domain XML with `meta` recorded in `<metadata>`: our element replaced in place (or added
    after the other metadata, or a new `<metadata>` where libvirt puts it); every other byte kept.
    The result is read back: it must say `meta` and keep the placement record as it was."""
    data, _ = to_bytes(xml, "domain", require_utf8=True)
    root = parse(data, what="domain", root="domain", utf8=True, offsets=True)
    ours = _instance_elements(root)
    if len(ours) > 1:
        raise DomainXMLError(f"<domain/metadata> holds {len(ours)} elements in namespace {INSTANCE_NS}")
    before = read_domain(root)
    splicer = Splicer(data)
    element = element_xml(meta).encode()
    metadata = root.find_one("metadata")
    if ours:
        splicer.replace(ours[0].start, ours[0].end, element)
    elif metadata is None:
        splicer.create_container(root, "metadata", [element], splicer.indent_unit(root), _METADATA_AFTER)
    else:
        splicer.replace_children(metadata, [], [element], splicer.indent_unit(root))
    out = splicer.apply().decode("utf-8")
    _verify(out, meta, before.agent_placement)
    return out


def _verify(out: str, meta: InstanceMetadata, placement: Mapping[str, object] | None) -> None:
    if read_instance_metadata(out) != meta or parse_domain(out).agent_placement != placement:
        raise DomainXMLError("internal error: the rewritten XML does not say the instance metadata written")


# --- the libvirt edge -----------------------------------------------------------------------------


def load_instance_metadata(dom: Any) -> InstanceMetadata:
    """The metadata recorded with a domain (its live definition when running); empty when none."""
    libvirt = _libvirt()
    try:
        xml = dom.XMLDesc(0)
    except libvirt.libvirtError as exc:
        raise LibvirtOpError.from_libvirt("reading the domain XML", exc) from None
    return read_instance_metadata(xml) or InstanceMetadata()


def store_instance_metadata(conn: Any, domain: str, meta: InstanceMetadata) -> InstanceMetadata:
    """Record `meta` with `domain` (live and persistent definitions) and return what libvirt then
    reports. The new XML is computed (and read back) first, so nothing is written for a domain
    whose XML we cannot handle."""
    libvirt = _libvirt()
    dom = lookup_domain(conn, domain)
    try:
        write_instance_metadata(dom.XMLDesc(0), meta)  # validates before anything is written
        flags = (libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0) | (
            libvirt.VIR_DOMAIN_AFFECT_CONFIG if dom.isPersistent() else 0
        )
        dom.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            element_xml(meta, with_namespace=False),
            INSTANCE_PREFIX,
            INSTANCE_NS,
            flags,
        )
    except libvirt.libvirtError as exc:
        raise LibvirtOpError.from_libvirt(f"recording the instance metadata of {domain!r}", exc) from None
    stored = load_instance_metadata(dom)
    if stored != meta:
        raise LibvirtOpError(f"libvirt did not keep the instance metadata of {domain!r} as written")
    return stored
