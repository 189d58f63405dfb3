"""Hostile inputs to the numa package and the `fit` command (issue 12, items 10 to 13): each case was a
traceback, a hang or seconds of work; each must be a typed error naming the input, or a correct answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.errors import DomainXMLError, InvalidHostState, InvalidInput, InvalidRequest
from agent.json_input import check_json_depth, json_depth
from agent.limits import MAX_HOST_CELLS, MAX_HOST_CPUS, MAX_JSON_DEPTH, MAX_PAGE_SIZES, MAX_SMT_SIBLINGS
from agent.numa.placement import Placement
from agent.numa.request import parse_request
from agent.numa.state import HostState
from agent.numa.topology import HostTopology

UUID = "12345678-1234-1234-1234-123456789012"


def small_host(**extra: Any) -> dict[str, Any]:
    """A one-cell host-state document (4 CPUs, 4 GiB of small pages)."""
    cell = {
        "id": 0,
        "cpus": [0, 1, 2, 3],
        "memory_kb": 4 << 20,
        "pages": [{"size_kb": 4, "total": 1 << 20, "free": 1 << 20}],
    }
    return {"hostname": "hv", "cells": [cell], **extra}


def request_doc(**extra_specs: Any) -> dict[str, Any]:
    return {"uuid": UUID, "vcpus": 2, "memory_mb": 1024, "extra_specs": extra_specs}


# --- item 10: JSON nested ~1,000 deep ---------------------------------------------------------------


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize(
    "text, depth",
    [("1", 0), ("[]", 1), ('{"a": [[1], "[[[["]}', 3), (r'["\"[", [[]]]', 3), (_deep(5000), 5000)],
)
def test_json_depth_leaves_strings_out(text, depth):
    assert json_depth(text) == depth == json_depth(text.encode())


def test_check_json_depth_at_and_past_the_bound():
    check_json_depth(_deep(MAX_JSON_DEPTH), what="doc")
    check_json_depth("[" + "[1]," * 10_000 + "1]", what="doc")  # many brackets, shallow
    with pytest.raises(InvalidInput, match=f"doc: JSON nested deeper than {MAX_JSON_DEPTH}"):
        check_json_depth(_deep(MAX_JSON_DEPTH + 1), what="doc")


@pytest.mark.parametrize("levels", [1000, 100_000])
def test_deep_request_is_a_typed_error(levels):
    text = json.dumps(request_doc())[:-2] + ', "deep": ' + _deep(levels) + "}}"
    for doc in (text, text.encode()):
        with pytest.raises(InvalidRequest, match="nested deeper"):
            parse_request(doc)


@pytest.mark.parametrize("levels", [1000, 100_000])
def test_deep_host_topology_and_placement_are_typed_errors(levels):
    text = json.dumps(small_host())[:-1] + ', "x": ' + _deep(levels) + "}"
    with pytest.raises(InvalidHostState, match="nested deeper"):
        HostState.from_json(text.encode())
    with pytest.raises(InvalidHostState, match="nested deeper"):
        HostTopology.from_json(text)
    with pytest.raises(InvalidInput, match="nested deeper"):
        Placement.from_json(text.encode())


def test_fit_command_with_deep_files(capsys, tmp_path: Path):
    host, inst = tmp_path / "host.json", tmp_path / "inst.json"
    host.write_text(json.dumps(small_host()))
    inst.write_text(json.dumps(request_doc()))
    deep = tmp_path / "deep.json"
    deep.write_text(_deep(1000))
    for h, i in ((deep, inst), (host, deep)):
        rc = main(["fit", "--host", str(h), "--instance", str(i)])
        _, err = capsys.readouterr()
        assert rc == 2 and "nested deeper" in err and "Traceback" not in err


def test_deep_request_to_the_ledger_is_a_typed_error(tmp_path):
    from agent.claims.ledger import Ledger

    state = HostState.from_json(small_host())
    text = json.dumps(request_doc())[:-2] + ', "deep": ' + _deep(5000) + "}}"
    with Ledger.open(tmp_path) as ledger:
        with pytest.raises(InvalidInput, match="nested deeper"):
            ledger.claim("m-1", text, "src", 60, lambda: state)


# --- item 11: numbers are ASCII digits, everywhere ------------------------------------------------


@pytest.mark.parametrize("tail", ["\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\u2028"])
def test_numa_mem_ending_in_a_control_character_is_refused(tail):
    doc = request_doc(**{"hw:numa_nodes": "1", "hw:numa_cpus.0": "0-1", "hw:numa_mem.0": "1024" + tail})
    with pytest.raises(InvalidRequest, match="hw:numa_mem.0"):
        parse_request(doc)


@pytest.mark.parametrize("number", ["２０４８", "2_048", "+2048", "²", "1e3", "0x800", "-4"])
def test_non_ascii_numbers_are_refused_in_requests(number):
    for key, extra in (
        ("hw:numa_mem.0", {"hw:numa_nodes": "1", "hw:numa_cpus.0": "0-1"}),
        ("hw:mem_page_size", {}),
        ("hw:numa_nodes", {}),
    ):
        with pytest.raises(InvalidRequest, match=key):
            parse_request(request_doc(**extra, **{key: number}))


@pytest.mark.parametrize("key", ["２０４８", "2_048", "+2048", "²", "4\x1c"])
def test_non_ascii_number_keys_are_refused_in_host_documents(key):
    with pytest.raises(InvalidHostState, match="page size key"):
        HostState.from_json({**small_host(), "reserved_pages": {"0": {key: 1}}})
    with pytest.raises(InvalidHostState, match="cell key"):
        HostState.from_json({**small_host(), "reserved_pages": {key: {"4": 1}}})
    doc = small_host()
    doc["cells"][0]["distances"] = {key: 10}
    with pytest.raises(InvalidHostState, match="distances"):
        HostState.from_json(doc)


def test_cpu_set_elements_with_control_characters_are_refused():
    from agent.cpuset import parse_cpu_set

    assert parse_cpu_set(" 0-1 ,\t3\n") == {0, 1, 3}
    for text in ("0-1,\x1c3", "3\x1f", "０", "1_0"):
        with pytest.raises(ValueError):
            parse_cpu_set(text)


def test_placement_pin_keys_must_be_ascii():
    from agent.numa.fit import fit

    placement = fit(parse_request(request_doc(**{"hw:cpu_policy": "dedicated"})), HostState.from_json(small_host()))
    assert isinstance(placement, Placement)
    doc = placement.to_json()
    assert Placement.from_json(doc) == placement
    pins = doc["cells"][0]["cpu_pins"]
    pins["０"] = pins.pop("0")
    with pytest.raises(InvalidInput, match="cpu_pins keys"):
        Placement.from_json(doc)


# --- item 12: counts capped at realistic maxima, per-cell work linear --------------------------------


def _host_cells(n: int, per: int = 1) -> dict[str, Any]:
    cells = [
        {
            "id": i,
            "cpus": list(range(i * per, (i + 1) * per)),
            "memory_kb": 1 << 20,
            "pages": [{"size_kb": 4, "total": 1 << 18, "free": 1 << 18}],
        }
        for i in range(n)
    ]
    return {"hostname": "hv", "cells": cells}


def _caps(cells_xml: str) -> str:
    return f"<capabilities><host><topology><cells>{cells_xml}</cells></topology></host></capabilities>"


def test_forty_thousand_host_cells_are_refused_before_any_work():
    # was 8-11 s (58 s on a loaded CI box) of quadratic work, then an answer
    with pytest.raises(InvalidHostState, match=f"40000 NUMA cells, more than {MAX_HOST_CELLS}"):
        HostState.from_json(json.dumps(_host_cells(40_000)).encode())
    with pytest.raises(InvalidHostState, match=f"more than {MAX_HOST_CPUS}"):
        HostState.from_json(_host_cells(2, per=MAX_HOST_CPUS // 2 + 1))


@pytest.mark.timeout(60)  # a loose bound: quadratic work at this size took tens of seconds
def test_a_host_at_the_bounds_is_read_and_fitted():
    from agent.numa.fit import fit

    state = HostState.from_json(_host_cells(MAX_HOST_CELLS, per=MAX_HOST_CPUS // MAX_HOST_CELLS))
    request = parse_request(request_doc(**{"hw:cpu_policy": "dedicated", "hw:numa_nodes": "2"}))
    assert isinstance(fit(request, state), Placement)
    assert state.topology.cell(MAX_HOST_CELLS - 1).id == MAX_HOST_CELLS - 1


def test_thirty_thousand_capability_cells_are_refused():
    from agent.numa.capabilities import topology_from_capabilities

    cells = "".join(f'<cell id="{i}"><cpus num="1"><cpu id="{i}" siblings="{i}"/></cpus></cell>' for i in range(30_000))
    with pytest.raises(DomainXMLError, match="30000 NUMA cells"):  # was 18 s
        topology_from_capabilities(_caps(cells), "h")


def test_wide_sibling_lists_are_refused_before_they_are_expanded():
    from agent.numa.capabilities import topology_from_capabilities

    # 69 KB of <cpu siblings="0-65535"/> took over 4 GB: each list expanded to 65,536 ids
    cpus = "".join(f'<cpu id="{i}" siblings="0-65535"/>' for i in range(2000))
    doc = _caps(f'<cell id="0"><cpus num="2000">{cpus}</cpus></cell>')
    with pytest.raises(DomainXMLError, match=f"siblings.*more than {MAX_SMT_SIBLINGS} ids"):
        topology_from_capabilities(doc, "h")
    # sibling lists that chain into one wide group are refused too (one set of bounds)
    chained = "".join(f'<cpu id="{i}" siblings="{i},{i + 1}"/>' for i in range(16)) + '<cpu id="16" siblings="16"/>'
    with pytest.raises(DomainXMLError, match="SMT sibling group of 17 CPUs"):
        topology_from_capabilities(_caps(f'<cell id="0"><cpus num="17">{chained}</cpus></cell>'), "h")


def test_wide_sibling_groups_in_host_documents_are_refused():
    doc = _host_cells(1, per=16)
    doc["cells"][0]["siblings"] = [list(range(16))]
    with pytest.raises(InvalidHostState, match="SMT sibling group of 16"):
        HostState.from_json(doc)


def test_too_many_page_sizes_and_distances_are_refused():
    doc = _host_cells(1)
    doc["cells"][0]["pages"] = [{"size_kb": 4 << k, "total": 0, "free": 0} for k in range(MAX_PAGE_SIZES + 1)]
    with pytest.raises(InvalidHostState, match="page sizes, more than"):
        HostState.from_json(doc)
    doc = _host_cells(1)
    doc["cells"][0]["distances"] = {str(k): 20 for k in range(MAX_HOST_CELLS + 1)}
    with pytest.raises(InvalidHostState, match="distances, more than"):
        HostState.from_json(doc)


# --- item 13: one set of bounds for discovery and documents; offline CPUs; page sizes -----------------


def _sysfs_copy(tmp_path: Path, case: str = "hugepages_mixed") -> Path:
    import shutil

    root = tmp_path / case
    shutil.copytree(Path(__file__).resolve().parent.parent / "fixtures" / "sysfs" / case, root)
    return root


def _node0_hugepages(root: Path) -> Path:
    return root / "devices/system/node/node0/hugepages"


def test_discover_output_is_a_valid_host_document(tmp_path):
    from agent.numa.discovery import discover_sysfs

    topology = discover_sysfs(_sysfs_copy(tmp_path), "hv")
    assert HostState.from_json(json.dumps(topology.to_json())).topology == topology


@pytest.mark.parametrize(
    "rename, nr, match",
    [
        ("hugepages-02048kB", None, "listed twice"),  # the same size twice: fit --host refused it
        ("hugepages-3kB", None, "not a power of two"),
        (None, str(1 << 60), "free .* total"),  # a count fit --host refused
    ],
)
def test_discovery_refuses_what_the_document_reader_refuses(tmp_path, rename, nr, match):
    import shutil

    from agent.errors import DiscoveryError
    from agent.numa.discovery import discover_sysfs

    root = _sysfs_copy(tmp_path)
    pools = _node0_hugepages(root)
    if rename:
        shutil.copytree(pools / "hugepages-2048kB", pools / rename)
    if nr:
        (pools / "hugepages-2048kB" / "nr_hugepages").write_text(nr + "\n")
    with pytest.raises(DiscoveryError, match=match) as exc:
        discover_sysfs(root, "hv")
    assert "node0" in str(exc.value)


def test_discovery_refuses_wide_sibling_lists(tmp_path):
    from agent.errors import DiscoveryError
    from agent.numa.discovery import discover_sysfs

    root = _sysfs_copy(tmp_path)
    (root / "devices/system/cpu/cpu0/topology/thread_siblings_list").write_text("0-65535\n")
    with pytest.raises(DiscoveryError, match="thread_siblings_list.*more than 8 ids"):
        discover_sysfs(root, "hv")


def test_an_offline_cpu_is_never_offered():
    from agent.numa.fit import fit

    doc = small_host(offline_cpus=[0, 1, 2])  # listed by the cell, but offline
    state = HostState.from_json(doc)
    assert state.resources(0).dedicated_cpus == {3}
    request = parse_request(request_doc(**{"hw:cpu_policy": "dedicated"}))  # 2 vCPUs, 1 online CPU
    assert not isinstance(fit(request, state), Placement)
    one = parse_request({**request_doc(**{"hw:cpu_policy": "dedicated"}), "vcpus": 1})
    placement = fit(one, state)
    assert isinstance(placement, Placement) and set(placement.cells[0].cpu_pins[0]) == {3}
    with pytest.raises(InvalidHostState, match="both online and offline"):
        HostState.from_json(small_host(online_cpus=[0, 1, 2, 3], offline_cpus=[2]))


@pytest.mark.parametrize("size_kb", [3, 6, 12, 2047, 3072])
def test_page_sizes_are_powers_of_two_of_at_least_4k(size_kb):
    doc = small_host()
    doc["cells"][0]["pages"].append({"size_kb": size_kb, "total": 0, "free": 0})
    with pytest.raises(InvalidHostState, match="not a power of two"):
        HostState.from_json(doc)
    for spelling in (str(size_kb), f"{size_kb}KiB"):
        with pytest.raises(InvalidRequest, match="hw:mem_page_size"):
            parse_request(request_doc(**{"hw:mem_page_size": spelling}))


def test_placement_page_size_is_a_power_of_two():
    from agent.numa.fit import fit

    placement = fit(parse_request(request_doc(**{"hw:cpu_policy": "dedicated"})), HostState.from_json(small_host()))
    assert isinstance(placement, Placement)
    doc = placement.to_json()
    doc["cells"][0]["pagesize_kb"] = 3
    with pytest.raises(InvalidInput, match="pagesize_kb"):
        Placement.from_json(doc)


def test_capabilities_page_size_must_be_a_power_of_two():
    from agent.numa.capabilities import topology_from_capabilities

    cell = '<cell id="0"><pages unit="KiB" size="3">10</pages><cpus num="1"><cpu id="0" siblings="0"/></cpus></cell>'
    with pytest.raises(DomainXMLError, match="not a power of two"):
        topology_from_capabilities(_caps(cell), "h")
