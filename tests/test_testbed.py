"""Smoke test of the real-libvirt testbed (scripts/testbed, docs/testbed.md).

Run:  .venv/bin/python -m pytest tests/test_testbed.py   (as root, with
libvirt-python installed).  Brings up 2 hosts (left running for later tests;
`scripts/testbed down` stops them), boots a TCG guest pinned to host CPU 1 on
host1, live-migrates it to host2 and checks where it runs.
"""

import re
import time
import uuid

import pytest

from agent.testing.testbed import (
    define_and_start,
    destroy_domain,
    ensure_testbed,
    guest_xml,
    live_xml,
    persistent_xml,
    testbed_available,
    wait_console_line,
    wait_guest_ready,
)

_ok, _reason = testbed_available()
pytestmark = [
    pytest.mark.testbed,
    pytest.mark.skipif(not _ok, reason="testbed unavailable: %s" % _reason),
]


@pytest.fixture(scope="module")
def hosts():
    return ensure_testbed(2)


def _caps_uuid(conn):
    m = re.search(r"<host>\s*<uuid>([0-9a-f-]+)</uuid>", conn.getCapabilities())
    assert m, "no host uuid in capabilities"
    return m.group(1)


def test_hosts_are_distinct(hosts):
    h1, h2 = hosts
    c1, c2 = h1.connect(), h2.connect()
    try:
        assert c1.getHostname() == "tb-host1"
        assert c2.getHostname() == "tb-host2"
        u1, u2 = _caps_uuid(c1), _caps_uuid(c2)
        assert u1 != u2
        assert c1.getURI() == h1.uri and c2.getURI() == h2.uri
    finally:
        c1.close()
        c2.close()


def test_pinned_guest_live_migrates(hosts):
    import libvirt

    h1, h2 = hosts
    name = "tbsmoke-%s" % uuid.uuid4().hex[:8]
    try:
        t0 = time.monotonic()
        define_and_start(h1, guest_xml(name, vcpu_pins={0: [1]}, emulator_pins=[0], tick_s=1))
        line = wait_guest_ready(h1, name, timeout=60)
        assert "name=%s" % name in line
        boot_s = time.monotonic() - t0

        xml = live_xml(h1, name)
        assert re.search(r"<vcpupin vcpu='0' cpuset='1'/>", xml), xml
        assert "<emulatorpin cpuset='0'/>" in xml
        c1 = h1.connect()
        try:
            dom = c1.lookupByName(name)
            # vcpuinfo: ([(vcpu, state, cputime, cpu)], [cpumap]) -> pinned to CPU 1 only
            info, maps = dom.vcpus()
            assert maps[0][1] and not maps[0][0]
            assert info[0][3] == 1

            flags = (
                libvirt.VIR_MIGRATE_LIVE
                | libvirt.VIR_MIGRATE_PEER2PEER
                | libvirt.VIR_MIGRATE_PERSIST_DEST
                | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
            )
            t1 = time.monotonic()
            dom.migrateToURI3(h2.uri, {libvirt.VIR_MIGRATE_PARAM_URI: h2.migration_uri}, flags)
            mig_s = time.monotonic() - t1
        finally:
            c1.close()

        c1, c2 = h1.connect(), h2.connect()
        try:
            with pytest.raises(libvirt.libvirtError):
                c1.lookupByName(name)
            d2 = c2.lookupByName(name)
            assert d2.isActive() and d2.isPersistent()
            assert d2.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        finally:
            c1.close()
            c2.close()
        assert "<vcpupin vcpu='0' cpuset='1'/>" in persistent_xml(h2, name)
        # the guest keeps running on host2: its ticks appear in host2's console log
        wait_console_line(h2, name, "TESTBED-GUEST-TICK", timeout=15)
        print("boot-to-ready %.1fs, migration %.1fs" % (boot_s, mig_s))
    finally:
        destroy_domain(h1, name)
        destroy_domain(h2, name)
