"""Host discovery: sysfs fixture trees, libvirt capabilities, the cross-check and the fallback.

Fixture trees come from tests/fixtures/make_sysfs_fixtures.py; the `<case>.expected.json` files beside
them were written by hand from the specs in that script.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import socket
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import DiscoveryError, DomainXMLError
from agent.libvirt_ops.host import topology_from_libvirt
from agent.limits import MAX_XML_BYTES
from agent.numa.capabilities import (
    compare_topologies,
    discover,
    parse_xml,
    topology_from_capabilities,
)
from agent.numa.discovery import discover_sysfs, parse_cpu_list
from agent.numa.topology import HostTopology

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SYSFS = FIXTURES / "sysfs"
CAPS = FIXTURES / "capabilities"

GOOD_CASES = sorted(p.name.removesuffix(".expected.json") for p in SYSFS.glob("*.expected.json"))
CAPS_CASES = sorted(p.stem for p in CAPS.glob("*.xml"))


def _expected(case: str) -> dict:
    return json.loads((SYSFS / f"{case}.expected.json").read_text())


def _caps(case: str) -> str:
    return (CAPS / f"{case}.xml").read_text()


def _copy_tree(case: str, tmp_path: Path) -> Path:
    dst = tmp_path / case
    shutil.copytree(SYSFS / case, dst)
    return dst


# --- sysfs fixtures ---------------------------------------------------------------------------


def test_all_fixture_cases_present():
    assert set(GOOD_CASES) == {
        "smt_n_nplusk",
        "round_robin",
        "offline_cpus",
        "isolated",
        "cpuless_node",
        "hugepages_mixed",
        "eight_nodes",
        "single_no_smt",
    }


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_committed_fixtures_match_their_generator(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("make_sysfs_fixtures", FIXTURES / "make_sysfs_fixtures.py")
    gen = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "make_sysfs_fixtures", gen)  # dataclasses look their module up
    spec.loader.exec_module(gen)
    gen.main(tmp_path)
    committed = {k: v for k, v in _files(SYSFS).items() if not k.endswith(".expected.json")}
    assert _files(tmp_path / "sysfs") == committed
    assert _files(tmp_path / "capabilities") == _files(CAPS)


@pytest.mark.parametrize("case", GOOD_CASES)
def test_fixture_matches_expected_json(case):
    got = discover_sysfs(SYSFS / case, hostname=case).to_json()
    assert got == _expected(case)


@pytest.mark.parametrize("case", GOOD_CASES)
def test_expected_json_is_a_valid_topology_document(case):
    # the hand-written files satisfy the shared schema and its semantic checks, and round-trip
    assert HostTopology.from_json(_expected(case)).to_json() == _expected(case)


def test_root_given_as_str_and_default_hostname():
    topo = discover_sysfs(str(SYSFS / "single_no_smt"))
    assert topo.hostname == socket.gethostname()


@pytest.mark.parametrize(
    "case, rel",
    [
        ("garbled_cpulist", "devices/system/node/node0/cpulist"),
        ("missing_meminfo", "devices/system/node/node0/meminfo"),
        ("garbled_distance", "devices/system/node/node1/distance"),
    ],
)
def test_broken_fixture_names_the_file(case, rel):
    with pytest.raises(DiscoveryError) as info:
        discover_sysfs(SYSFS / case)
    path = str(SYSFS / case / rel)
    assert path in str(info.value)
    assert info.value.path == path


# (relative path, new content or None to delete) -> the error must name that path
_BREAKAGES = [
    ("devices/system/cpu/online", None),
    ("devices/system/cpu/online", "0-3,\n"),
    ("devices/system/cpu/online", "3-0\n"),
    ("devices/system/cpu/isolated", "two\n"),
    ("devices/system/cpu/offline", "-1\n"),
    ("devices/system/cpu/cpu2/online", "yes\n"),
    ("devices/system/cpu/cpu1/topology/thread_siblings_list", None),
    ("devices/system/cpu/cpu1/topology/thread_siblings_list", "1-\n"),
    ("devices/system/node/node0/cpulist", None),
    ("devices/system/node/node0/cpulist", "0-99999999\n"),
    ("devices/system/node/node0/distance", None),
    ("devices/system/node/node0/distance", "10 21\n"),  # two entries for one node
    ("devices/system/node/node0/distance", "\n"),
    ("devices/system/node/node0/distance", "0\n"),
    ("devices/system/node/node0/distance", "300\n"),
    ("devices/system/node/node0/meminfo", "Node 0 MemFree: 10 kB\n"),
    ("devices/system/node/node0/meminfo", "Node 0 MemTotal: lots kB\nNode 0 MemFree: 1 kB\n"),
    ("devices/system/node/node0/meminfo", "Node 1 MemTotal: 10 kB\nNode 1 MemFree: 1 kB\n"),
    ("devices/system/node/node0/meminfo", "Node 0 MemTotal: 10 kB\nNode 0 MemFree: 11 kB\n"),
    ("devices/system/node/node0/meminfo", b"\xff\xfe\x00garbage"),
    ("devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages", "many\n"),
    ("devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages", "-4\n"),
    ("devices/system/node/node0/hugepages/hugepages-1048576kB/free_hugepages", None),
]


@pytest.mark.parametrize("rel, content", _BREAKAGES)
def test_any_broken_file_raises_discovery_error_naming_it(tmp_path, rel, content):
    root = _copy_tree("single_no_smt", tmp_path)
    target = root / rel
    if content is None:
        target.unlink()
    elif isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content)
    with pytest.raises(DiscoveryError) as info:
        discover_sysfs(root)
    assert str(target) in str(info.value)


def test_missing_node_directory(tmp_path):
    root = _copy_tree("single_no_smt", tmp_path)
    shutil.rmtree(root / "devices/system/node")
    with pytest.raises(DiscoveryError) as info:
        discover_sysfs(root)
    assert str(root / "devices/system/node") in str(info.value)


def test_node_directory_without_nodes(tmp_path):
    root = _copy_tree("single_no_smt", tmp_path)
    shutil.rmtree(root / "devices/system/node/node0")
    with pytest.raises(DiscoveryError, match="no nodeN directories"):
        discover_sysfs(root)


def test_unreadable_root():
    with pytest.raises(DiscoveryError) as info:
        discover_sysfs("/nonexistent/sysfs-root")
    assert "/nonexistent/sysfs-root/devices/system/node" in str(info.value)


def test_node_dir_that_is_a_file(tmp_path):
    root = _copy_tree("single_no_smt", tmp_path)
    shutil.rmtree(root / "devices/system/cpu/cpu3/topology")
    (root / "devices/system/cpu/cpu3/topology").write_text("oops\n")
    with pytest.raises(DiscoveryError) as info:
        discover_sysfs(root)
    assert "cpu3/topology" in str(info.value)


def test_cpu_claimed_by_two_nodes(tmp_path):
    root = _copy_tree("hugepages_mixed", tmp_path)
    (root / "devices/system/node/node1/cpulist").write_text("3-7\n")
    with pytest.raises(DiscoveryError) as info:
        discover_sysfs(root)
    assert str(root / "devices/system/node/node1/cpulist") in str(info.value)
    assert "node0" in str(info.value)


def test_cpu_going_offline_between_reads_is_dropped(tmp_path):
    # cpu/online still lists CPU 3, but cpu3/online already says 0 (hotplug race)
    root = _copy_tree("single_no_smt", tmp_path)
    (root / "devices/system/cpu/cpu3/online").write_text("0\n")
    topo = discover_sysfs(root)
    assert topo.online_cpus == {0, 1, 2}
    assert topo.cell(0).cpus == {0, 1, 2}
    assert topo.cell(0).siblings == ((0,), (1,), (2,))


def test_asymmetric_sibling_files_still_give_a_partition(tmp_path):
    root = _copy_tree("single_no_smt", tmp_path)
    (root / "devices/system/cpu/cpu0/topology/thread_siblings_list").write_text("0-1\n")
    (root / "devices/system/cpu/cpu1/topology/thread_siblings_list").write_text("1-2\n")
    assert discover_sysfs(root).cell(0).siblings == ((0, 1, 2), (3,))


def test_offline_falls_back_to_present_minus_online(tmp_path):
    root = _copy_tree("offline_cpus", tmp_path)
    (root / "devices/system/cpu/offline").unlink()
    (root / "devices/system/cpu/isolated").unlink()  # old kernels: no file means none
    topo = discover_sysfs(root)
    assert topo.offline_cpus == {3, 5, 7}
    assert topo.isolated_cpus == frozenset()


def test_free_hugepages_above_total_are_clamped(tmp_path):
    root = _copy_tree("single_no_smt", tmp_path)
    hp = root / "devices/system/node/node0/hugepages/hugepages-2048kB"
    (hp / "nr_hugepages").write_text("4\n")
    (hp / "free_hugepages").write_text("6\n")  # surplus pages
    pool = discover_sysfs(root).cell(0).page_pool(2048)
    assert (pool.total, pool.free) == (4, 4)


def test_no_hugepages_directory_gives_only_small_pages(tmp_path):
    root = _copy_tree("single_no_smt", tmp_path)
    shutil.rmtree(root / "devices/system/node/node0/hugepages")
    cell = discover_sysfs(root).cell(0)
    assert [(p.size_kb, p.total, p.free) for p in cell.pages] == [(4, 524288, 262144)]


# --- CPU list syntax ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, cpus",
    [
        ("", set()),
        ("\n", set()),
        ("0", {0}),
        ("0-3,8,10-11\n", {0, 1, 2, 3, 8, 10, 11}),
        (" 0-1 , 4 ", {0, 1, 4}),
        ("5-5", {5}),
    ],
)
def test_parse_cpu_list(text, cpus):
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["3-1", "a", "1,,2", "-1", "0-", "1-2-3", "0x1", "99999999", "1 2", "٣"])
def test_parse_cpu_list_rejects_garbage_naming_the_path(text):
    with pytest.raises(DiscoveryError) as info:
        parse_cpu_list(text, "/sys/x/cpulist")
    assert "/sys/x/cpulist" in str(info.value)


def _format_cpu_list(cpus: set[int]) -> str:
    out, run = [], []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(min_value=0, max_value=4096), max_size=64))
def test_parse_cpu_list_round_trips(cpus):
    assert parse_cpu_list(_format_cpu_list(cpus)) == cpus


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_parse_cpu_list_never_raises_anything_else(text):
    try:
        parse_cpu_list(text, "/p")
    except DiscoveryError as exc:
        assert "/p" in str(exc)


# --- libvirt capabilities ------------------------------------------------------------------------


def test_caps_fixtures_present():
    assert set(CAPS_CASES) >= {"smt_n_nplusk", "cpuless_node", "hugepages_mixed", "offline_cpus", "eight_nodes"}


@pytest.mark.parametrize("case", CAPS_CASES)
def test_capabilities_match_expected_topology(case):
    caps = topology_from_capabilities(_caps(case), hostname=case).to_json()
    exp = _expected(case)
    assert caps["hostname"] == case
    assert caps["online_cpus"] == exp["online_cpus"]
    assert caps["offline_cpus"] == [] and caps["isolated_cpus"] == []
    assert len(caps["cells"]) == len(exp["cells"])
    for got, want in zip(caps["cells"], exp["cells"], strict=True):
        for key in ("id", "cpus", "siblings", "memory_kb", "distances"):
            assert got[key] == want[key], (case, got["id"], key)
        # capabilities carry totals only: free == total
        assert got["pages"] == [{**p, "free": p["total"]} for p in want["pages"]]


@pytest.mark.parametrize("case", CAPS_CASES)
def test_sysfs_and_capabilities_agree(case):
    sysfs = discover_sysfs(SYSFS / case, hostname=case)
    assert compare_topologies(sysfs, topology_from_capabilities(_caps(case))) == []


def test_capabilities_cpuless_cell_and_offline_cpu_forms():
    xml = """<capabilities><host><topology><cells num='2'>
      <cell id='0'><memory unit='MiB'>1024</memory>
        <pages unit='KiB' size='4'>262144</pages><pages size='2'  unit='MiB'>3</pages>
        <cpus num='3'><cpu id='0' socket_id='0' die_id='0' core_id='0' siblings='0-1'/>
          <cpu id='1' socket_id='0' die_id='0' core_id='0' siblings='0-1'/><cpu id='5'/></cpus></cell>
      <cell id='3'><cpus num='0'/></cell>
    </cells></topology></host></capabilities>"""
    topo = topology_from_capabilities(xml, hostname="h")
    c0, c3 = topo.cell(0), topo.cell(3)
    assert c0.memory_kb == 1024 * 1024
    assert c0.siblings == ((0, 1), (5,))
    assert [(p.size_kb, p.total, p.free) for p in c0.pages] == [(4, 262144, 262144), (2048, 3, 3)]
    assert c3.cpus == frozenset() and c3.memory_kb == 0 and c3.pages == () and dict(c3.distances) == {}
    assert topo.online_cpus == {0, 1, 5}


_BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<capabilities><host>&lol3;</host></capabilities>"""
_XXE = (
    '<?xml version="1.0"?><!DOCTYPE c [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n'
    "<capabilities><host><topology><cells><cell id='0'><memory>&x;</memory></cell></cells>"
    "</topology></host></capabilities>"
)
_CELL = "<capabilities><host><topology><cells>{}</cells></topology></host></capabilities>"


