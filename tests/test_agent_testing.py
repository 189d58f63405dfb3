"""agent.testing: its public surface (as httpx's test_exported_members), that the agent never imports
it, and the behaviour of the shared fakes that the tests of other modules rely on."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import libvirt
import pytest

import agent.testing
from agent.libvirt_ops.errors import libvirt_error_details
from agent.testing.builders import fit_scenarios, request, topology
from agent.testing.clock import FakeClock
from agent.testing.fake_libvirt import (
    DOMAIN_UUID,
    DestConn,
    DestDomain,
    FakeConn,
    FakeDomain,
    FakeError,
    job_stats,
)

AGENT = Path(agent.testing.__file__).resolve().parents[1]

SURFACE = {
    "builders": {
        "FIT_SCENARIOS",
        "NO_RESERVE",
        "cells_request",
        "fit_scenarios",
        "host_state",
        "request",
        "state_cell",
        "state_fn",
        "topology",
    },
    "clock": {"DEFAULT_START", "RUNAWAY_SLEEP_S", "FakeClock"},
    "fleet": {
        "ALL_TRAITS",
        "INBOUND_LIMIT",
        "OUTBOUND_LIMIT",
        "Scheduler",
        "SimAgent",
        "SimInstance",
        "SimMigration",
        "SimWorld",
    },
    "ledger": {"fill_ledger"},
    "fake_libvirt": {
        "DOMAIN_NAME",
        "DOMAIN_UUID",
        "LIB_VERSION",
        "MiB",
        "QEMU_VERSION",
        "DestConn",
        "DestDomain",
        "FakeConn",
        "FakeDomain",
        "FakeError",
        "job_stats",
        "no_domain",
    },
}
# the testbed driver keeps the API it had as tests/testbed.py
TESTBED_API = {
    "HOT_GUEST",
    "HOT_MIGRATION",
    "READY_LINE",
    "SCRIPT",
    "TICK_LINE",
    "TestbedHost",
    "define_and_start",
    "destroy_all",
    "destroy_domain",
    "ensure_testbed",
    "guest_xml",
    "host",
    "live_xml",
    "persistent_xml",
    "testbed_available",
    "wait_console_line",
    "wait_guest_ready",
}


def test_package_lists_its_modules() -> None:
    found = {p.stem for p in Path(agent.testing.__file__).parent.glob("*.py")} - {"__init__"}
    assert set(agent.testing.MODULES) == found
    for name in agent.testing.MODULES:
        assert f"agent.testing.{name}" in (agent.testing.__doc__ or "")


@pytest.mark.parametrize("module", sorted(SURFACE))
def test_exported_members(module: str) -> None:
    mod = importlib.import_module(f"agent.testing.{module}")
    assert set(mod.__all__) == SURFACE[module]
    defined_here = {
        name
        for name, value in vars(mod).items()
        if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))
        if value.__module__ == mod.__name__
    }
    assert defined_here <= set(mod.__all__), "a public function or class is missing from __all__"


def test_testbed_keeps_its_api() -> None:
    from agent.testing import testbed

    assert TESTBED_API <= set(dir(testbed))
    assert Path(testbed.SCRIPT) == AGENT.parent / "scripts" / "testbed"


def test_the_agent_never_imports_its_test_support() -> None:
    offenders = [
        str(p.relative_to(AGENT))
        for p in AGENT.rglob("*.py")
        if "testing" not in p.relative_to(AGENT).parts and "agent.testing" in p.read_text()
    ]
    assert offenders == []


def test_importing_the_package_loads_no_module_of_it() -> None:
    code = "import sys, agent.testing; print(sorted(m for m in sys.modules if m.startswith('agent.testing.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- the fakes ------------------------------------------------------------------------------------


def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock()
    assert clock() == clock.t == 1_000_000.0
    clock.advance(5)
    clock.sleep(0.5)
    assert clock() == 1_000_005.5


def test_fake_clock_stops_a_runaway_sleep_loop() -> None:
    clock = FakeClock(0.0, max_sleep_s=10)
    clock.advance(100)  # only sleeping counts towards the limit
    clock.sleep(10)
    with pytest.raises(RuntimeError, match="ran away"):
        clock.sleep(0.1)


def test_fake_errors_carry_libvirt_codes() -> None:
    err = FakeError("gone", libvirt.VIR_ERR_NO_DOMAIN)
    assert isinstance(err, libvirt.libvirtError)
    assert libvirt_error_details(err) == (libvirt.VIR_ERR_NO_DOMAIN, "gone")
    assert FakeError("boom").get_error_code() == libvirt.VIR_ERR_INTERNAL_ERROR


def test_fake_conn_lookups_and_host_calls() -> None:
    dom = FakeDomain()
    conn = FakeConn(dom, host_error=FakeError("connection lost"))
    assert conn.lookupByName("vm1") is dom and conn.lookupByUUIDString(DOMAIN_UUID) is dom
    assert conn.listAllDomains(0) == [dom]
    for lookup in (conn.lookupByName, conn.lookupByUUIDString):
        with pytest.raises(FakeError) as info:
            lookup("nope")
        assert info.value.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN and "'nope'" in str(info.value)
    with pytest.raises(FakeError, match="connection lost"):
        conn.getType()
    assert FakeConn().getLibVersion() == 9_000_000 and FakeConn(driver="Test").getType() == "Test"


def test_fake_domain_follows_its_script_then_ends() -> None:
    dom = FakeDomain([job_stats(300), job_stats(100, iteration=2)], "fail")
    assert dom.jobStats()["memory_remaining"] == 300 << 20
    assert dom.jobStats()["memory_iteration"] == 2
    assert dom.jobStats()["type"] == libvirt.VIR_DOMAIN_JOB_NONE and dom.finished
    with pytest.raises(FakeError) as info:
        dom.migrateToURI3("qemu+tcp://dest/system", {}, 0)
    assert info.value.get_error_code() == libvirt.VIR_ERR_OPERATION_FAILED
    assert dom.names() == ["jobStats"] * 3 + ["migrateToURI3"]


def test_fake_domain_for_the_inventory() -> None:
    shut_off = FakeDomain(name="a", uuid="u-a", active=False, xml="<domain/>")
    assert (shut_off.name(), shut_off.UUIDString(), shut_off.isActive(), shut_off.XMLDesc(0)) == (
        "a",
        "u-a",
        False,
        "<domain/>",
    )
    assert FakeDomain().XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).endswith("<!--inactive-->")
    with pytest.raises(FakeError):
        FakeDomain(xml_error=FakeError("xml failed")).XMLDesc(0)


def test_destination_domain_appears_when_told() -> None:
    ready = []
    conn = DestConn(lambda: bool(ready), DestDomain(active=True))
    with pytest.raises(FakeError):
        conn.lookupByUUIDString(DOMAIN_UUID)
    ready.append(True)
    assert conn.lookupByUUIDString(DOMAIN_UUID).isActive()
    assert DestDomain(active=True).state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert DestDomain().state()[0] == libvirt.VIR_DOMAIN_SHUTOFF


# --- the builders ---------------------------------------------------------------------------------


def test_topology_numbers_cpus_like_linux() -> None:
    topo = topology(cells=2, cores_per_cell=2, threads=2)
    assert sorted(topo.cells[0].cpus) == [0, 1, 4, 5]
    assert sorted(map(sorted, topo.cells[1].siblings)) == [[2, 6], [3, 7]]


def test_request_splits_evenly_and_marks_an_implicit_cell() -> None:
    one = request(vcpus=4, memory_mb=4096)
    assert one.numa_implicit and one.cells[0].dedicated_vcpus == frozenset(range(4))
    two = request(vcpus=4, memory_mb=4096, numa_nodes=2, uuid="u")
    assert not two.numa_implicit and [c.memory_mb for c in two.cells] == [2048, 2048] and two.uuid == "u"


def test_fit_scenarios_are_a_list() -> None:
    assert isinstance(fit_scenarios(), list)
