import libvirt
import pytest

from agent.libvirt_ops.inventory import IncompleteInventory, read_domains

GOOD = """<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>256</memory>
<vcpu>1</vcpu><cputune><vcpupin vcpu='0' cpuset='1'/></cputune><os><type>hvm</type></os></domain>"""


class FakeError(libvirt.libvirtError):
    def __init__(self, code, msg="boom"):
        Exception.__init__(self, msg)
        self._code, self._msg = code, msg

    def get_error_code(self):
        return self._code

    def get_error_message(self):
        return self._msg


class FakeDom:
    def __init__(self, name, uuid, active=True, xml=None, error=None):
        self._name, self._uuid, self._active, self._xml, self._error = name, uuid, active, xml, error

    def name(self):
        return self._name

    def UUIDString(self):
        return self._uuid

    def isActive(self):
        return self._active

    def XMLDesc(self, flags):
        if self._error:
            raise self._error
        return self._xml if self._xml is not None else GOOD.format(name=self._name, uuid=self._uuid)


class FakeConn:
    def __init__(self, doms):
        self.doms = doms

    def listAllDomains(self, flags):
        return self.doms


U1 = "11111111-1111-1111-1111-111111111111"
U2 = "22222222-2222-2222-2222-222222222222"
U3 = "33333333-3333-3333-3333-333333333333"


def test_reads_running_and_defined_domains():
    inv = read_domains(FakeConn([FakeDom("a", U1), FakeDom("b", U2, active=False)]))
    assert [d.name for d in inv.domains] == ["a", "b"]
    assert inv.active_uuids == {U1}
    assert inv.domains[0].vcpu_pins == {0: frozenset({1})}
    assert inv.require_complete() is inv


def test_vanished_domain_is_skipped_and_broken_one_reported():
    inv = read_domains(
        FakeConn(
            [
                FakeDom("gone", U1, error=FakeError(libvirt.VIR_ERR_NO_DOMAIN)),
                FakeDom("broken", U2, xml="<domain><name>broken"),
                FakeDom("ok", U3),
            ]
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
