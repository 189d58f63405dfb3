"""The migrate flow against the machine's RabbitMQ with simulated agents (real bus, fitter and
ledger; the libvirt side modelled)."""

from __future__ import annotations

import logging
import time

import pytest
from msgspec import to_builtins

from agent.errors import InvalidRequest
from agent.numa.placement import Placement
from agent.orchestrator.drain import Drainer
from agent.orchestrator.errors import NoDestination, NumaMigrationRefused
from agent.orchestrator.versions import MoveKind
from agent.testing.builders import topology
from agent.testing.fleet import SimWorld
from tests.orchestrator.conftest import instance

pytestmark = pytest.mark.timeout(120)

BIG = dict(cells=2, cores_per_cell=4, threads=2)  # 8 pCPUs and 1024 x 2 MiB pages per cell
SMALL = dict(cells=2, cores_per_cell=1, threads=2)  # 2 pCPUs per cell: no room for a 4-vCPU guest


def three_hosts(world: SimWorld, **b_kw) -> None:
    world.add("hv-a", topology(**BIG, hostname="hv-a"))
    world.add("hv-b", topology(**(b_kw.pop("topo", None) or BIG), hostname="hv-b"), **b_kw)
    world.add("hv-c", topology(**BIG, hostname="hv-c"))
    world.start()


def wait_done(session, started, timeout=20.0):
    src, mid = started.plan.source.name, started.migration_id
    return session.tracker.wait(mid, timeout=timeout, poll=lambda: session.api.migration_status(src, mid), poll_s=0.5)


def test_alternate_taken_when_the_first_refuses(world, open_session) -> None:
    three_hosts(world, topo=SMALL)
    vm = world.agents["hv-a"].boot(instance("vm1"))
    session = open_session()
    plan = session.orchestrator.plan("vm1", "hv-a", named=("hv-b", "hv-c"))
    started = session.orchestrator.start(plan)
    assert started.destination.name == "hv-c"
    assert [(r.host, r.kind) for r in started.rejections] == [("hv-b", "NoFit")]
    assert "fit" in started.rejections[0].reason or started.rejections[0].details
    outcome = wait_done(session, started)
    assert outcome.status == "completed"
    assert world.where(vm.uuid) == ["hv-c"]
    assert started.placement is not None
    assert world.agents["hv-c"].instances[vm.uuid].placement == Placement.from_json(to_builtins(started.placement))
    assert world.agents["hv-b"].ledger.list_claims() == []  # nothing was ever held on B
    assert world.agents["hv-c"].ledger.live_claims() == []  # C's claim is confirmed, not left live
    assert [cl.state.value for cl in world.agents["hv-c"].ledger.list_claims()] == ["confirmed"]


def claims_everywhere(world: SimWorld) -> list[str]:
    return [f"{a.name}:{c.migration_id}" for a in world.agents.values() for c in a.ledger.list_claims()]


def test_stale_view_nofit_then_next(world, open_session) -> None:
    """B looks best in what it published, but is full when asked: NoFit, then C; nothing left on B."""
    world.add("hv-a", topology(**BIG, hostname="hv-a"))
    world.add("hv-b", topology(cells=2, cores_per_cell=6, threads=2, hostname="hv-b"))
    world.add("hv-c", topology(**BIG, hostname="hv-c"))
    world.start()
    vm = world.agents["hv-a"].boot(instance("vm1"))
    session = open_session()
    for i in range(6):  # fill B behind the orchestrator's back (no capabilities published)
        world.agents["hv-b"].boot(instance(f"filler{i}", vcpus=2, memory_mb=512), publish=False)
    plan = session.orchestrator.plan("vm1", "hv-a")
    assert [h.name for h in plan.candidates.hosts] == ["hv-b", "hv-c"]  # spread: B has the most room
    started = session.orchestrator.start(plan)
    assert (started.destination.name, [r.kind for r in started.rejections]) == ("hv-c", ["NoFit"])
    assert wait_done(session, started).status == "completed"
    assert world.where(vm.uuid) == ["hv-c"]
    assert world.agents["hv-b"].ledger.list_claims() == []


def test_busy_moves_on_to_the_next(world, open_session) -> None:
    three_hosts(world)
    vm = world.agents["hv-a"].boot(instance("vm1", vcpus=2, memory_mb=512))
    b = world.agents["hv-b"]
    for i in range(2):  # B at its inbound limit
        b.ledger.claim(f"other-{i}", instance(f"x{i}", vcpus=1, memory_mb=256).doc(), "hv-x", 300, b._state_fn)
    session = open_session()
    started = session.orchestrator.start(session.orchestrator.plan("vm1", "hv-a", named=("hv-b", "hv-c")))
    assert [(r.host, r.kind) for r in started.rejections] == [("hv-b", "Busy")]
    assert started.rejections[0].retry_after is not None
    assert wait_done(session, started).status == "completed"
    assert world.where(vm.uuid) == ["hv-c"]


