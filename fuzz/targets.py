"""The fuzz targets: one function per reader of outside input, each taking raw bytes.

A target returns quietly, or raises the project's typed error (`AgentError`: the input was refused
with a reason). Anything else (a bare ValueError, a RecursionError, an AssertionError of a checked
property) is a crash: `fuzz/run` and tests/test_fuzz.py fail on it. The same functions replay the
seed corpus (fuzz/corpus/<target>/) in the normal test run, without atheris.

Beyond "no untyped error", targets check properties that tie readers together:

- host_state: a document that is read writes back (to_json) into one that reads the same;
- capabilities: a topology read from capabilities is a host document `fit --host` accepts;
- request: every placement the fitter returns is a placement document that reads back the same;
- domain_xml: a domain the parser accepts is rewritten for a placement built from it, and the result
  parses and carries that placement.
"""

from __future__ import annotations

import functools
from typing import Callable

from agent.bus.envelope import Opener, seal
from agent.bus.keys import Keyring
from agent.bus.schemas import METHODS, decode_body
from agent.config import load_config
from agent.errors import AgentError
from agent.libvirt_ops.domain_model import DomainPlacement
from agent.libvirt_ops.domain_xml import parse_domain, rewrite_for_placement
from agent.numa.capabilities import topology_from_capabilities
from agent.numa.fit import fit
from agent.numa.placement import CellPlacement, Placement
from agent.numa.request import parse_request
from agent.numa.state import HostState

__all__ = ["TARGETS", "Target"]

Target = Callable[[bytes], None]


# --- request parser + fitter ------------------------------------------------------------------------


def _cell(cid: int, cpus: list[int], smt: bool, huge: int) -> dict[str, object]:
    half = len(cpus) // 2
    siblings = [[cpus[k], cpus[k + half]] for k in range(half)] if smt else [[c] for c in cpus]
    pages = [{"size_kb": 4, "total": 1 << 20, "free": 1 << 19}, {"size_kb": 2048, "total": huge, "free": huge}]
    return {"id": cid, "cpus": cpus, "siblings": siblings, "memory_kb": (4 << 20) + huge * 2048, "pages": pages}


@functools.cache
def _hosts() -> tuple[HostState, ...]:
    """Three small hosts: SMT with hugepages, four plain cells, and split dedicated/shared sets."""
    smt = HostState.from_json({"cells": [_cell(0, list(range(8)), True, 512), _cell(1, list(range(8, 16)), True, 0)]})
    plain = HostState.from_json({"cells": [_cell(i, [2 * i, 2 * i + 1], False, 64) for i in range(4)]})
    split = HostState.from_json(
        {
            "cells": [_cell(0, list(range(6)), False, 0), _cell(1, list(range(6, 12)), False, 0)],
            "cpu_dedicated_set": [1, 2, 3, 7, 8, 9],
            "cpu_shared_set": [0, 6],
        }
    )
    return smt, plain, split


def request(data: bytes) -> None:
    req = parse_request(data)
    for state in _hosts():
        for preference in ("spread", "pack"):
            result = fit(req, state, preference=preference)
            if isinstance(result, Placement):
                assert Placement.from_json(result.to_json()) == result, "placement does not read back"


# --- domain XML reader + rewriter -------------------------------------------------------------------


def _placement_for(dom: DomainPlacement, dedicated: bool) -> Placement:
    """A placement for `dom` on CPUs 100+ (host cell = guest cell), memory as the domain has it."""
    groups = [(c.id, sorted(c.cpus), c.memory_kib) for c in dom.guest_cells] or [
        (0, list(range(dom.vcpus)), dom.memory_kib)
    ]
    cells = []
    for gid, vcpus, kib in groups:
        pins = {v: (100 + v,) if dedicated else (100, 101) for v in vcpus}
        ded = frozenset(vcpus) if dedicated else frozenset()
        cells.append(CellPlacement(gid, gid, tuple(vcpus), pins, -(-kib // 1024), 4, dedicated_vcpus=ded))
    return Placement(cells=tuple(cells), emulator_pins=(9,))


def domain_xml(data: bytes) -> None:
    dom = parse_domain(data)
    if dom.hugepages:
        return  # a placement with the domain's page sizes is the rewriter's unit tests' business
    for dedicated in (True, False):
        placement = _placement_for(dom, dedicated)
        out = rewrite_for_placement(data, placement)
        assert parse_domain(out).agent_placement == placement.to_json(), "rewrite does not read back"


# --- host state (`fit --host`) and capabilities -----------------------------------------------------


def host_state(data: bytes) -> None:
    state = HostState.from_json(data)
    again = HostState.from_json(state.to_json())
    assert again == state, "host state does not read back"
    state.all_resources()


def capabilities(data: bytes) -> None:
    topology = topology_from_capabilities(data, "fuzz-host")
    # one set of bounds: what discovery reports, `fit --host` accepts
    assert HostState.from_json(topology.to_json()).topology == topology, "capabilities topology refused by fit"


# --- config -----------------------------------------------------------------------------------------


def config(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # load_config reads files as UTF-8 (safe_io refuses the rest); the target takes text
    load_config(text=text)


# --- bus envelope -----------------------------------------------------------------------------------

_KEYS = Keyring.single("k1", bytes(range(32)))
_NOW = 1_800_000_000.0


def _opener() -> Opener:
    kinds = frozenset({"call", "cast", "reply", "event"})
    return Opener(_KEYS, max_bytes=1 << 20, max_clock_skew_s=60.0, kinds=kinds, clock=lambda: _NOW)


def _decode_bodies(method: str, body: dict[str, object]) -> None:
    for spec in METHODS:
        if spec.name == method:
            decoded = decode_body(body, spec.body)
            for convert in ("request", "placement_value"):
                if hasattr(decoded, convert):
                    getattr(decoded, convert)()


def envelope(data: bytes) -> None:
    """The bytes as received, then (to get past the signature) their JSON object sealed with our key."""
    try:
        env = _opener().open(data)
        _decode_bodies(env.method, env.body)
    except AgentError:
        pass
    import msgspec

    try:
        doc = msgspec.json.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return
    if not isinstance(doc, dict) or not isinstance(doc.get("body"), dict):
        return
    kind, method, version = doc.get("kind"), doc.get("method"), doc.get("v")
    if kind not in ("call", "cast", "reply", "event") or not isinstance(method, str) or not isinstance(version, str):
        return
    try:
        _, wire = seal(
            _KEYS, kind=kind, method=method, body=doc["body"], version=version, sender="fuzz", now=_NOW, ttl_s=30.0
        )
    except (ValueError, TypeError, RecursionError):
        return  # nothing we could sign (NaN, a huge int, too deep): the sender's problem
    env = _opener().open(wire)
    _decode_bodies(env.method, env.body)


TARGETS: dict[str, Target] = {
    "request": request,
    "domain_xml": domain_xml,
    "host_state": host_state,
    "capabilities": capabilities,
    "config": config,
    "envelope": envelope,
}


def run_one(target: Target, data: bytes) -> None:
    """One input: typed refusals are fine, anything else propagates (a crash). Slow inputs are
    libFuzzer's -timeout (fuzz/run) and pytest-timeout's (replay) business."""
    try:
        target(data)
    except AgentError:
        pass
