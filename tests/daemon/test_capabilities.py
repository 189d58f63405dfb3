"""What a host publishes about itself: the capabilities body, the peer URIs, what a hotplug changed."""

from __future__ import annotations

import dataclasses

import msgspec
import pytest

from agent.bus.schemas import Capabilities
from agent.config import AgentConfig, UpgradeLevelsConfig
from agent.daemon.capabilities import (
    Announcer,
    HostFacts,
    capabilities_body,
    cells_free,
    host_address,
    peer_libvirt_uri,
    running_instances,
    served_max,
    topology_changes,
)
from agent.errors import ConfigError
from agent.libvirt_ops.domain_model import DomainPlacement
from agent.libvirt_ops.inventory import DomainInventory
from agent.numa.discovery import discover_sysfs
from agent.numa.state import CellUsage, HostState
from agent.numa.topology import PagePool
from tests.daemon.agent_support import SYSFS_FIXTURE

FACTS = HostFacts(
    host="hv-1",
    traits=frozenset({"COMPUTE_MIGRATE_POST_COPY", "COMPUTE_MIGRATE_AUTO_CONVERGE"}),
    libvirt_version="9.0.0",
    qemu_version="7.2.0",
    migration_uri="tcp://10.0.0.1",
    libvirt_uri="qemu+tcp://10.0.0.1/system",
)


def topology():
    return discover_sysfs(SYSFS_FIXTURE, hostname="hv-1")


def test_cells_count_what_may_still_be_promised():
    state = HostState(topology(), usage={0: CellUsage(pinned_cpus=frozenset({0, 1}), used_pages={2048: 100})})
    cells = {c.id: c for c in cells_free(state)}
    assert cells[0].free_pcpus == 2 and cells[1].free_pcpus == 4
    assert cells[0].free_pages == {"2048": 1000, "1048576": 3}  # min(kernel free, total - used)
    assert cells[1].free_pages["2048"] == 17
    assert all(c.free_shared_vcpus > 0 and c.free_memory_mb > 0 for c in cells.values())


def test_the_body_is_the_protocols_and_traits_are_sorted():
    body = capabilities_body(FACTS, HostState(topology()), seq=7, ts=1796131260.0)
    again = msgspec.convert(msgspec.to_builtins(body), Capabilities)
    assert again == body
    assert body.traits == ["COMPUTE_MIGRATE_AUTO_CONVERGE", "COMPUTE_MIGRATE_POST_COPY"]
    assert body.rpc_versions.min == "1.0" and body.rpc_versions.max == "1.1" and body.seq == 7


class _Sink:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Capabilities]] = []

    def publish(self, routing_key, body, *, wait=True):
        self.sent.append((routing_key, body))


def test_the_announcer_numbers_events_and_describe_shows_the_last_number():
    sink = _Sink()
    announcer = Announcer(FACTS, sink, clock=lambda: 5.0)
    state = HostState(topology())
    assert announcer.current(state).seq == 0
    announcer.publish(state, "start")
    announcer.publish(state, "claim taken")
    assert [(k, b.seq) for k, b in sink.sent] == [("capabilities.hv-1", 1), ("capabilities.hv-1", 2)]
    assert announcer.current(state).seq == 2


def test_peer_uris():
    assert peer_libvirt_uri("qemu:///system", "10.0.0.1") == "qemu+tcp://10.0.0.1/system"
    assert peer_libvirt_uri("qemu+tcp://127.0.0.2/system", "10.0.0.1") == "qemu+tcp://127.0.0.2/system"
    assert peer_libvirt_uri("test:///default", "127.0.0.1") == "test+tcp://127.0.0.1/default"
    assert host_address(AgentConfig(my_ip="10.1.2.3"), "anything") == "10.1.2.3"
    assert host_address(AgentConfig(), "no-such-host.invalid") == "127.0.0.1"


def test_topology_changes_name_what_moved_and_ignore_free_counts():
    old = topology()
    assert topology_changes(old, old) == []
    cell1 = old.cell(1)
    pages = tuple(dataclasses.replace(p, free=0) if p.size_kb == 2048 else p for p in cell1.pages)
    free_only = dataclasses.replace(old, cells=(old.cell(0), dataclasses.replace(cell1, pages=pages)))
    assert topology_changes(old, free_only) == []
    grown = tuple(PagePool(2048, 2048, 1017) if p.size_kb == 2048 else p for p in cell1.pages)
    fewer_cpus = dataclasses.replace(cell1, cpus=frozenset({4, 5, 6}), pages=grown)
    new = dataclasses.replace(old, cells=(old.cell(0), fewer_cpus), online_cpus=old.online_cpus - {7})
    changes = topology_changes(old, new)
    assert "online CPUs 0,1,2,3,4,5,6,7 -> 0,1,2,3,4,5,6" in changes
    assert "cell 1: CPUs 4,5,6,7 -> 4,5,6" in changes
    assert any(c.startswith("cell 1: hugepage totals") and "2048: 2048" in c for c in changes)
    assert topology_changes(old, dataclasses.replace(old, cells=(old.cell(0),))) == ["cells removed: 1"]


def _pinned(version: str) -> AgentConfig:
    return AgentConfig(upgrade_levels=UpgradeLevelsConfig(agent=version))


def test_the_agent_pin_caps_what_the_agent_advertises():
    assert served_max(AgentConfig()) == "1.1"  # auto: all it can
    assert served_max(_pinned("1.0")) == "1.0"  # the rolling upgrade: looks like the old release
    assert served_max(_pinned("1.1")) == "1.1"
    assert served_max(_pinned("1.9")) == "1.1"  # a pin above what it serves changes nothing
    pinned = dataclasses.replace(FACTS, rpc_max="1.0")
    body = capabilities_body(pinned, HostState(topology()), seq=1, ts=1796131260.0)
    assert (body.rpc_versions.min, body.rpc_versions.max) == ("1.0", "1.0")


@pytest.mark.parametrize("version", ["0.9", "2.0"])
def test_a_pin_the_agent_cannot_serve_is_a_config_error_naming_the_option(version):
    with pytest.raises(ConfigError, match=r"\[upgrade_levels\] agent = " + version):
        served_max(_pinned(version))


def test_instances_are_the_running_domains_with_their_pinning_and_numa():
    pinned = DomainPlacement("vm-b", "AAAA-1", 2, 2 << 20, vcpu_pins={0: frozenset({1}), 1: frozenset({2})})
    numa = DomainPlacement("vm-a", "aaaa-2", 1, 1 << 20, numatune_nodeset=frozenset({0}))
    plain = DomainPlacement("vm-c", "aaaa-3", 1, 1 << 20)
    stopped = DomainPlacement("vm-off", "aaaa-4", 1, 1 << 20, vcpu_pins={0: frozenset({3})})
    inventory = DomainInventory((pinned, numa, plain, stopped), frozenset({"aaaa-1", "aaaa-2", "aaaa-3"}))
    rows = running_instances(inventory)
    assert [(r["name"], r["pinned"], r["numa"]) for r in rows] == [
        ("vm-a", False, True),
        ("vm-b", True, False),
        ("vm-c", False, False),
    ]
    assert rows[1] == {"uuid": "AAAA-1", "name": "vm-b", "vcpus": 2, "memory_mb": 2048, "pinned": True, "numa": False}
