"""Migration policy: auto-converge / post-copy decision, libvirt flags and params, traits."""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys

import pytest

from agent.config import LibvirtConfig
from agent.errors import InvalidRequest
from agent.libvirt_ops import policy as pol
from agent.libvirt_ops.errors import LibvirtConnectionError, LibvirtOpError
from agent.libvirt_ops.host import host_traits
from agent.libvirt_ops.policy import (
    MigrationPolicy,
    PolicyConflict,
    decide_policy,
    migration_flags,
    migration_params,
    traits_for_versions,
)
from agent.numa.request import MigrationWishes
from agent.testing.fake_libvirt import FakeConn

AC_KEY = "compute:live_migration_auto_converge"
PC_KEY = "compute_live_migration_post_copy"  # an image property, to see the key carried through


def wishes(ac: bool | None, pc: bool | None) -> MigrationWishes:
    return MigrationWishes(
        auto_converge=ac,
        post_copy=pc,
        auto_converge_key=AC_KEY if ac is not None else None,
        post_copy_key=PC_KEY if pc is not None else None,
    )


def cfg(ac: bool, pc: bool, **kw) -> LibvirtConfig:
    return LibvirtConfig(live_migration_permit_auto_converge=ac, live_migration_permit_post_copy=pc, **kw)


# --- the truth table ------------------------------------------------------------------------------


def oracle(m_ac, m_pc, h_ac, h_pc, paused):
    """The rules of the issue, written independently as a case analysis. None = error."""
    if m_ac is True and m_pc is True:
        return None
    # what each feature's own source says
    own_ac = m_ac if m_ac is not None else h_ac
    own_pc = m_pc if m_pc is not None else h_pc
    if m_ac is True:
        chosen = "ac"
    elif m_pc is True:
        chosen = "pc"
    elif own_ac and own_pc:
        chosen = "pc"  # both only from host config: post-copy armed
    elif own_pc:
        chosen = "pc"
    elif own_ac:
        chosen = "ac"
    else:
        chosen = None
    if chosen == "pc" and paused:
        # never post-copy for a paused VM; auto-converge only if its own sources ask for it
        return (bool(own_ac), False)
    return (chosen == "ac", chosen == "pc")


TRI = (None, True, False)
TABLE = list(itertools.product(TRI, TRI, (False, True), (False, True), (False, True)))


@pytest.mark.parametrize("m_ac,m_pc,h_ac,h_pc,paused", TABLE)
def test_truth_table(m_ac, m_pc, h_ac, h_pc, paused) -> None:
    expected = oracle(m_ac, m_pc, h_ac, h_pc, paused)
    if expected is None:
        with pytest.raises(PolicyConflict) as exc:
            decide_policy(wishes(m_ac, m_pc), cfg(h_ac, h_pc), domain_paused=paused)
        assert isinstance(exc.value, InvalidRequest)
        assert exc.value.keys == (AC_KEY, PC_KEY)
        assert AC_KEY in str(exc.value) and PC_KEY in str(exc.value)
        return
    p = decide_policy(wishes(m_ac, m_pc), cfg(h_ac, h_pc), domain_paused=paused)
    assert (p.auto_converge, p.post_copy) == expected

    # the rules, as properties of every row
    assert not (p.auto_converge and p.post_copy)
    if paused:
        assert not p.post_copy
    if m_ac is False:
        assert not p.auto_converge and "compute:live_migration_auto_converge=false" in p.reason
    if m_pc is False:
        assert not p.post_copy and f"{PC_KEY}=false" in p.reason
    if m_ac is True:  # metadata on beats host config off; the other feature is not used
        assert p.auto_converge and not p.post_copy
    if m_pc is True:
        assert p.post_copy == (not paused)
        if not paused:
            assert not p.auto_converge and f"{PC_KEY}=true" in p.reason
    if m_ac is None and m_pc is None and not paused:
        assert (p.auto_converge, p.post_copy) == {
            (False, False): (False, False),
            (True, False): (True, False),
            (False, True): (False, True),
            (True, True): (False, True),
        }[(h_ac, h_pc)]
        if h_ac or h_pc:
            assert "[libvirt] live_migration_permit_" in p.reason
    assert isinstance(p.reason, str) and "auto-converge" in p.reason and "post-copy" in p.reason