def test_max_retries_zero_stops_after_the_first_refusal(world, open_session) -> None:
    three_hosts(world, topo=SMALL)
    vm = world.agents["hv-a"].boot(instance("vm1"))
    session = open_session(retries=0)
    with pytest.raises(NoDestination) as err:
        session.orchestrator.start(session.orchestrator.plan("vm1", "hv-a", named=("hv-b", "hv-c")))
    assert [(r.host, r.kind) for r in err.value.rejections] == [("hv-b", "NoFit")]
    assert claims_everywhere(world) == []
    assert world.where(vm.uuid) == ["hv-a"]


def test_cap_1_0_refuses_a_numa_instance_untouched(world, open_session) -> None:
    three_hosts(world)
    vm = world.agents["hv-a"].boot(instance("vm1"))
    session = open_session(cap="1.0")
    with pytest.raises(NumaMigrationRefused, match="cap 1.0"):
        session.orchestrator.plan("vm1", "hv-a")
    assert claims_everywhere(world) == []
    assert world.where(vm.uuid) == ["hv-a"]
    assert world.agents["hv-a"].migrations == {}


def test_cap_1_0_with_the_workaround_moves_the_legacy_way(world, open_session, caplog) -> None:
    three_hosts(world)
    for agent in world.agents.values():
        agent.numa_workaround = True
    vm = world.agents["hv-a"].boot(instance("vm1"))
    session = open_session(cap="1.0", workaround=True)
    with caplog.at_level(logging.WARNING, logger="compute_agent.orchestrator"):
        started = session.orchestrator.start(session.orchestrator.plan("vm1", "hv-a"))
    assert started.move.kind is MoveKind.LEGACY and started.placement is None
    assert any("pinning and memory placement are copied as is" in r.getMessage() for r in caplog.records)
    assert wait_done(session, started).status == "completed"
    dest = world.agents[started.destination.name]
    assert dest.instances[vm.uuid].placement == vm.placement  # copied as is
    assert claims_everywhere(world) == []  # nothing was claimed


def test_source_agent_at_1_0_refused_then_legacy_with_the_workaround(world, open_session, caplog) -> None:
    world.add("hv-a", topology(**BIG, hostname="hv-a"), rpc_max="1.0", numa_workaround=True)
    world.add("hv-b", topology(**BIG, hostname="hv-b"))
    world.start()
    vm = world.agents["hv-a"].boot(instance("vm1"))
    with pytest.raises(NumaMigrationRefused, match="source 1.0"):
        open_session(cap="1.1").orchestrator.plan("vm1", "hv-a")
    assert claims_everywhere(world) == []
    session = open_session(cap="1.1", workaround=True)
    with caplog.at_level(logging.WARNING, logger="compute_agent.orchestrator"):
        started = session.orchestrator.start(session.orchestrator.plan("vm1", "hv-a"))
    assert started.move.kind is MoveKind.LEGACY
    assert any("copied as is" in r.getMessage() for r in caplog.records)
    assert wait_done(session, started).status == "completed"
    assert world.where(vm.uuid) == ["hv-b"]


def test_workaround_ignored_at_1_1_says_deprecated(world, open_session, caplog) -> None:
    three_hosts(world)
    world.agents["hv-a"].boot(instance("vm1"))
    session = open_session(workaround=True)
    with caplog.at_level(logging.WARNING, logger="compute_agent.orchestrator"):
        started = session.orchestrator.start(session.orchestrator.plan("vm1", "hv-a"))
    assert started.move.kind is MoveKind.NUMA_AWARE
    assert any("deprecated" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("specs", "image"),
    [
        ({"compute:live_migration_post_copy": "true"}, {"compute_live_migration_post_copy": "false"}),
        ({"compute:live_migration_post_copy": "true", "compute:live_migration_auto_converge": "true"}, {}),
    ],
)
def test_policy_conflict_refused_before_any_claim(world, open_session, specs, image) -> None:
    three_hosts(world)
    vm = world.agents["hv-a"].boot(instance("vm1"))
    vm.extra_specs.update(specs)  # set on the running domain (instance set-metadata refuses this; a
    vm.image_properties.update(image)  # hand-edited domain or an old agent may still carry it)
    session = open_session()
    with pytest.raises(InvalidRequest, match="compute"):
        session.orchestrator.plan("vm1", "hv-a")
    assert claims_everywhere(world) == []