@pytest.mark.parametrize(
    "xml, fragment",
    [
        ("", "not well-formed"),
        ("<capabilities><host>", "not well-formed"),
        ("not xml at all", "not well-formed"),
        (_BILLION_LAUGHS, "DOCTYPE"),
        (_XXE, "DOCTYPE"),
        ("<capabilities>&undefined;</capabilities>", "not well-formed"),
        ("<domain/>", "root element"),
        ("<capabilities><host/></capabilities>", "no <host><topology><cells>"),
        (_CELL.format(""), "no <cell>"),
        (_CELL.format("<cell/>"), "id"),
        (_CELL.format("<cell id='x'/>"), "id"),
        (_CELL.format("<cell id='0'/><cell id='0'/>"), "duplicate cell"),
        (_CELL.format("<cell id='0'><memory unit='KiB'>-5</memory></cell>"), "memory"),
        (_CELL.format("<cell id='0'><memory unit='parsecs'>5</memory></cell>"), "unknown unit"),
        (_CELL.format("<cell id='0'><pages size='4'>many</pages></cell>"), "pages"),
        (_CELL.format("<cell id='0'><pages size='0'>1</pages></cell>"), "pages size"),
        (_CELL.format("<cell id='0'><pages size='4'>1</pages><pages size='4'>1</pages></cell>"), "duplicate"),
        (_CELL.format("<cell id='0'><distances><sibling id='0' value='ten'/></distances></cell>"), "distances"),
        (_CELL.format("<cell id='0'><cpus><cpu id='a'/></cpus></cell>"), "cpu id"),
        (_CELL.format("<cell id='0'><cpus><cpu id='0' siblings='0-x'/></cpus></cell>"), "siblings"),
        (
            _CELL.format(
                "<cell id='0'><cpus><cpu id='0'/></cpus></cell><cell id='1'><cpus><cpu id='0'/></cpus></cell>"
            ),
            "listed twice",
        ),
        (b"\xff<capabilities/>", "UTF-8"),
        (12, "must be str or bytes"),
    ],
)
def test_bad_capabilities_raise_domain_xml_error(xml, fragment):
    with pytest.raises(DomainXMLError) as info:
        topology_from_capabilities(xml)
    assert fragment in str(info.value)


