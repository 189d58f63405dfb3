"""The source role's pure pieces (agent.daemon.source_model)."""

from __future__ import annotations

import uuid as uuidlib
from pathlib import Path

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.bus.schemas import MigrationProgressEvent
from agent.daemon.source import Source
from agent.daemon.source_model import (
    Flight,
    bandwidth_bps,
    ending_from_outcome,
    has_numa_topology,
    state_word,
)
from agent.libvirt_ops.domain_model import DomainPlacement
from agent.libvirt_ops.migration import MigrationOutcome, MigrationTarget
from agent.numa.request import parse_request
from tests.daemon.test_migrations import record
from tests.daemon.test_source_fakes import POLICY, make_harness, progress


def outcome(status: str, postcopy: bool = False) -> MigrationOutcome:
    return MigrationOutcome(status, "r", {}, POLICY, 2.0, 5 if status == "completed" else None, postcopy, 0)  # type: ignore[arg-type]


def test_where_the_instance_runs_after_each_outcome() -> None:
    assert ending_from_outcome(outcome("completed"), "a", "b").host_now == "b"
    failed = ending_from_outcome(outcome("failed"), "a", "b")
    assert (failed.host_now, failed.in_postcopy) == ("a", False)
    split = ending_from_outcome(outcome("failed", postcopy=True), "a", "b")
    assert (split.host_now, split.in_postcopy) == ("b", True)
    assert not ending_from_outcome(outcome("completed", postcopy=True), "a", "b").in_postcopy


def test_numa_topology_as_nova_sees_it() -> None:
    def req(**specs: str):  # type: ignore[no-untyped-def]
        return parse_request({"uuid": str(uuidlib.uuid4()), "vcpus": 2, "memory_mb": 512, "extra_specs": specs})

    plain = DomainPlacement("d", "u", 2, 524288)
    assert not has_numa_topology(req(), plain)
    assert has_numa_topology(req(**{"hw:cpu_policy": "dedicated"}), plain)
    assert has_numa_topology(req(**{"hw:numa_nodes": "1"}), plain)
    assert has_numa_topology(req(**{"hw:mem_page_size": "small"}), plain)
    assert has_numa_topology(req(), DomainPlacement("d", "u", 2, 524288, vcpu_pins={0: frozenset({1})}))


def test_state_words() -> None:
    assert [state_word(s) for s in (1, 3, 5, 99, -1)] == ["running", "paused", "shutoff", "unknown", "unknown"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(percents=st.lists(st.floats(min_value=0, max_value=100), min_size=1, max_size=30))
def test_published_percent_never_goes_down_and_bodies_match_the_schema(tmp_path: Path, percents: list[float]) -> None:
    h = make_harness(tmp_path / uuidlib.uuid4().hex, [])
    src = Source(h.ctx, sleep=lambda s: None, recover=False)
    flight = Flight("m-1", "u", MigrationTarget("qemu+tcp://b/system", "tcp://b", "hv-02"), None, None)
    src.store.add(record("m-1"))
    for i, p in enumerate(percents):
        src.on_progress(flight, progress(p, elapsed=float(i), processed=i << 20))
    bodies = h.events.bodies(".progress")
    assert len(bodies) == len(percents)
    published = [b["percent"] for b in bodies]
    assert published == sorted(published) and published[-1] == max(percents)
    for body in bodies:
        msgspec.convert(body, MigrationProgressEvent)  # what a subscriber checks


def test_the_events_bandwidth_is_the_runners_transfer_rate_else_libvirts() -> None:
    assert bandwidth_bps(progress(10, transfer=300, memory_bps=150)) == 300
    assert bandwidth_bps(progress(10, memory_bps=150)) == 150  # before the runner's first measured rate
    assert bandwidth_bps(progress(10)) == 0