def test_required_trait_filters_hosts(world, open_session) -> None:
    world.add("hv-a", topology(**BIG, hostname="hv-a"))
    world.add("hv-b", topology(cells=2, cores_per_cell=6, threads=2, hostname="hv-b"), traits=())
    world.add("hv-c", topology(**BIG, hostname="hv-c"))
    world.start()
    vm = instance("vm1")
    vm.extra_specs["compute:live_migration_post_copy"] = "true"
    world.agents["hv-a"].boot(vm)
    plan = open_session().orchestrator.plan("vm1", "hv-a")
    assert [h.name for h in plan.candidates.hosts] == ["hv-c"]
    assert "COMPUTE_MIGRATE_POST_COPY" in plan.candidates.rejected[0].reason


def test_drain_three_instances_onto_two_hosts(world, open_session) -> None:
    three_hosts(world)
    vms = [world.agents["hv-a"].boot(instance(f"vm{i}", vcpus=4, memory_mb=1024)) for i in range(3)]
    session = open_session()
    session.discover()  # the instances booted after the session's first describe
    items = Drainer(session.orchestrator, session.tracker, wait_timeout_s=30).drain(
        "hv-a", sorted(session.fleet.get("hv-a").instances), parallel=2
    )
    assert sorted(i.result for i in items) == ["migrated"] * 3
    assert all(len(world.where(vm.uuid)) == 1 and world.where(vm.uuid) != ["hv-a"] for vm in vms)
    assert world.agents["hv-a"].instances == {}
    assert all(a.ledger.live_claims() == [] for a in world.agents.values())
    assert all(a.report().overlaps == () for a in world.agents.values())


def test_drain_reports_an_instance_that_cannot_go_anywhere(world, open_session) -> None:
    three_hosts(world)
    world.agents["hv-a"].boot(instance("huge", vcpus=8, memory_mb=1024))  # a whole cell: fits nowhere else
    world.agents["hv-b"].boot(instance("b1", vcpus=6, memory_mb=512))
    world.agents["hv-b"].boot(instance("b2", vcpus=6, memory_mb=512))
    world.agents["hv-c"].boot(instance("c1", vcpus=6, memory_mb=512))
    world.agents["hv-c"].boot(instance("c2", vcpus=6, memory_mb=512))
    session = open_session()
    [item] = Drainer(session.orchestrator, session.tracker, wait_timeout_s=10).drain("hv-a", ["huge"])
    assert item.result == "no-destination"
    assert {r.host for r in item.rejections} == {"hv-b", "hv-c"}
    assert world.where(world.agents["hv-a"].instances and next(iter(world.agents["hv-a"].instances))) == ["hv-a"]


def test_dry_run_holds_nothing(world, open_session) -> None:
    three_hosts(world, topo=SMALL)
    world.agents["hv-a"].boot(instance("vm1"))
    session = open_session()
    answers = session.orchestrator.dry_run(session.orchestrator.plan("vm1", "hv-a", named=("hv-b", "hv-c")))
    assert [(a.host, a.placement is not None) for a in answers] == [("hv-b", False), ("hv-c", True)]
    assert answers[0].rejection is not None and answers[0].rejection.kind == "NoFit"
    assert claims_everywhere(world) == []
    time.sleep(0)


def test_a_1_0_destination_is_filtered_or_ranked_after(world, open_session) -> None:
    """Cap and source at 1.1: a 1.0 destination cannot take the NUMA-aware move. Without the
    workaround it is filtered (with the versions named); with it, it comes after every 1.1 host."""
    world.add("hv-a", topology(**BIG, hostname="hv-a"))
    world.add("hv-b", topology(cells=2, cores_per_cell=8, threads=2, hostname="hv-b"), rpc_max="1.0")
    world.add("hv-c", topology(**BIG, hostname="hv-c"))
    world.start()
    world.agents["hv-a"].boot(instance("vm1"))
    plan = open_session(cap="1.1").orchestrator.plan("vm1", "hv-a")
    assert [h.name for h in plan.candidates.hosts] == ["hv-c"]
    assert [r.host for r in plan.candidates.rejected] == ["hv-b"] and "destination 1.0" in plan.candidates.rejected[
        0
    ].reason
    plan = open_session(cap="1.1", workaround=True).orchestrator.plan("vm1", "hv-a")
    assert [h.name for h in plan.candidates.hosts] == ["hv-c", "hv-b"]  # B has more room, but only legacy