def test_oversized_xml_is_refused_before_parsing():
    big = "<capabilities>" + " " * MAX_XML_BYTES + "</capabilities>"
    with pytest.raises(DomainXMLError, match="larger than"):
        parse_xml(big)
    with pytest.raises(DomainXMLError, match="larger than"):
        parse_xml(big.encode())


def test_capabilities_accepts_bytes():
    assert topology_from_capabilities(_caps("smt_n_nplusk").encode(), "h").cell_ids == (0, 1)


# --- compare_topologies ------------------------------------------------------------------------


def test_compare_reports_each_deliberate_difference():
    xml = _caps("hugepages_mixed")
    xml = xml.replace("<memory unit='KiB'>33554432</memory>", "<memory unit='KiB'>30000000</memory>", 1)
    xml = xml.replace("<pages unit='KiB' size='1048576'>4</pages>", "<pages unit='KiB' size='1048576'>2</pages>")
    xml = xml.replace("<sibling id='0' value='21'/>", "<sibling id='0' value='31'/>")
    xml = xml.replace("<cpu id='7' socket_id='1' die_id='0' core_id='7' siblings='7'/>", "")
    xml = xml.replace("</cells>", "<cell id='9'><memory unit='KiB'>1024</memory><cpus num='0'/></cell></cells>")
    diffs = compare_topologies(discover_sysfs(SYSFS / "hugepages_mixed"), topology_from_capabilities(xml))
    text = "\n".join(diffs)
    assert len(diffs) == 5, text
    assert "cells [9] are in libvirt capabilities but not in sysfs" in text
    assert "cell 0: memory differs" in text and "30000000" in text
    assert "cell 1: 1048576 KiB hugepages total differs (sysfs 4, capabilities 2)" in text
    assert "cell 1: distances differ" in text
    assert "cell 1: CPUs differ (only sysfs has [7])" in text


