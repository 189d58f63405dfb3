"""The pure parts: policy -> traits, candidates and their order, retries, version caps and moves."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import InvalidRequest
from agent.libvirt_ops.policy import TRAIT_AUTO_CONVERGE, TRAIT_POST_COPY
from agent.numa.request import parse_request
from agent.orchestrator.candidates import attempts_allowed, choose, why_not_fits
from agent.orchestrator.errors import BadMigrationRequest, NumaMigrationRefused
from agent.orchestrator.policy import instance_need, policy_parts, required_traits
from agent.orchestrator.versions import MoveKind, decide_move, resolve_cap, workaround_ignored
from tests.orchestrator.helpers import host

UUID = "8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a10"
PINNED = {"hw:cpu_policy": "dedicated", "hw:mem_page_size": "2048"}


def req(
    vcpus: int = 4, memory_mb: int = 2048, extra: dict[str, str] | None = None, image: dict[str, str] | None = None
):
    doc = {"uuid": UUID, "vcpus": vcpus, "memory_mb": memory_mb, "extra_specs": extra if extra is not None else PINNED}
    return parse_request({**doc, "image_properties": image or {}})


# --- policy -> traits ------------------------------------------------------------------------------

AC_F, PC_F = "compute:live_migration_auto_converge", "compute:live_migration_post_copy"
AC_I, PC_I = "compute_live_migration_auto_converge", "compute_live_migration_post_copy"


@pytest.mark.parametrize(
    ("extra", "image", "traits"),
    [
        ({}, {}, set()),
        ({PC_F: "true"}, {}, {TRAIT_POST_COPY}),
        ({}, {AC_I: "yes"}, {TRAIT_AUTO_CONVERGE}),
        ({PC_F: "false"}, {}, set()),  # false = nothing required
        ({AC_F: "false", PC_F: "false"}, {}, set()),
        ({AC_F: "true", PC_F: "false"}, {}, {TRAIT_AUTO_CONVERGE}),
        ({PC_F: "true"}, {PC_I: "true"}, {TRAIT_POST_COPY}),  # flavor and image agree
    ],
)
def test_required_traits(extra, image, traits) -> None:
    assert required_traits(req(extra={**PINNED, **extra}, image=image).migration) == traits


@pytest.mark.parametrize(
    ("extra", "image"),
    [
        ({AC_F: "true", PC_F: "true"}, {}),  # both features true
        ({PC_F: "true"}, {PC_I: "false"}),  # flavor / image conflict
        ({}, {AC_I: "1", PC_I: "1"}),
        ({PC_I: "true"}, {}),  # the image spelling in the flavor
    ],
)
def test_conflicts_refused(extra, image) -> None:
    with pytest.raises(InvalidRequest):
        req(extra={**PINNED, **extra}, image=image)


def test_policy_parts_name_their_source() -> None:
    parts = policy_parts(req(extra={**PINNED, PC_F: "true"}, image={AC_I: "false"}).migration)
    assert [(p.feature, p.value, p.source) for p in parts] == [
        ("auto_converge", False, f"image {AC_I}"),
        ("post_copy", True, f"flavor {PC_F}"),
    ]
    assert [p.source for p in policy_parts(req().migration)] == ["host config", "host config"]


# --- candidates ------------------------------------------------------------------------------------

NEED4 = instance_need(req(vcpus=4))


def names(c) -> list[str]:
    return [h.name for h in c.hosts]


def test_spread_and_pack_order_across_hosts() -> None:
    hosts = [host("a"), host("b", pcpus=(2, 2)), host("c", pcpus=(6, 6)), host("d", pcpus=(12, 12))]
    spread = choose(NEED4, frozenset(), hosts, source="a")
    assert names(spread) == ["d", "c"]
    assert [(r.host, "no free host cell" in r.reason) for r in spread.rejected] == [("b", True)]
    assert names(choose(NEED4, frozenset(), hosts, source="a", preference="pack")) == ["c", "d"]


def test_source_never_a_candidate_and_ties_by_name() -> None:
    hosts = [host(n) for n in "dcba"]
    assert names(choose(NEED4, frozenset(), hosts, source="b")) == ["a", "c", "d"]


def test_traits_filter() -> None:
    hosts = [host("a"), host("b", traits=()), host("c", traits=(TRAIT_POST_COPY,))]
    got = choose(NEED4, frozenset({TRAIT_POST_COPY}), hosts, source="a")
    assert names(got) == ["c"]
    assert "lacks trait COMPUTE_MIGRATE_POST_COPY" in got.rejected[0].reason


def test_named_hosts_in_order_resources_left_to_the_claim() -> None:
    hosts = [host("a"), host("b", pcpus=(0, 0)), host("c")]
    got = choose(NEED4, frozenset(), hosts, source="a", named=["c", "b", "c", "zz", "a"])
    assert names(got) == ["c", "b"]
    assert [(r.host, r.reason) for r in got.rejected] == [("zz", "no live agent"), ("a", "is the source")]


def test_other_major_is_not_a_candidate() -> None:
    got = choose(NEED4, frozenset(), [host("a"), host("b", rpc_max="2.0")], source="a")
    assert names(got) == [] and "major 1" in got.rejected[0].reason


def test_memory_in_the_right_page_size() -> None:
    no_pages = host("b", pages_2m=100)  # 200 MiB of 2 MiB pages
    assert why_not_fits(NEED4, no_pages.caps.cells) is not None
    small = instance_need(req(vcpus=2, memory_mb=2048, extra={"hw:cpu_policy": "dedicated"}))
    assert why_not_fits(small, no_pages.caps.cells) is None  # small pages: free_memory_mb counts


def test_each_guest_cell_needs_its_own_host_cell() -> None:
    two_cells = instance_need(req(vcpus=8, extra={**PINNED, "hw:numa_nodes": "2"}))
    assert why_not_fits(two_cells, host("b", pcpus=(4, 4)).caps.cells) is None
    assert why_not_fits(two_cells, host("b", pcpus=(8, 0)).caps.cells) is not None
    assert why_not_fits(two_cells, host("b", pcpus=(8,)).caps.cells) is not None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 16), st.integers(0, 16)), min_size=1, max_size=8), st.booleans())
def test_candidates_are_the_fitting_hosts_in_order(free: list[tuple[int, int]], spread: bool) -> None:
    hosts = [host(f"h{i}", pcpus=p) for i, p in enumerate(free)]
    got = choose(NEED4, frozenset(), hosts, source="none", preference="spread" if spread else "pack")
    assert sorted(names(got) + [r.host for r in got.rejected]) == sorted(h.name for h in hosts)
    assert set(names(got)) == {f"h{i}" for i, p in enumerate(free) if max(p) >= 4}
    totals = [sum(next(h for h in hosts if h.name == n).caps.cells[i].free_pcpus for i in range(2)) for n in names(got)]
    assert totals == sorted(totals, reverse=spread)


@pytest.mark.parametrize(
    ("retries", "candidates", "asked"), [(-1, 5, 5), (0, 5, 1), (2, 5, 3), (9, 5, 5), (-1, 0, 0), (0, 0, 0)]
)
def test_attempts_allowed(retries: int, candidates: int, asked: int) -> None:
    assert attempts_allowed(retries, candidates) == asked


# --- versions --------------------------------------------------------------------------------------


def test_cap_auto_is_the_lowest_live_version() -> None:
    assert resolve_cap("auto", [host("a"), host("b")]) == (1, 1)
    assert resolve_cap("auto", [host("a"), host("b", rpc_max="1.0")]) == (1, 0)
    assert resolve_cap("auto", []) == (1, 1)
    assert resolve_cap("1.0", [host("a")]) == (1, 0)
    assert resolve_cap("1.5", [host("a")]) == (1, 1)  # never above what this orchestrator speaks
    with pytest.raises(BadMigrationRequest):
        resolve_cap("x", [])


V10, V11 = (1, 0), (1, 1)


@pytest.mark.parametrize(("cap", "src", "dst"), list(itertools.product([V10, V11], repeat=3)))
@pytest.mark.parametrize("numa", [True, False])
@pytest.mark.parametrize("workaround", [True, False])
def test_decide_move_table(cap, src, dst, numa: bool, workaround: bool) -> None:
    all_11 = min(cap, src, dst) == V11
    if all_11:
        assert decide_move(cap, src, dst, numa=numa, workaround=workaround).kind is MoveKind.NUMA_AWARE
    elif numa and not workaround:
        with pytest.raises(NumaMigrationRefused, match="enable_numa_live_migration"):
            decide_move(cap, src, dst, numa=numa, workaround=workaround)
    else:
        move = decide_move(cap, src, dst, numa=numa, workaround=workaround)
        assert move.kind is MoveKind.LEGACY
        assert (move.warning is not None) == numa  # the risk is named exactly for a NUMA instance


def test_workaround_ignored_only_when_everything_is_at_1_1() -> None:
    assert workaround_ignored(V11, [host("a"), host("b")], True)
    assert not workaround_ignored(V11, [host("a"), host("b", rpc_max="1.0")], True)
    assert not workaround_ignored(V10, [host("a")], True)
    assert not workaround_ignored(V11, [host("a")], False)


def test_described_hosts_list_instances_as_objects_or_plain_ids() -> None:
    import msgspec

    from agent.orchestrator.model import DescribedHost
    from tests.bus.test_schemas import CAPABILITIES

    daemon = {**CAPABILITIES, "host_state": {}, "instances": [{"uuid": "u-1", "name": "vm1", "pinned": True}]}
    assert msgspec.convert(daemon, DescribedHost).instance_ids() == ("u-1",)
    simulated = {**CAPABILITIES, "host_state": {}, "instances": ["u-2", "vm3"]}
    assert msgspec.convert(simulated, DescribedHost).instance_ids() == ("u-2", "vm3")
    assert msgspec.convert({**CAPABILITIES, "host_state": {}}, DescribedHost).instance_ids() == ()


def test_a_conflict_the_source_agent_refuses_is_bad_input_before_any_destination_is_asked() -> None:
    from typing import cast

    from agent.bus.errors import RemoteInvalidRequest
    from agent.orchestrator.agent_api import AgentAPI
    from agent.orchestrator.fleet import FleetView
    from agent.orchestrator.migrate import Orchestrator
    from agent.orchestrator.settings import Settings

    class RefusingSource:  # the daemon's describe_instance parses the metadata: a conflict is InvalidRequest
        def describe_instance(self, host: str, instance: str) -> None:
            raise RemoteInvalidRequest("compute:live_migration_post_copy: the flavor and the image disagree")

    fleet = FleetView(clock=lambda: 0.0)
    fleet.put(host("hv-a"))
    orch = Orchestrator(cast(AgentAPI, RefusingSource()), fleet, Settings())
    with pytest.raises(BadMigrationRequest, match="flavor and the image disagree"):
        orch.plan("vm1", "hv-a")


class _LosingOnce:
    """A client whose first call of each method loses its reply queue (a broker failover), as
    RpcClient raises ReplyLost; `calls` records what was sent."""

    def __init__(self, answers: dict[str, dict], lose: int = 1) -> None:
        self.answers, self.lose, self.calls = answers, lose, []

    def can_send(self, version: str) -> bool:
        return True

    def call(self, host, method, body, *, timeout=None, version=None):
        from agent.bus.errors import ReplyLost

        self.calls.append((host, method, body))
        if sum(1 for c in self.calls if c[1] == method) <= self.lose:
            raise ReplyLost(f"the reply queue of {method} was lost")
        return self.answers[method]


def test_the_stub_asks_again_once_when_a_reply_queue_was_lost():
    """ReplyLost means the call may still run: the stub repeats it (idempotent by its operation id)
    and acts on the answer, instead of taking it for 'not run' or 'failed'."""
    from agent.bus.errors import ReplyLost
    from agent.orchestrator.agent_api import AgentAPI

    status = {"migration_id": "m1", "instance": "vm1", "status": "running", "phase": "precopy", "percent": 40.0}
    client = _LosingOnce({"migration_status": status})
    api = AgentAPI(client)
    assert api.migration_status("hv-a", "m1").status == "running"
    assert client.calls == [("hv-a", "migration_status", {"migration_id": "m1"})] * 2  # the same call twice

    twice = _LosingOnce({"migration_status": status}, lose=2)
    with pytest.raises(ReplyLost):  # a second loss is the caller's to judge, like a timeout
        AgentAPI(twice).migration_status("hv-a", "m1")
    assert len(twice.calls) == 2
