"""The runner's API for the daemon: the legacy move without a placement, attaching to a job after a
restart, the bandwidth and page size in the progress, force-complete's answer, the decided policy."""

from __future__ import annotations

import libvirt
import pytest

from agent.libvirt_ops.domain_xml import parse_domain
from agent.testing.clock import FakeClock
from agent.testing.fake_libvirt import FakeDomain, job_stats
from tests.libvirt_ops.test_migration_unit import SMALL_DOMAIN_XML, TARGET, cfg, make_request, runner_for

pytestmark = pytest.mark.timeout(60)

PINNED_XML = SMALL_DOMAIN_XML.replace("</domain>", "<cputune><vcpupin vcpu='0' cpuset='3'/></cputune></domain>", 1)


class XmlDomain(FakeDomain):
    """A domain whose live and persistent XML differ (the persistent one has a title)."""

    def XMLDesc(self, flags: int = 0) -> str:
        self.calls.append(("XMLDesc", flags))
        if flags & libvirt.VIR_DOMAIN_XML_INACTIVE:
            return PINNED_XML.replace("<name>vm1</name>", "<name>vm1</name>\n  <title>inactive</title>")
        return PINNED_XML


# --- the legacy move (placement None) ---------------------------------------------------------------


def test_legacy_move_sends_the_live_and_persistent_xml_unchanged() -> None:
    clock = FakeClock(0.0)
    dom = XmlDomain([job_stats(100)] * 2, "complete", clock=clock)
    outcome = runner_for(dom, cfg(), clock=clock).run("vm1", TARGET, None, make_request())
    assert outcome.status == "completed"
    assert dom.migrate_args is not None
    _uri, params, _flags = dom.migrate_args
    live, persistent = params[libvirt.VIR_MIGRATE_PARAM_DEST_XML], params[libvirt.VIR_MIGRATE_PARAM_PERSIST_XML]
    assert live == PINNED_XML
    assert "<title>inactive</title>" in persistent
    for xml in (live, persistent):
        assert parse_domain(xml).vcpu_pins == {0: frozenset({3})}  # the pinning copied as it is


def test_legacy_move_of_a_transient_domain_persists_its_live_xml() -> None:
    class Transient(XmlDomain):
        def isPersistent(self) -> bool:
            return False

    clock = FakeClock(0.0)
    dom = Transient([job_stats(100)], "complete", clock=clock)
    assert runner_for(dom, cfg(), clock=clock).run("vm1", TARGET, None, make_request()).status == "completed"
    assert dom.migrate_args is not None
    params = dom.migrate_args[1]
    assert params[libvirt.VIR_MIGRATE_PARAM_PERSIST_XML] == params[libvirt.VIR_MIGRATE_PARAM_DEST_XML] == PINNED_XML