def test_compare_sibling_difference_and_memory_tolerance():
    xml = _caps("smt_n_nplusk")
    # cpu 0 and cpu 16 no longer see each other as threads of one core
    xml = xml.replace("siblings='0,16'", "siblings='0'", 1).replace("siblings='0,16'", "siblings='16'", 1)
    # 0.5% less memory on cell 1: within tolerance, not reported
    last = xml.rindex("16777216")
    xml = xml[:last] + "16693330" + xml[last + len("16777216") :]
    diffs = compare_topologies(discover_sysfs(SYSFS / "smt_n_nplusk"), topology_from_capabilities(xml))
    assert diffs == ["cell 0: SMT sibling groups differ (sysfs [[0, 16]], capabilities [[0], [16]])"]


def test_compare_missing_cell_and_missing_distances():
    sysfs = discover_sysfs(SYSFS / "cpuless_node")
    xml = _caps("cpuless_node")
    start, end = xml.index("<cell id='2'>"), xml.index("</cell>", xml.index("<cell id='2'>")) + len("</cell>")
    xml = xml[:start] + xml[end:]
    # libvirt omits distances on hosts without a SLIT: not a difference
    xml = "".join(line + "\n" for line in xml.splitlines() if "sibling id=" not in line and "distances>" not in line)
    assert compare_topologies(sysfs, topology_from_capabilities(xml)) == [
        "cells [2] are in sysfs but not in libvirt capabilities"
    ]


