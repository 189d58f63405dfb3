import libvirt
import pytest

from agent.libvirt_ops.inventory import IncompleteInventory, read_domains
from agent.testing.fake_libvirt import FakeConn, FakeDomain, FakeError

GOOD = """<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>256</memory>
<vcpu>1</vcpu><cputune><vcpupin vcpu='0' cpuset='1'/></cputune><os><type>hvm</type></os></domain>"""


def domain(name, uuid, active=True, xml=None, error=None):
    """A domain as the inventory reads it: GOOD XML for its name and UUID unless `xml` is given."""
    xml = GOOD.format(name=name, uuid=uuid) if xml is None else xml
    return FakeDomain(name=name, uuid=uuid, active=active, xml=xml, xml_error=error)


U1 = "11111111-1111-1111-1111-111111111111"
U2 = "22222222-2222-2222-2222-222222222222"
U3 = "33333333-3333-3333-3333-333333333333"


def test_reads_running_and_defined_domains():
    inv = read_domains(FakeConn(domain("a", U1), domain("b", U2, active=False)))
    assert [d.name for d in inv.domains] == ["a", "b"]
    assert inv.active_uuids == {U1}
    assert inv.domains[0].vcpu_pins == {0: frozenset({1})}
    assert inv.require_complete() is inv


def test_vanished_domain_is_skipped_and_broken_one_reported():
    inv = read_domains(
        FakeConn(
            domain("gone", U1, error=FakeError("boom", libvirt.VIR_ERR_NO_DOMAIN)),
            domain("broken", U2, xml="<domain><name>broken"),
            domain("ok", U3),
        )
    )
    assert [d.name for d in inv.domains] == ["ok"]
    assert len(inv.unreadable) == 1 and inv.unreadable[0].startswith("broken:")
    with pytest.raises(IncompleteInventory, match="broken"):
        inv.require_complete()


def test_libvirt_test_driver():
    conn = libvirt.open("test:///default")
    try:
        inv = read_domains(conn)
    finally:
        conn.close()
    assert [d.name for d in inv.domains] == ["test"]
    assert len(inv.active_uuids) == 1


# --- one bad domain never breaks the host's inventory ---------------------------------------------

DEEP = """<domain type='qemu'><name>deep</name><uuid>{uuid}</uuid><memory>1048576</memory><vcpu>1</vcpu>
<metadata><p:placement xmlns:p='https://compute-agent.dev/xmlns/placement/1'>{json}</p:placement></metadata>
<os><type>hvm</type></os></domain>"""


def test_deeply_nested_metadata_json_is_reported_not_raised():
    deep = DEEP.format(uuid=U2, json="[" * 100000 + "]" * 100000)
    inv = read_domains(FakeConn(domain("deep", U2, xml=deep), domain("ok", U3)))
    assert [d.name for d in inv.domains] == ["ok"]
    assert len(inv.unreadable) == 1 and inv.unreadable[0].startswith("deep:")


def test_any_parse_failure_is_reported_not_raised(monkeypatch):
    from agent.errors import InvalidInput
    from agent.libvirt_ops import inventory

    real = inventory.parse_domain

    def flaky(xml):
        if "<name>agent-err</name>" in xml:
            raise InvalidInput("not for us")
        if "<name>bug</name>" in xml:
            raise RuntimeError("a bug in the parser")
        return real(xml)

    monkeypatch.setattr(inventory, "parse_domain", flaky)
    inv = read_domains(FakeConn(domain("agent-err", U1), domain("bug", U2), domain("ok", U3)))
    assert [d.name for d in inv.domains] == ["ok"]
    assert [u.split(":")[0] for u in inv.unreadable] == ["agent-err", "bug"]
    assert "RuntimeError" in inv.unreadable[1]


class BrokenDom(FakeDomain):
    """Every call fails with a libvirt error other than 'no domain' (a flaky connection)."""

    def name(self):
        raise FakeError("name failed", libvirt.VIR_ERR_INTERNAL_ERROR)

    def UUIDString(self):
        raise FakeError("uuid failed", libvirt.VIR_ERR_INTERNAL_ERROR)


def test_error_while_naming_a_failed_domain_does_not_escape():
    inv = read_domains(FakeConn(BrokenDom(name="x", uuid=U1), domain("ok", U3)))
    assert [d.name for d in inv.domains] == ["ok"]
    assert inv.unreadable == ("?: name failed",)


def test_xmldesc_failure_names_the_domain():
    dom = domain("flaky", U1, error=FakeError("xml failed", libvirt.VIR_ERR_INTERNAL_ERROR))
    inv = read_domains(FakeConn(dom))
    assert inv.unreadable == ("flaky: xml failed",)


def test_libvirt_test_driver_with_a_hostile_domain():
    conn = libvirt.open("test:///default")  # private to this connection
    try:
        conn.defineXML(DEEP.format(uuid=U2, json="[" * 100000 + "]" * 100000).replace("type='qemu'", "type='test'"))
        inv = read_domains(conn)
    finally:
        conn.close()
    assert [d.name for d in inv.domains] == ["test"]
    assert len(inv.unreadable) == 1 and inv.unreadable[0].startswith("deep:")
