"""Domain XML: hardened parsing and byte-preserving rewrite for a Placement."""

from __future__ import annotations

import json
import re
import uuid as uuidlib
from pathlib import Path
from xml.sax.saxutils import escape as _xml_escape

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cpuset import format_cpu_set
from agent.errors import DomainXMLError, InvalidInput
from agent.libvirt_ops.domain_xml import (
    MAX_XML_BYTES,
    PLACEMENT_NS,
    DomainPlacement,
    GuestNumaCell,
    HugepageBacking,
    floating_vcpus,
    parse_domain,
    placement_json_text,
    rewrite_for_placement,
)
from agent.numa.placement import CellPlacement, Placement

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "domains"
FIXTURE_NAMES = sorted(p.name for p in FIXTURES.glob("*.xml"))


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


# --- helpers independent of the implementation ----------------------------------------------------

_WS = r"(\r?\n[ \t]*)?"


def strip_owned(xml: str) -> str:
    """The document minus what the rewriter owns, by plain regexes (not the rewriter's code):
    cputune pins, numatune memory/memnode, our metadata element, containers left empty, and the
    <vcpu cpuset=> attribute (placement='auto' normalised to 'static')."""
    s = re.sub(_WS + r"<(vcpupin|emulatorpin|iothreadpin|memnode)\b[^>]*/>", "", xml)
    s = re.sub(_WS + r"<memory\b[^>]*/>", "", s)  # numatune/memory; the domain's <memory> has text
    s = re.sub(
        _WS + r'<(\w+):placement xmlns:\2="' + re.escape(PLACEMENT_NS) + r'">.*?</\2:placement>', "", s, flags=re.S
    )
    s = re.sub(_WS + r"<(cputune|numatune|metadata)\s*(/>|>\s*</\2>)", "", s)

    def vcpu_tag(m: re.Match[str]) -> str:
        tag = re.sub(r"""\s+cpuset=(['"])[^'"]*\1""", "", m.group(0))
        return re.sub(r"""(placement=)(['"])auto\2""", r"\1\2static\2", tag)

    return re.sub(r"<vcpu\b[^>]*>", vcpu_tag, s)


def assert_reflects(out: str, placement: Placement, before: DomainPlacement, *, floating_cpuset=None) -> None:
    after = parse_domain(out)
    pins = {v: frozenset(c.cpu_pins[v]) for c in placement.cells for v in c.vcpus}
    assert dict(after.vcpu_pins) == pins
    emu = frozenset(placement.emulator_pins)
    assert after.emulator_pins == (emu or None)
    assert dict(after.iothread_pins) == ({t: emu for t in before.iothread_pins} if emu else {})
    floating = floating_vcpus(placement)
    if floating:
        want = floating_cpuset or frozenset().union(*(pins[v] for v in floating))
        assert after.vcpu_cpuset == want
    else:
        assert after.vcpu_cpuset is None
    # issue 11, defects 6 and 7: the mode is kept; memory is bound only where the placement pins it
    # (guest NUMA cells, hugepages, dedicated vCPUs, isolated emulator) or the domain had a nodeset
    pins_memory = placement.emulator_isolated or any(c.dedicated_vcpus or c.pagesize_kb != 4 for c in placement.cells)
    if before.guest_cells or before.numatune_nodeset is not None or pins_memory:
        assert after.numatune_mode == (before.numatune_mode or "strict")
        assert after.numatune_nodeset == frozenset(c.host_cell for c in placement.cells)
    else:
        assert (after.numatune_mode, after.numatune_nodeset) == (before.numatune_mode, before.numatune_nodeset)
    if before.guest_cells:
        assert dict(after.memnodes) == {c.guest_cell: frozenset([c.host_cell]) for c in placement.cells}
    else:
        assert dict(after.memnodes) == {}
    assert after.agent_placement == placement.to_json()
    assert Placement.from_json(dict(after.agent_placement)) == placement  # what host state reads back
    # guest side untouched
    assert (after.name, after.uuid, after.vcpus, after.memory_kib) == (
        before.name,
        before.uuid,
        before.vcpus,
        before.memory_kib,
    )
    assert after.guest_cells == before.guest_cells
    assert after.hugepages == before.hugepages


