"""Hostile inputs to the numa package and the `fit` command (issue 12, items 10 to 13): each case was a
traceback, a hang or seconds of work; each must be a typed error naming the input, or a correct answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.errors import InvalidHostState, InvalidInput, InvalidRequest
from agent.json_input import check_json_depth, json_depth
from agent.limits import MAX_JSON_DEPTH
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