# --- discover() --------------------------------------------------------------------------------


def test_discover_sysfs_only():
    topo, warnings = discover(str(SYSFS / "isolated"), hostname="h")
    assert warnings == [] and topo.to_json() == {**_expected("isolated"), "hostname": "h"}


def test_discover_sysfs_wins_and_logs_each_difference(caplog):
    xml = _caps("smt_n_nplusk").replace(
        "<pages unit='KiB' size='2048'>512</pages>", "<pages unit='KiB' size='2048'>500</pages>"
    )
    with caplog.at_level(logging.WARNING, logger="compute_agent.discovery"):
        topo, warnings = discover(str(SYSFS / "smt_n_nplusk"), xml, hostname="smt_n_nplusk")
    assert topo.to_json() == _expected("smt_n_nplusk")
    assert warnings == [
        "cell 0: 2048 KiB hugepages total differs (sysfs 512, capabilities 500)",
        "cell 1: 2048 KiB hugepages total differs (sysfs 512, capabilities 500)",
    ]
    logged = [r.getMessage() for r in caplog.records if r.name == "compute_agent.discovery"]
    assert len(logged) == 2 and all(any(w in m for m in logged) for w in warnings)
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "compute_agent.discovery")


def test_discover_agreeing_sources_give_no_warnings(caplog):
    with caplog.at_level(logging.WARNING, logger="compute_agent.discovery"):
        topo, warnings = discover(str(SYSFS / "eight_nodes"), _caps("eight_nodes"), hostname="eight_nodes")
    assert warnings == [] and not caplog.records
    assert topo.to_json() == _expected("eight_nodes")