def guest_memory(dom: DomainPlacement, gid: int) -> tuple[int, int]:
    """(MiB rounded up, page size KiB) of guest cell `gid` (0 = the whole domain without cells):
    the page whose nodeset holds the cell, else the one without nodeset, else 4 KiB; bare
    <hugepages/> -> 2048 (the host default)."""
    kib = next((c.memory_kib for c in dom.guest_cells if c.id == gid), dom.memory_kib)
    size = 4
    if dom.hugepages:
        page = next((h for h in dom.hugepages if h.guest_nodeset and gid in h.guest_nodeset), None) or next(
            (h for h in dom.hugepages if h.guest_nodeset is None), None
        )
        if page is not None:
            size = page.size_kib or 2048
    return -(-kib // 1024), size


def placement_for(dom: DomainPlacement, *, host_of=lambda g: g, base: int = 100, emulator=(9,), dedicated=True):
    groups = [(c.id, sorted(c.cpus)) for c in dom.guest_cells] or [(0, list(range(dom.vcpus)))]
    cells = []
    for gid, vcpus in groups:
        if dedicated:
            pins = {v: (base + v,) for v in vcpus}
            ded = frozenset(vcpus)
        else:
            pins = {v: (base, base + 1) for v in vcpus}
            ded = frozenset()
        cells.append(CellPlacement(gid, host_of(gid), tuple(vcpus), pins, *guest_memory(dom, gid), dedicated_vcpus=ded))
    return Placement(cells=tuple(cells), emulator_pins=tuple(emulator))


# --- parsing --------------------------------------------------------------------------------------


def test_parse_nova_dump() -> None:
    d = parse_domain(fixture("nova_pinned_2cell.xml"))
    assert d.name == "instance-0000002a"
    assert d.uuid == "8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a10"
    assert d.vcpus == 8
    assert d.memory_kib == 8388608
    assert d.vcpu_cpuset == frozenset(range(20, 28)) | frozenset(range(60, 68))
    assert d.vcpu_pins == {0: {20}, 1: {60}, 2: {21}, 3: {61}, 4: {40}, 5: {80}, 6: {41}, 7: {81}}
    assert d.emulator_pins == frozenset({20, 21, 40, 41, 60, 61, 80, 81})
    assert d.iothread_pins == {1: frozenset({20, 21, 40, 41, 60, 61, 80, 81})}
    assert d.guest_cells == (
        GuestNumaCell(0, frozenset(range(4)), 4194304),
        GuestNumaCell(1, frozenset(range(4, 8)), 4194304),
    )
    assert (d.numatune_mode, d.numatune_nodeset) == ("strict", frozenset({0, 1}))
    assert d.memnodes == {0: {0}, 1: {1}}
    assert d.hugepages == (HugepageBacking(2048, frozenset({0, 1})),)
    assert d.agent_placement is None


def test_parse_units_bare_hugepages_and_agent_metadata() -> None:
    d = parse_domain(fixture("with_old_placement.xml"))
    assert d.memory_kib == 2097152
    assert d.guest_cells == (GuestNumaCell(0, frozenset({0, 1}), 1048576), GuestNumaCell(1, frozenset({2, 3}), 1048576))
    assert d.hugepages == (HugepageBacking(None, None),)
    assert d.agent_placement == {"fits": True, "cells": [], "emulator_pins": [3]}
    assert (d.numatune_mode, d.numatune_nodeset) == ("preferred", frozenset({0}))

    h = parse_domain(fixture("hand_written_no_tune.xml").encode("utf-8"))  # bytes with a declaration
    assert h.memory_kib == 4 * 1024 * 1024
    assert h.vcpu_pins == {} and h.emulator_pins is None and h.numatune_mode is None
    assert h.guest_cells == (GuestNumaCell(0, frozenset(range(4)), 4 * 1024 * 1024),)

    c = parse_domain(fixture("cputune_without_pins.xml"))
    assert c.memory_kib == 2048 * 1024 and c.vcpus == 2  # `current` does not count
    assert (c.numatune_mode, c.numatune_nodeset) == ("interleave", None)


@pytest.mark.parametrize(
    "value,unit,kib",
    [
        ("1024", None, 1024),
        ("2048", "b", 2),
        ("2049", "bytes", 3),  # rounded up like libvirt
        ("1", "k", 1),
        ("1", "KiB", 1),
        ("1000", "KB", 977),
        ("3", "M", 3072),
        ("3", "MiB", 3072),
        ("1", "MB", 977),
        ("2", "G", 2 * 1024**2),
        ("2", "GiB", 2 * 1024**2),
        ("1", "GB", 976563),
        ("1", "T", 1024**3),
        ("1", "TiB", 1024**3),
        ("1", "TB", 10**12 // 1024),
    ],
)
def test_memory_units(value: str, unit: str | None, kib: int) -> None:
    attr = f" unit='{unit}'" if unit else ""
    d = parse_domain(f"<domain><name>u</name><memory{attr}>{value}</memory></domain>")
    assert d.memory_kib == kib


def test_cpuset_syntax_and_vcpu_cpuset() -> None:
    d = parse_domain(
        "<domain><name>c</name><memory>1</memory><vcpu cpuset='0-3,^2,8'>2</vcpu>"
        "<cputune><vcpupin vcpu='1' cpuset=' 4-6 , ^5 '/></cputune></domain>"
    )
    assert d.vcpu_cpuset == {0, 1, 3, 8}
    assert d.vcpu_pins == {1: {4, 6}}
    assert d.vcpus == 2


def test_default_test_driver_domain_parses_and_rewrites() -> None:
    libvirt = pytest.importorskip("libvirt")
    conn = libvirt.open("test:///default")
    try:
        xml = conn.lookupByName("test").XMLDesc()
        d = parse_domain(xml)
        assert d.name == "test" and d.vcpus == 2 and d.memory_kib == 8388608
        p = placement_for(d, host_of=lambda g: 1)
        out = rewrite_for_placement(xml, p)
        assert strip_owned(out) == strip_owned(xml)
        assert_reflects(out, p, d)
        assert rewrite_for_placement(out, p) == out
        # libvirt's own parser accepts the result and keeps what we wrote
        mine = out.replace("<name>test</name>", "<name>rewritten</name>").replace(d.uuid, str(uuidlib.uuid4()))
        mine = mine.replace(" id='1'", "")
        dom = conn.defineXML(mine)
        try:
            back = parse_domain(dom.XMLDesc())
            assert back.vcpu_pins == {0: {100}, 1: {101}}
            assert back.emulator_pins == {9}
            assert back.numatune_nodeset == {1}
            assert back.agent_placement == p.to_json()
        finally:
            dom.undefine()
    finally:
        conn.close()


# --- rewriting fixtures ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("dedicated", [True, False])
@pytest.mark.parametrize("emulator", [(9,), (), (7, 8)])
def test_rewrite_fixture_preserves_everything_else(name: str, dedicated: bool, emulator: tuple[int, ...]) -> None:
    xml = fixture(name)
    before = parse_domain(xml)
    p = placement_for(before, host_of=lambda g: 3 - g, dedicated=dedicated, emulator=emulator)
    out = rewrite_for_placement(xml, p)
    assert strip_owned(out) == strip_owned(xml)
    assert_reflects(out, p, before)
    assert rewrite_for_placement(out, p) == out
    # comments survive verbatim
    for comment in re.findall(r"<!--.*?-->", xml, flags=re.S):
        assert comment in out


def test_rewrite_nova_dump_exact_text() -> None:
    xml = fixture("nova_pinned_2cell.xml")
    p = Placement(
        cells=(
            CellPlacement(
                0,
                1,
                (0, 1, 2, 3),
                {0: (21,), 1: (61,), 2: (22,), 3: (62,)},
                4096,
                2048,
                dedicated_vcpus=frozenset(range(4)),
            ),
            CellPlacement(
                1,
                0,
                (4, 5, 6, 7),
                {4: (1,), 5: (41,), 6: (2,), 7: (42,)},
                4096,
                2048,
                dedicated_vcpus=frozenset(range(4, 8)),
            ),
        ),
        emulator_pins=(23,),
    )
    out = rewrite_for_placement(xml, p)
    expected = xml
    expected = expected.replace("<vcpu placement='static' cpuset='20-27,60-67'>", "<vcpu placement='static'>")
    old_pins = re.search(r"    <vcpupin vcpu='0'.*?<iothreadpin[^>]*/>\n", xml, flags=re.S).group(0)
    new_pins = "".join(
        f"    <vcpupin vcpu='{v}' cpuset='{c}'/>\n"
        for v, c in [(0, 21), (1, 61), (2, 22), (3, 62), (4, 1), (5, 41), (6, 2), (7, 42)]
    )
    new_pins += "    <emulatorpin cpuset='23'/>\n    <iothreadpin iothread='1' cpuset='23'/>\n"
    expected = expected.replace(old_pins, new_pins)
    expected = expected.replace(
        "    <memnode cellid='0' mode='strict' nodeset='0'/>\n    <memnode cellid='1' mode='strict' nodeset='1'/>",
        "    <memnode cellid='0' mode='strict' nodeset='1'/>\n    <memnode cellid='1' mode='strict' nodeset='0'/>",
    )
    expected = expected.replace(
        "    </nova:instance>\n  </metadata>",
        "    </nova:instance>\n"
        f'    <ca:placement xmlns:ca="{PLACEMENT_NS}">{placement_json_text(p)}</ca:placement>\n'
        "  </metadata>",
    )
    assert out == expected


def test_rewrite_creates_containers_with_document_indentation() -> None:
    xml = fixture("hand_written_no_tune.xml")
    before = parse_domain(xml)
    p = placement_for(before, host_of=lambda g: 1)
    out = rewrite_for_placement(xml, p)
    assert (
        '\t<vcpu placement="static">4</vcpu>\n'
        "\t<cputune>\n"
        "\t\t<vcpupin vcpu='0' cpuset='100'/>\n"
        "\t\t<vcpupin vcpu='1' cpuset='101'/>\n"
        "\t\t<vcpupin vcpu='2' cpuset='102'/>\n"
        "\t\t<vcpupin vcpu='3' cpuset='103'/>\n"
        "\t\t<emulatorpin cpuset='9'/>\n"
        "\t</cputune>\n"
        "\t<numatune>\n"
        "\t\t<memory mode='strict' nodeset='1'/>\n"
        "\t\t<memnode cellid='0' mode='strict' nodeset='1'/>\n"
        "\t</numatune>\n"
        "\t<!-- the guest is a single NUMA cell -->" in out
    )
    assert out.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<!-- Hand-written guest')
    assert "\t<description>Ünïcødé before" in out
    assert f'</description>\n\t<metadata>\n\t\t<ca:placement xmlns:ca="{PLACEMENT_NS}">' in out


def test_rewrite_pins_go_before_cachetune_and_auto_placement_becomes_static() -> None:
    xml = fixture("cputune_without_pins.xml")
    d = parse_domain(xml)
    p = placement_for(d, dedicated=False)
    out = rewrite_for_placement(xml, p)
    assert "<vcpu placement='static' current=\"1\" cpuset='100-101'>2</vcpu>" in out
    assert (
        "    <quota>-1</quota>\n"
        "    <vcpupin vcpu='0' cpuset='100-101'/>\n"
        "    <vcpupin vcpu='1' cpuset='100-101'/>\n"
        "    <emulatorpin cpuset='9'/>\n"
        "    <cachetune vcpus='0-1'>" in out
    )
    # a floating guest without NUMA cells on small pages: its memory is not bound (issue 11, defect 7)
    assert "  <numatune>\n    <memory mode='interleave' placement='auto'/>\n  </numatune>" in out
    assert '<app:owner xmlns:app="https://example.org/app">batch</app:owner>\n    <ca:placement' in out


def test_rewrite_single_line_and_self_closing_cputune() -> None:
    xml = fixture("single_line.xml")
    p = placement_for(parse_domain(xml))
    out = rewrite_for_placement(xml, p)
    assert out.count("\n") == xml.count("\n") == 1
    assert (
        "<vcpu>2</vcpu><cputune><vcpupin vcpu='0' cpuset='100'/><vcpupin vcpu='1' cpuset='101'/>"
        "<emulatorpin cpuset='9'/></cputune><numatune><memory mode='strict' nodeset='0'/></numatune><os>" in out
    )


def test_rewrite_crlf_document() -> None:
    xml = fixture("nova_pinned_2cell.xml").replace("\n", "\r\n")
    before = parse_domain(xml)
    p = placement_for(before)
    out = rewrite_for_placement(xml, p)
    assert "\n" not in out.replace("\r\n", "")
    assert strip_owned(out) == strip_owned(xml)
    assert rewrite_for_placement(out, p) == out
    assert_reflects(out, p, before)


def test_floating_cpuset_override_and_all_dedicated_removes_cpuset() -> None:
    xml = fixture("with_old_placement.xml")
    d = parse_domain(xml)
    mixed = Placement(
        cells=(
            CellPlacement(0, 0, (0, 1), {0: (4,), 1: (0, 1)}, 1024, 2048, dedicated_vcpus=frozenset({0})),
            CellPlacement(1, 1, (2, 3), {2: (10, 11), 3: (10, 11)}, 1024, 2048),
        ),
        emulator_pins=(0, 1),
    )
    out = rewrite_for_placement(xml, mixed)
    assert parse_domain(out).vcpu_cpuset == {0, 1, 10, 11}
    out2 = rewrite_for_placement(xml, mixed, floating_cpuset=frozenset({0, 1, 2, 10, 11, 12}))
    assert_reflects(out2, mixed, d, floating_cpuset=frozenset({0, 1, 2, 10, 11, 12}))
    assert "cpuset='0-2,10-12'>4</vcpu>" in out2

    dedicated = placement_for(d)
    out3 = rewrite_for_placement(out2, dedicated)
    assert parse_domain(out3).vcpu_cpuset is None
    assert "<vcpu placement='static'>4</vcpu>" in out3
    with pytest.raises(DomainXMLError, match="floating_cpuset"):
        rewrite_for_placement(xml, mixed, floating_cpuset=frozenset())


def test_iothreadpins_follow_emulator_or_go() -> None:
    xml = fixture("nova_pinned_2cell.xml")
    d = parse_domain(xml)
    out = rewrite_for_placement(xml, placement_for(d, emulator=(5, 6)))
    assert parse_domain(out).iothread_pins == {1: {5, 6}}
    out = rewrite_for_placement(xml, placement_for(d, emulator=()))
    after = parse_domain(out)
    assert after.iothread_pins == {} and after.emulator_pins is None
    assert "<iothreads>1</iothreads>" in out  # the guest keeps its I/O thread


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: Placement(cells=placement_for(d).cells[:1]), "covers vCPUs 0-3 but domain"),
        (
            lambda d: Placement(cells=(CellPlacement(0, 0, tuple(range(8)), {v: (v,) for v in range(8)}, 1, 4),)),
            "guest cells",
        ),
        (
            lambda d: Placement(
                cells=(
                    CellPlacement(0, 0, (0, 1, 2, 3, 4), {v: (v,) for v in range(5)}, 1, 4),
                    CellPlacement(1, 1, (5, 6, 7), {v: (v,) for v in range(5, 8)}, 1, 4),
                )
            ),
            "guest cell 0",
        ),
        (lambda d: Placement(cells=()), "no cells"),
    ],
)
def test_placement_not_for_this_domain(mutate, match: str) -> None:
    xml = fixture("nova_pinned_2cell.xml")
    with pytest.raises(DomainXMLError, match=match):
        rewrite_for_placement(xml, mutate(parse_domain(xml)))