@pytest.mark.parametrize(
    "m_ac,m_pc,h_ac,h_pc,paused,expected",
    [
        # hand-checked rows, to keep the oracle honest
        (None, None, True, True, False, (False, True)),  # host permits both -> post-copy
        (None, None, True, True, True, (True, False)),  # ... paused: no post-copy, config asks AC
        (None, None, False, True, True, (False, False)),  # paused, only post-copy permitted
        (True, None, False, True, False, (True, False)),  # metadata AC on overrides host; PC dropped
        (None, True, True, False, False, (False, True)),  # metadata PC on where host does not permit
        (None, True, False, False, True, (False, False)),  # ... but never for a paused VM
        (False, None, True, True, False, (False, True)),  # metadata disables AC the host permits
        (None, False, True, True, False, (True, False)),  # metadata disables PC -> config AC
        (False, False, True, True, False, (False, False)),
        (True, False, False, False, True, (True, False)),  # paused VM may still auto-converge
    ],
)
def test_truth_table_hand_rows(m_ac, m_pc, h_ac, h_pc, paused, expected) -> None:
    p = decide_policy(wishes(m_ac, m_pc), cfg(h_ac, h_pc), domain_paused=paused)
    assert (p.auto_converge, p.post_copy) == expected
    assert oracle(m_ac, m_pc, h_ac, h_pc, paused) == expected


def test_conflict_without_key_names_uses_flavor_keys() -> None:
    with pytest.raises(PolicyConflict) as exc:
        decide_policy(MigrationWishes(True, True), cfg(False, False), domain_paused=False)
    assert exc.value.keys == ("compute:live_migration_auto_converge", "compute:live_migration_post_copy")
    assert exc.value.code == "migration_policy_conflict"


def test_policy_type_refuses_both() -> None:
    with pytest.raises(ValueError):
        MigrationPolicy(True, True, "x")


def test_reason_names_the_deciding_source() -> None:
    p = decide_policy(wishes(None, None), cfg(True, True), domain_paused=False)
    assert "post-copy on ([libvirt] live_migration_permit_post_copy=true)" in p.reason
    assert "post-copy is preferred" in p.reason
    p = decide_policy(wishes(True, None), cfg(False, True), domain_paused=False)
    assert f"auto-converge on ({AC_KEY}=true)" in p.reason
    p = decide_policy(wishes(None, True), cfg(False, False), domain_paused=True)
    assert "paused" in p.reason and f"{PC_KEY}=true" in p.reason


# --- flags and params -----------------------------------------------------------------------------


def test_constants_match_libvirt_module() -> None:
    libvirt = pytest.importorskip("libvirt")
    for name, value in pol._FLAG_VALUES.items():
        assert getattr(libvirt, name) == value, name
    for name, value in pol._PARAM_NAMES.items():
        assert getattr(libvirt, name) == value, name