def test_discover_falls_back_to_capabilities_when_sysfs_unreadable(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="compute_agent.discovery"):
        topo, warnings = discover(str(tmp_path / "no-sysfs"), _caps("hugepages_mixed"), hostname="h")
    assert topo.cell_ids == (0, 1) and topo.hostname == "h"
    assert topo.cell(1).page_pool(1048576).total == 4
    assert len(warnings) == 1 and "libvirt capabilities" in warnings[0]
    assert str(tmp_path / "no-sysfs") in warnings[0]
    assert any("libvirt capabilities" in r.getMessage() for r in caplog.records)


def test_discover_falls_back_when_a_sysfs_file_is_garbled():
    topo, warnings = discover(str(SYSFS / "garbled_distance"), _caps("hugepages_mixed"))
    assert topo.cell_ids == (0, 1)
    assert "node1/distance" in warnings[0]


def test_discover_without_capabilities_reraises():
    with pytest.raises(DiscoveryError, match="node1/distance"):
        discover(str(SYSFS / "garbled_distance"))


def test_discover_with_bad_capabilities_raises_domain_xml_error():
    with pytest.raises(DomainXMLError):
        discover(str(SYSFS / "single_no_smt"), "<capabilities>")
    with pytest.raises(DomainXMLError):
        discover("/nonexistent", "<capabilities>")


# --- this machine ------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/sys/devices/system/node").is_dir(), reason="no sysfs NUMA directory here")
def test_this_machine_sysfs_parses():
    topo = discover_sysfs()
    assert len(topo.cells) >= 1
    assert topo.online_cpus
    assert HostTopology.from_json(topo.to_json()) == topo


# --- libvirt ---------------------------------------------------------------------------------


def _open(uri: str):
    libvirt = pytest.importorskip("libvirt")
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        pytest.skip(f"{uri} not reachable: {exc.get_error_message()}")


def test_libvirt_test_driver_capabilities():
    conn = _open("test:///default")
    try:
        topo = topology_from_capabilities(conn.getCapabilities(), hostname="t")
        assert topo.cell_ids == (0, 1)
        assert topo.cell(0).cpus == set(range(8)) and topo.cell(1).cpus == set(range(8, 16))
        assert topo.cell(1).memory_kb == 4194304
        # quirk of the test driver: cell 1 reports 8 KiB "small" pages and no 4 KiB pool
        assert topo.cell(1).page_pool(8) is not None and topo.cell(1).page_pool(4) is None
        live = topology_from_libvirt(conn)
        assert live.cell_ids == (0, 1)
        for cell in live.cells:
            assert all(0 <= p.free <= p.total for p in cell.pages)
        assert HostTopology.from_json(live.to_json()) == live
    finally:
        conn.close()