def test_two_cell_placement_for_domain_without_guest_numa() -> None:
    xml = fixture("single_line.xml")
    p = Placement(cells=(CellPlacement(0, 0, (0,), {0: (1,)}, 1, 4), CellPlacement(1, 1, (1,), {1: (2,)}, 1, 4)))
    with pytest.raises(DomainXMLError, match="no <cpu><numa>"):
        rewrite_for_placement(xml, p)


# --- hostile and malformed input ------------------------------------------------------------------

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE domain [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<domain><name>&lol9;</name><memory>1</memory></domain>"""

XXE = """<?xml version="1.0"?>
<!DOCTYPE domain [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<domain><name>&xxe;</name><memory>1</memory></domain>"""

EXTERNAL_DTD = """<?xml version="1.0"?>
<!DOCTYPE domain SYSTEM "http://127.0.0.1:9/domain.dtd">
<domain><name>x</name><memory>1</memory></domain>"""

PARAM_ENTITY = """<!DOCTYPE domain [<!ENTITY % p SYSTEM "http://127.0.0.1:9/p.dtd"> %p;]>
<domain><name>x</name><memory>1</memory></domain>"""


def _ok(body: str) -> str:
    return f"<domain><name>x</name><memory>1</memory><vcpu>4</vcpu>{body}</domain>"


HOSTILE = {
    "billion laughs": (BILLION_LAUGHS, "DOCTYPE"),
    "external entity": (XXE, "DOCTYPE"),
    "external DTD": (EXTERNAL_DTD, "DOCTYPE"),
    "parameter entity": (PARAM_ENTITY, "DOCTYPE"),
    "undefined entity": ("<domain><name>&nope;</name><memory>1</memory></domain>", "undefined entity"),
    "5 MiB": (_ok("<!--" + "x" * (5 * 1024 * 1024) + "-->"), "limit"),
    "truncated": (None, "not well-formed"),
    "empty": ("", "not well-formed"),
    "wrong root": ("<network><name>x</name></network>", "root element is <network>"),
    "two roots": ("<domain><name>x</name></domain><domain/>", "not well-formed"),
    "no name": ("<domain><memory>1</memory></domain>", "name"),
    "no memory": ("<domain><name>x</name></domain>", "memory"),
    "bad memory": ("<domain><name>x</name><memory>lots</memory></domain>", "memory"),
    "bad unit": ("<domain><name>x</name><memory unit='XB'>1</memory></domain>", "unit"),
    "superscript digit": (_ok("<cputune><vcpupin vcpu='\u00b2' cpuset='1'/></cputune>"), "vcpu"),
    "arabic digit": ("<domain><name>x</name><memory>\u0663</memory></domain>", "memory"),
    "5000 digits": ("<domain><name>x</name><memory>" + "9" * 5000 + "</memory></domain>", "memory"),
    "5000-digit cpu": (_ok("<cputune><emulatorpin cpuset='" + "9" * 5000 + "'/></cputune>"), "cpuset"),
    "huge vcpu count": ("<domain><name>x</name><memory>1</memory><vcpu>4000000000</vcpu></domain>", "vCPU count"),
    "too deep": (_ok("<a>" * 100 + "</a>" * 100), "deep"),
    "too many elements": (_ok("<devices>" + "<x/>" * 200_001 + "</devices>"), "elements"),
    "bad vcpu": ("<domain><name>x</name><memory>1</memory><vcpu>two</vcpu></domain>", "vcpu"),
    "zero vcpu": ("<domain><name>x</name><memory>1</memory><vcpu>0</vcpu></domain>", "vcpu"),
    "non-integer cpuset": (_ok("<cputune><vcpupin vcpu='0' cpuset='a-b'/></cputune>"), r"vcpupin> attribute 'cpuset'"),
    "empty cpuset": (_ok("<cputune><vcpupin vcpu='0' cpuset=''/></cputune>"), "cpuset"),
    "negative vcpu id": (_ok("<cputune><vcpupin vcpu='-1' cpuset='1'/></cputune>"), r"vcpupin> attribute 'vcpu'"),
    "negative cpu": (_ok("<cputune><emulatorpin cpuset='-1'/></cputune>"), "emulatorpin> attribute 'cpuset'"),
    "vcpu beyond count": (_ok("<cputune><vcpupin vcpu='4' cpuset='1'/></cputune>"), "4 vCPUs"),
    "vcpu pinned twice": (
        _ok("<cputune><vcpupin vcpu='1' cpuset='1'/><vcpupin vcpu='1' cpuset='2'/></cputune>"),
        "twice",
    ),
    "missing cpuset": (_ok("<cputune><vcpupin vcpu='1'/></cputune>"), "missing"),
    "bad iothread id": (_ok("<cputune><iothreadpin iothread='x' cpuset='1'/></cputune>"), "iothread"),
    "negative cell id": (_ok("<cpu><numa><cell id='-1' cpus='0' memory='1'/></numa></cpu>"), "cell> attribute 'id'"),
    "cell without memory": (_ok("<cpu><numa><cell id='0' cpus='0'/></numa></cpu>"), "memory"),
    "duplicate cell": (
        _ok("<cpu><numa><cell id='0' cpus='0' memory='1'/><cell id='0' cpus='1' memory='1'/></numa></cpu>"),
        "unique",
    ),
    "vcpu in two cells": (
        _ok("<cpu><numa><cell id='0' cpus='0-1' memory='1'/><cell id='1' cpus='1' memory='1'/></numa></cpu>"),
        "two cells",
    ),
    "bad memnode": (_ok("<numatune><memnode cellid='zero' nodeset='0'/></numatune>"), "cellid"),
    "bad nodeset": (_ok("<numatune><memory mode='strict' nodeset='0-'/></numatune>"), "nodeset"),
    "bad page size": (_ok("<memoryBacking><hugepages><page size='2M'/></hugepages></memoryBacking>"), "size"),
    "two cputune": (_ok("<cputune/><cputune/>"), "cputune"),
    "bad placement json": (
        _ok(f'<metadata><ca:placement xmlns:ca="{PLACEMENT_NS}">{{not json</ca:placement></metadata>'),
        "invalid JSON",
    ),
    "placement json not object": (
        _ok(f'<metadata><p:placement xmlns:p="{PLACEMENT_NS}">[1]</p:placement></metadata>'),
        "not an object",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_or_malformed_xml(case: str) -> None:
    xml, match = HOSTILE[case]
    if xml is None:
        text = fixture("nova_pinned_2cell.xml")
        xml = text[: len(text) // 2]
    with pytest.raises(DomainXMLError, match=match):
        parse_domain(xml)
    with pytest.raises(DomainXMLError, match=match):
        parse_domain(xml.encode("utf-8"))
    p = Placement(cells=(CellPlacement(0, 0, (0,), {0: (1,)}, 1, 4),))
    with pytest.raises(DomainXMLError):
        rewrite_for_placement(xml, p)


def test_domain_xml_error_is_invalid_input_and_size_limit_exact() -> None:
    assert issubclass(DomainXMLError, InvalidInput)
    body = _ok("")
    pad = MAX_XML_BYTES - len(body.encode()) - len("<!---->")
    at_limit = body.replace("</domain>", "<!--" + "x" * pad + "--></domain>")
    assert len(at_limit.encode()) == MAX_XML_BYTES
    assert parse_domain(at_limit).name == "x"
    with pytest.raises(DomainXMLError, match="limit"):
        parse_domain(at_limit.replace("<!--", "<!--x"))


@pytest.mark.parametrize("bad", [None, 42, ["<domain/>"]])
def test_non_text_input(bad) -> None:
    with pytest.raises(DomainXMLError):
        parse_domain(bad)


def test_non_utf8_bytes_for_rewrite() -> None:
    p = Placement(cells=(CellPlacement(0, 0, (0,), {0: (1,)}, 1, 4),))
    with pytest.raises(DomainXMLError, match="UTF-8"):
        rewrite_for_placement(b"<domain><name>\xff</name><memory>1</memory></domain>", p)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_documents_never_raise_anything_but_domain_xml_error(data) -> None:
    text = fixture(data.draw(st.sampled_from(FIXTURE_NAMES)))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 20)))
        repl = data.draw(
            st.sampled_from(["", "<", ">", "'", '"', "&", "-", "^", "x", "9", "/", "<!DOCTYPE d>", "&amp;"])
        )
        text = text[:i] + repl + text[j:]
    try:
        d = parse_domain(text)
    except DomainXMLError:
        return
    try:
        rewrite_for_placement(text, placement_for(d))
    except DomainXMLError as exc:  # the placement may not fit the mangled domain; never a splice bug
        assert "internal error" not in str(exc)


# --- property: random documents x random placements -----------------------------------------------


def _draw_groups(draw, n: int, k: int) -> list[list[int]]:
    """The vCPUs of each guest NUMA cell (one group of all vCPUs without <cpu><numa>)."""
    if not k:
        return [list(range(n))]
    cuts = sorted(draw(st.lists(st.integers(1, n - 1), min_size=k - 1, max_size=k - 1, unique=True))) if k > 1 else []
    bounds = [0, *cuts, n]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(k)]


def _metadata_lines(draw) -> list[tuple[int, str]]:
    meta = draw(st.sampled_from(["none", "other", "ours", "both", "empty"]))
    if meta == "none":
        return []
    inner: list[tuple[int, str]] = []
    if meta in ("other", "both"):
        inner.append((2, '<x:keep xmlns:x="urn:x"><x:y z="1"/></x:keep>'))
    if meta in ("ours", "both"):
        inner.append((2, f'<old:placement xmlns:old="{PLACEMENT_NS}">{{"fits": true}}</old:placement>'))
    return [(1, "<metadata>"), *inner, (1, "</metadata>")] if inner else [(1, "<metadata/>")]


def _vcpu_line(draw, a, cpus, n: int) -> tuple[int, str]:
    vattrs = {"placement": draw(st.sampled_from(["static", "auto"]))}
    if draw(st.booleans()):
        vattrs["cpuset"] = format_cpu_set(draw(cpus))
    if draw(st.booleans()):
        vattrs["current"] = 1
    return (1, f"<vcpu{a(**vattrs)}>{n}</vcpu>")


def _cputune_pins(draw, a, cpus, n: int, iothreads: int) -> list[tuple[int, str]]:
    pinned = draw(st.lists(st.sampled_from(range(n)), unique=True))
    inner = [(2, f"<vcpupin{a(vcpu=v, cpuset=format_cpu_set(draw(cpus)))}/>") for v in pinned]
    if draw(st.booleans()):
        inner.append((2, f"<emulatorpin{a(cpuset=format_cpu_set(draw(cpus)))}/>"))
    for t in range(1, iothreads + 1):
        if draw(st.booleans()):
            inner.append((2, f"<iothreadpin{a(iothread=t, cpuset=format_cpu_set(draw(cpus)))}/>"))
    return inner


def _cputune_lines(draw, a, cpus, n: int, iothreads: int) -> list[tuple[int, str]]:
    tune = draw(st.sampled_from(["none", "empty", "knobs", "pins", "all"]))
    if tune in ("none", "empty"):
        return [(1, "<cputune/>")] if tune == "empty" else []
    inner = [(2, "<shares>1024</shares>")] if tune in ("knobs", "all") else []
    if tune in ("pins", "all"):
        inner += _cputune_pins(draw, a, cpus, n, iothreads)
    if tune == "all":
        inner.append((2, f"<vcpusched{a(vcpus='0', scheduler='fifo', priority=1)}/>"))
    return [(1, "<cputune>"), *inner, (1, "</cputune>")]


def _numatune_lines(draw, a, k: int) -> list[tuple[int, str]]:
    numa = draw(st.sampled_from(["none", "memory", "memnodes"]))
    if numa == "none":
        return []
    inner = [(2, f"<memory{a(mode='interleave', nodeset='0-1')}/>")]
    if numa == "memnodes" and k:
        inner += [(2, f"<memnode{a(cellid=g, mode='preferred', nodeset=g)}/>") for g in range(k)]
    return [(1, "<numatune>"), *inner, (1, "</numatune>")]


_HUGEPAGES = [
    (1, "<memoryBacking>"),
    (2, "<hugepages>"),
    (3, "<page{}/>"),
    (2, "</hugepages>"),
    (1, "</memoryBacking>"),
]


@st.composite
def documents(draw):
    """A random but libvirt-shaped domain XML, plus facts about it."""
    n = draw(st.integers(1, 8))
    k = draw(st.integers(0, min(3, n)))  # guest NUMA cells; 0 = no <cpu><numa>
    groups = _draw_groups(draw, n, k)
    q = draw(st.sampled_from(["'", '"']))
    unit = draw(st.sampled_from(["  ", "    ", "\t"]))
    one_line = draw(st.booleans())
    cpus = st.frozensets(st.integers(0, 127), min_size=1, max_size=4)

    def a(**kw: object) -> str:
        return "".join(f" {k}={q}{v}{q}" for k, v in kw.items())

    lines: list[tuple[int, str]] = [(1, "<name>g-1</name>"), (1, f"<uuid>{uuidlib.UUID(int=n * 7919 + k)}</uuid>")]
    if draw(st.booleans()):
        lines.append((1, "<description>random &amp; “unicode” ☃</description>"))
    lines += _metadata_lines(draw)
    lines.append((1, f"<memory{a(unit='KiB')}>{1048576 * n}</memory>"))
    if draw(st.booleans()):
        lines.append((1, f"<!-- comment {draw(st.integers(0, 9))} -->"))
    lines.append(_vcpu_line(draw, a, cpus, n))
    iothreads = draw(st.integers(0, 2))
    if iothreads:
        lines.append((1, f"<iothreads>{iothreads}</iothreads>"))
    lines += _cputune_lines(draw, a, cpus, n, iothreads)
    lines += _numatune_lines(draw, a, k)
    if draw(st.booleans()):
        lines += [(d, t.format(a(size=2048, unit="KiB"))) for d, t in _HUGEPAGES]
    lines.append((1, f"<os><type{a(arch='x86_64')}>hvm</type></os>"))
    if k:
        lines += [(1, "<cpu>"), (2, "<numa>")]
        lines += [(3, f"<cell{a(id=g, cpus=format_cpu_set(grp), memory=1048576)}/>") for g, grp in enumerate(groups)]
        lines += [(2, "</numa>"), (1, "</cpu>")]
    lines.append((1, f"<devices><disk{a(type='file')}><source{a(file='/x')}/></disk></devices>"))
    if one_line:
        xml = f"<domain{a(type='kvm')}>{''.join(t for _, t in lines)}</domain>"
    else:
        xml = f"<domain{a(type='kvm')}>{''.join(chr(10) + unit * d + t for d, t in lines)}\n</domain>\n"
    return xml, groups, k


@st.composite
def placements(draw, groups: list[list[int]], dom: DomainPlacement):
    cells = []
    for g, vcpus in enumerate(groups):
        pins = {}
        dedicated = set()
        for v in vcpus:
            if draw(st.booleans()):
                pins[v] = (draw(st.integers(0, 255)),)
                dedicated.add(v)
            else:
                pins[v] = tuple(sorted(draw(st.frozensets(st.integers(0, 255), min_size=1, max_size=6))))
        cells.append(
            CellPlacement(
                g,
                draw(st.integers(0, 7)),
                tuple(vcpus),
                pins,
                *guest_memory(dom, g),
                dedicated_vcpus=frozenset(dedicated),
            )
        )
    emu = tuple(sorted(draw(st.frozensets(st.integers(0, 255), max_size=3))))
    return Placement(cells=tuple(cells), emulator_pins=emu, emulator_isolated=draw(st.booleans()))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_rewrite(data) -> None:
    xml, groups, _k = data.draw(documents())
    before = parse_domain(xml)
    p = data.draw(placements(groups, before))
    out = rewrite_for_placement(xml, p)
    assert_reflects(out, p, before)
    assert strip_owned(out) == strip_owned(xml)
    assert rewrite_for_placement(out, p) == out
    assert json.loads(re.search(r":placement[^>]*>(.*?)</", out).group(1)) == p.to_json()
    if "\n" not in xml.rstrip("\n"):
        assert out.count("\n") == xml.count("\n")
    # a second, different placement applied on top is as good as applied to the original
    p2 = data.draw(placements(groups, before))
    out2 = rewrite_for_placement(out, p2)
    assert_reflects(out2, p2, parse_domain(out))
    assert strip_owned(out2) == strip_owned(xml)


# --- regressions: hostile values the byte-level fuzzer cannot produce -------------------------------

_BASE = "<domain><name>x</name><memory>1048576</memory><vcpu>2</vcpu>{}</domain>"
_OURS = f"<metadata><p:placement xmlns:p='{PLACEMENT_NS}'>{{}}</p:placement></metadata>"


def test_deeply_nested_metadata_json_is_a_domain_xml_error() -> None:
    # json.loads recurses once per "[": used to escape parse_domain as a RecursionError
    with pytest.raises(DomainXMLError, match="nested too deeply|limit"):
        parse_domain(_BASE.format(_OURS.format("[" * 100000 + "]" * 100000)))
    with pytest.raises(DomainXMLError, match="nested too deeply"):
        parse_domain(_BASE.format(_OURS.format("[" * 50000 + "]" * 50000)))  # under the size limit


def test_oversized_metadata_is_refused() -> None:
    from agent.libvirt_ops.domain_xml import MAX_METADATA_CHARS

    big = json.dumps({"pad": "x" * MAX_METADATA_CHARS})
    with pytest.raises(DomainXMLError, match="limit"):
        parse_domain(_BASE.format(_OURS.format(big)))
    ok = json.dumps({"pad": "x" * (MAX_METADATA_CHARS - 20)})
    assert parse_domain(_BASE.format(_OURS.format(ok))).agent_placement["pad"]


_WIDE = ",".join(["0-65536"] * 2000)
HOSTILE_NUMBERS = [
    "1_0",
    "+3",
    "\u0663",
    "\uff13",
    "1" * 5000,
    "0-" + "1" * 5000,
    _WIDE,
    "0-9999999",
    ",".join(["1"] * 70000),
    "3.0",
    "-1",
]
HOSTILE_SPOTS = [
    "<cputune><vcpupin vcpu='0' cpuset='{}'/></cputune>",
    "<cputune><emulatorpin cpuset='{}'/></cputune>",
    "<cputune><iothreadpin iothread='1' cpuset='{}'/></cputune>",
    "<cputune><vcpupin vcpu='{}' cpuset='1'/></cputune>",
    "<numatune><memory mode='strict' nodeset='{}'/></numatune>",
    "<numatune><memnode cellid='{}' mode='strict' nodeset='0'/></numatune>",
    "<cpu><numa><cell id='0' cpus='{}' memory='1048576'/></numa></cpu>",
    "<cpu><numa><cell id='{}' cpus='0-1' memory='1048576'/></numa></cpu>",
    "<cpu><numa><cell id='0' cpus='0-1' memory='{}'/></numa></cpu>",
    "<memoryBacking><hugepages><page size='{}'/></hugepages></memoryBacking>",
    "<memoryBacking><hugepages><page size='2048' nodeset='{}'/></hugepages></memoryBacking>",
]


@pytest.mark.parametrize("spot", HOSTILE_SPOTS)
@pytest.mark.parametrize("value", HOSTILE_NUMBERS, ids=lambda v: v[:12])
def test_hostile_numbers_and_sets_are_refused_quickly(spot: str, value: str) -> None:
    import time

    t0 = time.monotonic()
    with pytest.raises(DomainXMLError):
        parse_domain(_BASE.format(spot.format(value)))
    assert time.monotonic() - t0 < 1.0


def test_hostile_vcpu_and_memory_text() -> None:
    for value in HOSTILE_NUMBERS:
        with pytest.raises(DomainXMLError):
            parse_domain(f"<domain><name>x</name><memory>1</memory><vcpu>{value}</vcpu></domain>")
        with pytest.raises(DomainXMLError):
            parse_domain(f"<domain><name>x</name><memory>{value}</memory><vcpu>1</vcpu></domain>")


HOSTILE_FRAGMENTS = [
    *HOSTILE_NUMBERS,
    "[" * 20000 + "]" * 20000,
    '{"a":' * 20000 + "1" + "}" * 20000,
    "1" * 5000,
    "x" * 300_000,
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_hostile_values_never_raise_anything_but_domain_xml_error(data) -> None:
    """Put hostile values where the parser reads numbers, sets or JSON (the byte fuzzer above only
    splices short tokens, so it never builds a 5000-digit number or 100k-deep JSON)."""
    import time

    parts = [
        data.draw(st.sampled_from(HOSTILE_SPOTS)).format(data.draw(st.sampled_from(HOSTILE_FRAGMENTS)))
        for _ in range(data.draw(st.integers(0, 3)))
    ]
    if data.draw(st.booleans()):
        parts.append(_OURS.format(_xml_escape(data.draw(st.sampled_from(HOSTILE_FRAGMENTS)))))
    xml = _BASE.format("".join(parts))
    t0 = time.monotonic()
    try:
        d = parse_domain(xml)
    except DomainXMLError:
        assert time.monotonic() - t0 < 2.0
        return
    try:
        rewrite_for_placement(xml, placement_for(d))
    except DomainXMLError as exc:
        assert "internal error" not in str(exc)


# --- regressions: the placement must match the domain's memory and page size -------------------------

_HP_DOMAIN = """<domain>
  <name>x</name>
  <memory unit='GiB'>8</memory>
  <vcpu>2</vcpu>
  <memoryBacking><hugepages><page size='2048' unit='KiB'/></hugepages></memoryBacking>
</domain>"""


def _one_cell(memory_mb: int, pagesize_kb: int) -> Placement:
    return Placement(
        cells=(
            CellPlacement(0, 1, (0, 1), {0: (4,), 1: (5,)}, memory_mb, pagesize_kb, dedicated_vcpus=frozenset({0, 1})),
        )
    )


def test_placement_memory_must_match_the_domain() -> None:
    # a 64 MiB placement used to rewrite an 8 GiB domain silently
    with pytest.raises(DomainXMLError, match="64 MiB .* 8192 MiB"):
        rewrite_for_placement(_HP_DOMAIN, _one_cell(64, 2048))
    with pytest.raises(DomainXMLError, match="8193 MiB"):
        rewrite_for_placement(_HP_DOMAIN, _one_cell(8193, 2048))
    assert parse_domain(rewrite_for_placement(_HP_DOMAIN, _one_cell(8192, 2048))).memory_kib == 8 << 20


def test_placement_page_size_must_match_the_domain() -> None:
    with pytest.raises(DomainXMLError, match="1048576 KiB pages.*2048 KiB pages"):
        rewrite_for_placement(_HP_DOMAIN, _one_cell(8192, 1048576))
    with pytest.raises(DomainXMLError, match="4 KiB pages"):
        rewrite_for_placement(_HP_DOMAIN, _one_cell(8192, 4))
    small = re.sub(r"\s*<memoryBacking>.*</memoryBacking>", "", _HP_DOMAIN)
    rewrite_for_placement(small, _one_cell(8192, 4))
    with pytest.raises(DomainXMLError, match="2048 KiB pages.*4 KiB pages"):
        rewrite_for_placement(small, _one_cell(8192, 2048))
    bare = _HP_DOMAIN.replace("<hugepages><page size='2048' unit='KiB'/></hugepages>", "<hugepages/>")
    rewrite_for_placement(bare, _one_cell(8192, 2048))
    rewrite_for_placement(bare, _one_cell(8192, 1048576))
    with pytest.raises(DomainXMLError, match="hugepage size"):
        rewrite_for_placement(bare, _one_cell(8192, 4))
    mib_unit = _HP_DOMAIN.replace("size='2048' unit='KiB'", "size='1' unit='G'")
    rewrite_for_placement(mib_unit, _one_cell(8192, 1048576))


def test_memory_not_a_whole_mib_rounds_up() -> None:
    xml = _HP_DOMAIN.replace("<memory unit='GiB'>8</memory>", "<memory unit='KiB'>1049000</memory>").replace(
        "\n  <memoryBacking><hugepages><page size='2048' unit='KiB'/></hugepages></memoryBacking>", ""
    )
    rewrite_for_placement(xml, _one_cell(1025, 4))
    with pytest.raises(DomainXMLError, match="1025 MiB"):
        rewrite_for_placement(xml, _one_cell(1024, 4))


_TWO_CELLS = """<domain>
  <name>x</name>
  <memory unit='KiB'>3145728</memory>
  <vcpu>2</vcpu>
  <memoryBacking>
    <hugepages>
      <page size='1048576' unit='KiB' nodeset='1'/>
      <page size='2048' unit='KiB'/>
    </hugepages>
  </memoryBacking>
  <cpu><numa><cell id='0' cpus='0' memory='1048576'/><cell id='1' cpus='1' memory='2097152'/></numa></cpu>
</domain>"""


def _two_cells(mem0: int, page0: int, mem1: int, page1: int) -> Placement:
    return Placement(
        cells=(
            CellPlacement(0, 0, (0,), {0: (4,)}, mem0, page0, dedicated_vcpus=frozenset({0})),
            CellPlacement(1, 1, (1,), {1: (5,)}, mem1, page1, dedicated_vcpus=frozenset({1})),
        )
    )


def test_per_guest_cell_memory_and_page_size() -> None:
    rewrite_for_placement(_TWO_CELLS, _two_cells(1024, 2048, 2048, 1048576))
    with pytest.raises(DomainXMLError, match="guest cell 0 has 2048 MiB.*1024 MiB"):
        rewrite_for_placement(_TWO_CELLS, _two_cells(2048, 2048, 1024, 1048576))  # same sum, swapped
    with pytest.raises(DomainXMLError, match="guest cell 1 uses 2048 KiB pages.*1048576 KiB"):
        rewrite_for_placement(_TWO_CELLS, _two_cells(1024, 2048, 2048, 2048))
    # a cell no <page> covers (no nodeset-less page) is backed by small pages
    only1 = _TWO_CELLS.replace("\n      <page size='2048' unit='KiB'/>", "")
    rewrite_for_placement(only1, _two_cells(1024, 4, 2048, 1048576))
    with pytest.raises(DomainXMLError, match="guest cell 0 uses 2048 KiB pages"):
        rewrite_for_placement(only1, _two_cells(1024, 2048, 2048, 1048576))


# --- one page-size rule per guest cell (the rewriter and host state) ---------------------------------


def test_guest_cell_page_kib_with_and_without_a_default_hugepage_size():
    from agent.libvirt_ops.domain_xml import guest_cell_page_kib

    cells = (GuestNumaCell(0, frozenset({0}), 1024), GuestNumaCell(1, frozenset({1}), 1024))
    base = DomainPlacement(name="d", uuid="", vcpus=2, memory_kib=2048, guest_cells=cells)
    assert guest_cell_page_kib(base, 0) == 4
    sized = DomainPlacement(
        name="d",
        uuid="",
        vcpus=2,
        memory_kib=2048,
        guest_cells=cells,
        hugepages=(HugepageBacking(1 << 20, frozenset({1})), HugepageBacking(2048, None)),
    )
    assert guest_cell_page_kib(sized, 1) == 1 << 20 and guest_cell_page_kib(sized, 0) == 2048
    only_cell1 = DomainPlacement(
        name="d",
        uuid="",
        vcpus=2,
        memory_kib=2048,
        guest_cells=cells,
        hugepages=(HugepageBacking(2048, frozenset({1})),),
    )
    assert guest_cell_page_kib(only_cell1, 0) == 4  # no <page> for the cell: libvirt backs it with small pages
    bare = DomainPlacement(name="d", uuid="", vcpus=2, memory_kib=2048, hugepages=(HugepageBacking(None, None),))
    assert guest_cell_page_kib(bare, 0) is None
    assert guest_cell_page_kib(bare, 0, default_hugepage_kb=2048) == 2048


# --- issue 12 item 13: odd encodings, hugepage sizes, many floating vCPUs --------------------------

_MINIMAL = "<domain type='kvm'><name>x</name><vcpu>1</vcpu><memory>1024</memory></domain>"


@pytest.mark.parametrize("encoding", ["UTF-7", "utf-16", "latin-1", "cp1252", "ebcdic-cp-us", "bogus", ""])
def test_declared_encodings_other_than_utf8_are_refused(encoding: str) -> None:
    doc = f"<?xml version='1.0' encoding='{encoding}'?>{_MINIMAL}".encode()
    with pytest.raises(DomainXMLError, match="encoding"):
        parse_domain(doc)


@pytest.mark.parametrize("encoding", ["UTF-8", "utf8", "US-ASCII", "ascii"])
def test_utf8_and_ascii_declarations_are_read(encoding: str) -> None:
    assert parse_domain(f'<?xml version="1.0" encoding="{encoding}"?>{_MINIMAL}'.encode()).name == "x"


def test_utf16_documents_are_refused() -> None:
    for data in (_MINIMAL.encode("utf-16"), _MINIMAL.encode("utf-32")):
        with pytest.raises(DomainXMLError, match="UTF-16/UTF-32"):
            parse_domain(data)


def test_hugepage_size_must_be_a_power_of_two() -> None:
    doc = _MINIMAL.replace(
        "</domain>", "<memoryBacking><hugepages><page size='3' unit='KiB'/></hugepages></memoryBacking></domain>"
    )
    with pytest.raises(DomainXMLError, match="not a page size"):
        parse_domain(doc)


def test_rewriter_accepts_400_floating_vcpus_on_a_large_host() -> None:
    """The placement JSON in <metadata> lists every CPU a floating vCPU may use: ~1 MB here, which
    the old 256 KiB metadata bound refused on read-back (the parser accepted the guest)."""
    from agent.numa.fit import fit
    from agent.numa.request import parse_request
    from agent.numa.state import HostState

    cpus = list(range(512))
    host = {
        "cells": [
            {"id": 0, "cpus": cpus, "memory_kb": 1 << 30, "pages": [{"size_kb": 4, "total": 1 << 28, "free": 1 << 28}]}
        ]
    }
    uuid = "12345678-1234-1234-1234-123456789012"
    placement = fit(parse_request({"uuid": uuid, "vcpus": 400, "memory_mb": 4096}), HostState.from_json(host))
    assert isinstance(placement, Placement)
    xml = (
        f"<domain type='kvm'><name>x</name><uuid>{uuid}</uuid><memory unit='MiB'>4096</memory><vcpu>400</vcpu></domain>"
    )
    out = rewrite_for_placement(xml, placement)
    assert len(out) > 256 * 1024
    assert parse_domain(out).agent_placement == placement.to_json()