def test_importable_without_libvirt() -> None:
    code = (
        "import sys; sys.modules['libvirt'] = None\n"
        "from agent.libvirt_ops import policy as p\n"
        "assert p.BASE_FLAGS == 27 and p.VIR_MIGRATE_POSTCOPY == 32768 and p.VIR_MIGRATE_AUTO_CONVERGE == 8192\n"
        "assert p.PARAM_AUTO_CONVERGE_INITIAL == 'auto_converge.initial'\n"
        "assert 'libvirt' not in sys.modules or sys.modules['libvirt'] is None\n"
        "from agent.libvirt_ops import domain_xml\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_migration_flags() -> None:
    base = (
        pol.VIR_MIGRATE_LIVE
        | pol.VIR_MIGRATE_PEER2PEER
        | pol.VIR_MIGRATE_PERSIST_DEST
        | pol.VIR_MIGRATE_UNDEFINE_SOURCE
    )
    assert base == 1 | 2 | 8 | 16
    assert migration_flags(MigrationPolicy(False, False, "")) == base
    assert migration_flags(MigrationPolicy(False, True, "")) == base | 32768
    assert migration_flags(MigrationPolicy(True, False, "")) == base | 8192


def test_migration_params() -> None:
    c = cfg(
        True,
        True,
        live_migration_bandwidth_mib=0,
        live_migration_auto_converge_initial=30,
        live_migration_auto_converge_increment=15,
        live_migration_post_copy_bandwidth_mib=0,
    )
    common = {"destination_xml": "<d/>", "persistent_xml": "<p/>", "migrate_uri": "tcp://127.0.0.3"}
    kw = {"dest_xml": "<d/>", "persistent_xml": "<p/>", "migrate_uri": "tcp://127.0.0.3", "cfg": c}
    assert migration_params(MigrationPolicy(False, False, ""), **kw) == common
    assert migration_params(MigrationPolicy(True, False, ""), **kw) == {
        **common,
        "auto_converge.initial": 30,
        "auto_converge.increment": 15,
    }
    assert migration_params(MigrationPolicy(False, True, ""), **kw) == common  # unlimited post-copy bw

    c2 = cfg(False, False, live_migration_bandwidth_mib=500, live_migration_post_copy_bandwidth_mib=200)
    kw["cfg"] = c2
    assert migration_params(MigrationPolicy(False, True, ""), **kw) == {
        **common,
        "bandwidth": 500,
        "bandwidth.postcopy": 200,
    }
    assert migration_params(MigrationPolicy(False, False, ""), **kw) == {**common, "bandwidth": 500}
    out = migration_params(MigrationPolicy(True, False, ""), **kw)
    assert "bandwidth.postcopy" not in out and out["auto_converge.initial"] == 20  # LibvirtConfig default


def test_params_are_accepted_by_libvirt_python_typed_params() -> None:
    """libvirt-python converts the dict to typed params before calling the driver (a wrong value
    type raises TypeError there); the test driver then refuses the migration itself."""
    libvirt = pytest.importorskip("libvirt")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open("test:///default")
    try:
        dom = conn.lookupByName("test")
        c = cfg(False, False, live_migration_bandwidth_mib=100, live_migration_post_copy_bandwidth_mib=50)
        for p in (MigrationPolicy(True, False, ""), MigrationPolicy(False, True, "")):
            params = migration_params(
                p, dest_xml=dom.XMLDesc(), persistent_xml=dom.XMLDesc(), migrate_uri="tcp://127.0.0.9", cfg=c
            )
            with pytest.raises(libvirt.libvirtError) as exc:
                dom.migrateToURI3("test:///default", params, migration_flags(p))
            assert exc.value.get_error_code() in (
                libvirt.VIR_ERR_NO_SUPPORT,
                libvirt.VIR_ERR_OPERATION_INVALID,
                libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
                libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
            ), exc.value
    finally:
        conn.close()


# --- traits ---------------------------------------------------------------------------------------

BOTH = frozenset({"COMPUTE_MIGRATE_AUTO_CONVERGE", "COMPUTE_MIGRATE_POST_COPY"})
AC_ONLY = frozenset({"COMPUTE_MIGRATE_AUTO_CONVERGE"})


@pytest.mark.parametrize(
    "lib,qemu,expected",
    [
        (9_000_000, 7_002_000, BOTH),  # Debian 12
        (5_001_000, 2_005_000, BOTH),  # exactly the post-copy minimums (bandwidth.postcopy: 5.1.0)
        (5_000_999, 2_005_000, AC_ONLY),
        (5_001_000, 2_004_001, AC_ONLY),
        (2_000_000, 1_006_000, AC_ONLY),  # exactly the auto-converge minimums (auto_converge.*: 2.0.0)
        (1_009_999, 2_005_000, frozenset()),
        (2_000_000, 1_005_003, frozenset()),
        # issue 11 defect 9: the old minimums (the flags' "Since") are too old for the parameters
        (1_003_003, 2_005_000, frozenset()),
        (1_002_003, 1_006_000, frozenset()),
        (0, 0, frozenset()),
    ],
)
def test_traits_for_versions(lib: int, qemu: int, expected: frozenset[str]) -> None:
    assert traits_for_versions(lib, qemu) == expected


def test_traits_do_not_depend_on_config() -> None:
    # the signature has no config: a host that does not permit a feature still advertises it
    assert traits_for_versions(9_000_000, 7_002_000) == BOTH


def host_conn(lib: object, hv: object, driver: str = "QEMU", error: BaseException | None = None) -> FakeConn:
    """A connection that answers host_traits' calls: versions, driver, or `error` for each."""
    return FakeConn(uri="qemu:///fake", driver=driver, lib_version=lib, hv_version=hv, host_error=error)


def test_host_traits_fake() -> None:
    assert host_traits(host_conn(9_000_000, 7_002_022)) == BOTH
    assert host_traits(host_conn(2_000_000, 2_000_000)) == AC_ONLY


@pytest.mark.parametrize("driver", ["Test", "LXC", "Xen", "VBOX", ""])
def test_host_traits_need_a_qemu_driver(driver: str) -> None:
    # issue 11 defect 9: versions of another driver mean nothing for QEMU's migration features
    assert host_traits(host_conn(9_000_000, 9_000_000, driver=driver)) == frozenset()


def test_host_traits_wrap_libvirt_errors() -> None:
    libvirt = pytest.importorskip("libvirt")
    with pytest.raises(LibvirtConnectionError) as info:
        host_traits(host_conn(9_000_000, 7_002_000, error=libvirt.libvirtError("connection lost")))
    assert info.value.uri == "qemu:///fake" and "connection lost" in str(info.value)


def test_host_traits_refuse_nonsense_versions() -> None:
    with pytest.raises(LibvirtOpError, match="not integers"):
        host_traits(host_conn("nine", 7_002_000))


def test_feature_minimums_cover_every_flag_and_param_the_policy_passes() -> None:
    c = cfg(True, True, live_migration_post_copy_bandwidth_mib=100, live_migration_bandwidth_mib=50)
    base = migration_params(MigrationPolicy(False, False, ""), dest_xml="d", persistent_xml="p", migrate_uri="u", cfg=c)
    for feature in pol.MIGRATION_FEATURES:
        policy = MigrationPolicy(feature.name == "auto_converge", feature.name == "post_copy", "")
        params = migration_params(policy, dest_xml="d", persistent_xml="p", migrate_uri="u", cfg=c)
        names = {n for n, v in pol._PARAM_NAMES.items() if v in set(params) - set(base)}
        assert names and names <= set(feature.params), feature.name
        since = [pol.LIBVIRT_SINCE[n] for n in names] + [pol.LIBVIRT_SINCE[feature.flag]]
        assert feature.min_libvirt == max(since), feature.name
        assert migration_flags(policy) == pol.BASE_FLAGS | feature.flag_value
    assert {f.name: pol.version_tuple(f.min_libvirt) for f in pol.MIGRATION_FEATURES} == {
        "auto_converge": (2, 0, 0),
        "post_copy": (5, 1, 0),
    }


def test_host_traits_test_driver() -> None:
    libvirt = pytest.importorskip("libvirt")
    conn = libvirt.open("test:///default")
    try:
        lib, hv = conn.getLibVersion(), conn.getVersion()
        assert lib >= 9_000_000
        assert host_traits(conn) == traits_for_versions(lib, hv)
        # the test driver's "hypervisor" is version 0.0.2: no QEMU features
        assert hv < 1_000_000 and host_traits(conn) == frozenset()
    finally:
        conn.close()


def _answering(host: str, port: int = 16509) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.mark.testbed
def test_host_traits_real_testbed() -> None:
    libvirt = pytest.importorskip("libvirt")
    if not _answering("127.0.0.2"):
        pytest.skip("testbed libvirtd at qemu+tcp://127.0.0.2/system is not answering")
    try:
        conn = libvirt.open("qemu+tcp://127.0.0.2/system")
    except libvirt.libvirtError as exc:
        pytest.skip(f"testbed libvirtd not usable: {exc}")
    try:
        lib, hv = conn.getLibVersion(), conn.getVersion()
        assert pol.version_tuple(lib) >= (9, 0, 0)
        assert pol.version_tuple(hv) >= (7, 0, 0)
        assert host_traits(conn) == BOTH
    finally:
        conn.close()