@pytest.mark.timeout(60)
def test_local_libvirtd_capabilities_match_sysfs():
    conn = _open("qemu:///system")
    try:
        topo = topology_from_libvirt(conn)
        assert compare_topologies(discover_sysfs(), topo) == []
    finally:
        conn.close()


@pytest.mark.testbed
@pytest.mark.timeout(60)
def test_testbed_libvirtd_topology_from_libvirt():
    conn = _open("qemu+tcp://127.0.0.2/system")
    try:
        topo = topology_from_libvirt(conn)
        assert len(topo.cells) >= 1 and topo.online_cpus
        for cell in topo.cells:
            assert all(0 <= p.free <= p.total for p in cell.pages)
        # the testbed daemons run on this machine: same kernel, same topology
        assert compare_topologies(discover_sysfs(), topo) == []
    finally:
        conn.close()


# --- hostile input: huge numbers and huge CPU lists (only DiscoveryError / DomainXMLError escape) ------

_HUGE = "1" * 5000  # int() refuses more than 4300 digits with a plain ValueError
_WIDE_LIST = ",".join(["0-65536"] * 2000)  # expanding every range would take seconds


@pytest.mark.parametrize(
    "rel, content",
    [
        ("devices/system/node/node0/meminfo", f"Node 0 MemTotal: {_HUGE} kB\nNode 0 MemFree: 1 kB\n"),
        ("devices/system/node/node0/meminfo", f"Node 0 MemTotal: 10 kB\nNode 0 MemFree: {_HUGE} kB\n"),
        ("devices/system/node/node0/meminfo", f"Node {_HUGE} MemTotal: 10 kB\nNode 0 MemFree: 1 kB\n"),
        ("devices/system/node/node0/distance", f"{_HUGE}\n"),
        ("devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages", f"{_HUGE}\n"),
        ("devices/system/node/node0/hugepages/hugepages-2048kB/free_hugepages", f"{_HUGE}\n"),
        ("devices/system/node/node0/cpulist", f"{_HUGE}\n"),
        ("devices/system/node/node0/cpulist", f"0-{_HUGE}\n"),
        ("devices/system/node/node0/cpulist", _WIDE_LIST + "\n"),
        ("devices/system/cpu/online", _WIDE_LIST + "\n"),
        ("devices/system/cpu/isolated", ",".join(["0"] * 70000) + "\n"),
        ("devices/system/cpu/online", "1_0\n"),
        ("devices/system/cpu/online", "+0\n"),
        ("devices/system/cpu/online", "0-^3\n"),
        ("devices/system/cpu/online", "0,^0\n"),
    ],
)
def test_hostile_sysfs_numbers_raise_discovery_error_quickly(tmp_path, rel, content):
    import time

    root = _copy_tree("single_no_smt", tmp_path)
    target = root / rel
    target.write_text(content)
    t0 = time.monotonic()
    with pytest.raises(DiscoveryError) as info:
        discover_sysfs(root)
    assert time.monotonic() - t0 < 1.0
    assert str(target) in str(info.value)


@pytest.mark.parametrize(
    "rel", ["devices/system/node/node" + "1" * 200, "devices/system/node/node0/hugepages/hugepages-" + "1" * 200 + "kB"]
)
def test_hostile_sysfs_directory_names_raise_discovery_error(tmp_path, rel):
    root = _copy_tree("single_no_smt", tmp_path)
    (root / rel).mkdir()  # a real name is at most 255 bytes: 200 digits
    with pytest.raises(DiscoveryError, match="digits"):
        discover_sysfs(root)


def test_huge_digit_runs_in_directory_names_never_reach_int():
    # names can be at most 255 bytes on a real filesystem, so check the guard directly too
    from agent.numa import discovery

    with pytest.raises(DiscoveryError, match="digits"):
        discovery._small_int(_HUGE, "node id", "/sys/x")


