"""Instance metadata in the domain's <metadata>: pure read/write (byte preservation, bounds, the
placement record untouched) and the libvirt edge on test:///default."""

from __future__ import annotations

import re
import uuid as uuidlib
from pathlib import Path
from typing import Iterator

import libvirt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import DomainXMLError, InvalidInput
from agent.libvirt_ops.domain_xml import PLACEMENT_NS, parse_domain
from agent.libvirt_ops.instance_metadata import (
    INSTANCE_NS,
    MAX_KEY_CHARS,
    MAX_KEYS,
    InstanceMetadata,
    load_instance_metadata,
    read_instance_metadata,
    store_instance_metadata,
    write_instance_metadata,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "domains"
FIXTURE_NAMES = sorted(p.name for p in FIXTURES.glob("*.xml"))
META = InstanceMetadata({"hw:cpu_policy": "dedicated"}, {"hw_mem_page_size": "2048"})


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def strip_ours(xml: str) -> str:
    """The document minus our element and a <metadata> left empty, by plain regexes."""
    s = re.sub(r"(\r?\n[ \t]*)?<(\w+):instance xmlns:\2=\"" + re.escape(INSTANCE_NS) + r"\">.*?</\2:instance>", "", xml)
    return re.sub(r"(\r?\n[ \t]*)?<metadata>\s*</metadata>", "", s)


# --- pure -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_write_then_read_keeps_every_other_byte(name: str) -> None:
    xml = fixture(name)
    out = write_instance_metadata(xml, META)
    assert read_instance_metadata(out) == META
    assert strip_ours(out) == strip_ours(xml)
    assert parse_domain(out).agent_placement == parse_domain(xml).agent_placement


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_writing_twice_gives_the_same_bytes_and_replaces_in_place(name: str) -> None:
    once = write_instance_metadata(fixture(name), InstanceMetadata({"a": "1"}))
    twice = write_instance_metadata(once, META)
    assert write_instance_metadata(twice, META) == twice
    assert read_instance_metadata(twice) == META
    assert twice.count(INSTANCE_NS) == 1


def test_next_to_the_placement_record() -> None:
    xml = fixture("with_old_placement.xml")
    assert PLACEMENT_NS in xml
    out = write_instance_metadata(xml, META)
    metadata = out[out.index("<metadata>") : out.index("</metadata>")]
    assert PLACEMENT_NS in metadata and INSTANCE_NS in metadata


def test_absent_is_none_and_empty_maps_round_trip() -> None:
    xml = fixture("hand_written_no_tune.xml")
    assert read_instance_metadata(xml) is None
    empty = InstanceMetadata()
    assert read_instance_metadata(write_instance_metadata(xml, empty)) == empty


def test_uuid_is_kept_and_used_for_the_request() -> None:
    meta = InstanceMetadata({}, {}, uuid="8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a10")
    assert read_instance_metadata(write_instance_metadata(fixture("single_line.xml"), meta)) == meta
    assert meta.request_doc(uuid="x", vcpus=2, memory_mb=512)["uuid"] == meta.uuid
    assert META.request_doc(uuid="x", vcpus=2, memory_mb=512)["uuid"] == "x"


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '{"extra_specs": {"a": 1}}',
        '{"extra_specs": []}',
        '{"image_properties": {"": "x"}}',
        "[1]",
    ],
)
def test_bad_stored_json_is_a_domain_xml_error(text: str) -> None:
    xml = f'<domain><name>d</name><metadata><x:instance xmlns:x="{INSTANCE_NS}">{text}</x:instance></metadata></domain>'
    with pytest.raises(DomainXMLError, match="metadata"):
        read_instance_metadata(xml)


def test_two_elements_in_our_namespace_are_refused() -> None:
    el = f'<x:instance xmlns:x="{INSTANCE_NS}">{{}}</x:instance>'
    xml = f"<domain><name>d</name><metadata>{el}{el}</metadata></domain>"
    with pytest.raises(DomainXMLError, match="2 elements"):
        read_instance_metadata(xml)
    with pytest.raises(DomainXMLError, match="2 elements"):
        write_instance_metadata(xml, META)


def test_unknown_keys_in_the_stored_json_are_ignored() -> None:
    xml = (
        f'<domain><name>d</name><metadata><x:instance xmlns:x="{INSTANCE_NS}">'
        '{"extra_specs": {"a": "b"}, "future": 1}</x:instance></metadata></domain>'
    )
    assert read_instance_metadata(xml) == InstanceMetadata({"a": "b"})


def test_bounds() -> None:
    with pytest.raises(InvalidInput, match="keys"):
        InstanceMetadata({f"k{i}": "v" for i in range(MAX_KEYS + 1)})
    with pytest.raises(InvalidInput, match="key"):
        InstanceMetadata({"k" * (MAX_KEY_CHARS + 1): "v"})
    with pytest.raises(InvalidInput):
        InstanceMetadata({"k": 1})  # type: ignore[dict-item]
    with pytest.raises(InvalidInput, match="characters of JSON"):
        InstanceMetadata({f"k{i}": "v" * 60000 for i in range(10)})


def test_a_dtd_is_refused() -> None:
    xml = '<!DOCTYPE d [<!ENTITY e "x">]><domain><name>d</name></domain>'
    with pytest.raises(DomainXMLError, match="DOCTYPE"):
        read_instance_metadata(xml)
    with pytest.raises(DomainXMLError):
        write_instance_metadata(xml, META)


def test_the_maps_are_read_only() -> None:
    with pytest.raises(TypeError):
        META.extra_specs["x"] = "y"  # type: ignore[index]


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
_maps = st.dictionaries(st.text(min_size=1, max_size=20), _text, max_size=5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(FIXTURE_NAMES), specs=_maps, props=_maps)
def test_any_metadata_round_trips_and_keeps_the_rest(name: str, specs: dict, props: dict) -> None:
    meta = InstanceMetadata(specs, props)
    xml = fixture(name)
    out = write_instance_metadata(xml, meta)
    assert read_instance_metadata(out) == meta
    assert strip_ours(out) == strip_ours(xml)
    assert strip_ours(write_instance_metadata(out, META)) == strip_ours(xml)


# --- libvirt edge: test:///default ----------------------------------------------------------------


@pytest.fixture
def test_domain() -> Iterator[tuple[libvirt.virConnect, str]]:
    """A running domain of its own on the test driver (its state is shared in the process)."""
    conn = libvirt.open("test:///default")
    name = f"im-{uuidlib.uuid4().hex[:8]}"
    xml = (
        f"<domain type='test'><name>{name}</name><memory unit='MiB'>512</memory><vcpu>2</vcpu>"
        "<os><type>hvm</type></os></domain>"
    )
    dom = conn.defineXML(xml)
    dom.create()
    try:
        yield conn, name
    finally:
        dom.destroy()
        dom.undefine()
        conn.close()


def test_store_and_load_on_a_running_persistent_domain(test_domain: tuple[libvirt.virConnect, str]) -> None:
    conn, name = test_domain
    assert load_instance_metadata(conn.lookupByName(name)) == InstanceMetadata()
    assert store_instance_metadata(conn, name, META) == META
    dom = conn.lookupByName(name)
    assert read_instance_metadata(dom.XMLDesc(0)) == META
    assert read_instance_metadata(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) == META
    other = InstanceMetadata({"x": "y"})
    store_instance_metadata(conn, name, other)
    assert load_instance_metadata(dom) == other