@pytest.mark.parametrize(
    "text", [_WIDE_LIST, "0-65537", f"0-{_HUGE}", _HUGE, "1_0", "+3", "\u0663", "0,^0", ",".join(["1"] * 70000)]
)
def test_parse_cpu_list_hostile_input_is_refused_quickly(text):
    import time

    t0 = time.monotonic()
    with pytest.raises(DiscoveryError):
        parse_cpu_list(text, "/p")
    assert time.monotonic() - t0 < 1.0


def test_parse_cpu_list_accepts_the_largest_id():
    assert parse_cpu_list("65536") == {65536}
    assert len(parse_cpu_list("0-65536")) == 65537


@pytest.mark.parametrize(
    "xml",
    [
        _CELL.format(f"<cell id='{_HUGE}'/>"),
        _CELL.format(f"<cell id='0'><memory unit='KiB'>{_HUGE}</memory></cell>"),
        _CELL.format(f"<cell id='0'><pages size='{_HUGE}'>1</pages></cell>"),
        _CELL.format(f"<cell id='0'><pages size='4'>{_HUGE}</pages></cell>"),
        _CELL.format(f"<cell id='0'><distances><sibling id='{_HUGE}' value='10'/></distances></cell>"),
        _CELL.format(f"<cell id='0'><distances><sibling id='0' value='{_HUGE}'/></distances></cell>"),
        _CELL.format(f"<cell id='0'><cpus><cpu id='{_HUGE}'/></cpus></cell>"),
        _CELL.format(f"<cell id='0'><cpus><cpu id='0' siblings='{_HUGE}'/></cpus></cell>"),
        _CELL.format(f"<cell id='0'><cpus><cpu id='0' siblings='{_WIDE_LIST}'/></cpus></cell>"),
        _CELL.format("<cell id='0'><cpus><cpu id='0' siblings='1_0'/></cpus></cell>"),
        _CELL.format("<cell id='1_0'/>"),
        _CELL.format("<cell id='\u0663'/>"),
    ],
)
def test_hostile_capabilities_numbers_raise_domain_xml_error(xml):
    import time

    t0 = time.monotonic()
    with pytest.raises(DomainXMLError):
        topology_from_capabilities(xml)
    assert time.monotonic() - t0 < 1.0


def test_cli_discover_with_huge_cell_id_reports_an_error_not_a_traceback(tmp_path, capsys):
    from agent.cli import main

    caps = tmp_path / "caps.xml"
    caps.write_text(_CELL.format(f"<cell id='{_HUGE}'/>"))
    rc = main(["discover", "--sysfs-root", str(tmp_path / "nonexistent"), "--capabilities", str(caps)])
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err and "cell[0] id" in err


@pytest.mark.parametrize(
    "unit, value, kib",
    [("KiB", 1, 1), ("b", 1, 1), ("bytes", 1025, 2), ("KB", 1, 1), ("MB", 1, 977), ("MiB", 2, 2048), ("G", 1, 1 << 20)],
)
def test_capabilities_units_round_up_like_domain_xml(unit, value, kib):
    from agent.libvirt_ops.domain_read import _scale_to_kib

    xml = _CELL.format(f"<cell id='0'><memory unit='{unit}'>{value}</memory></cell>")
    assert topology_from_capabilities(xml).cells[0].memory_kb == kib
    assert _scale_to_kib(str(value), unit, "x") == kib


# --- the capabilities reader shares agent.xmlsafe with domain XML: the same limits ------------------


@pytest.mark.parametrize(
    "xml, fragment",
    [
        ("<capabilities>" + "<a>" * 100 + "</a>" * 100 + "</capabilities>", "deep"),
        ("<capabilities><host>" + "<x/>" * 200_001 + "</host></capabilities>", "elements"),
        ('<!DOCTYPE capabilities SYSTEM "http://127.0.0.1:9/c.dtd"><capabilities/>', "DOCTYPE"),
    ],
)
def test_capabilities_use_the_shared_xml_limits(xml, fragment):
    with pytest.raises(DomainXMLError, match=fragment):
        topology_from_capabilities(xml)
