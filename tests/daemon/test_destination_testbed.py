"""The daemons on the real-libvirt testbed: one `compute-agent daemon` per testbed host (each on its own
libvirtd, all on the machine's RabbitMQ with a prefix of the test's own), driven only through the bus:
describe, dry-run fit, claim and release on the destination, then a NUMA-aware live migration A -> B
with B's pinning, after which B's claim is confirmed and the guest runs there with the claimed pins.
"""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import pytest

from agent.testing import testbed as tb
from tests.daemon.agent_support import EventLog, NotifySocket, claim_json, make_agent_files, spawn_daemon

_ok, _why = tb.testbed_available()
pytestmark = [
    pytest.mark.testbed,
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not _ok, reason=f"testbed not available: {_why}"),
]
pytest_plugins = ["tests.daemon.agent_fixtures"]

libvirt = pytest.importorskip("libvirt")

from agent.bus.errors import RemoteNoFit  # noqa: E402
from agent.bus.keys import Keyring  # noqa: E402
from agent.bus.rpc import RpcClient  # noqa: E402
from agent.libvirt_ops.domain_xml import parse_domain  # noqa: E402
from agent.libvirt_ops.instance_metadata import InstanceMetadata, store_instance_metadata  # noqa: E402

GUEST_UUID = "5a0f3c6e-0b1d-4e0a-9a51-0000000000d1"
EXTRA_SPECS = {"hw:cpu_policy": "dedicated"}


@pytest.fixture
def hosts():
    h1, h2 = tb.ensure_testbed(2)
    for h in (h1, h2):
        tb.destroy_all(h)
    yield h1, h2
    for h in (h1, h2):
        tb.destroy_all(h)


class Daemons:
    """A `compute-agent daemon` per testbed host; `kill(i)` SIGKILLs one, `start(i)` (re)starts it."""

    def __init__(self, tmp_path: Path, hosts) -> None:
        prefix = f"test-{uuid.uuid4().hex[:12]}"
        self.tmp_path = tmp_path
        self.files = [
            make_agent_files(
                tmp_path,
                host=h.name,
                prefix=prefix,
                sysfs_root=Path("/sys"),
                extra={"DEFAULT": {"my_ip": h.address}, "libvirt": {"connection_uri": h.uri}},
            )
            for h in hosts
        ]
        self.procs: list = [None] * len(hosts)

    def start(self, i: int) -> None:
        notify = NotifySocket(self.tmp_path / f"notify-{i}-{uuid.uuid4().hex[:6]}")
        self.procs[i] = (spawn_daemon(self.files[i], notify), notify)
        notify.wait_for("READY", 60)

    def kill(self, i: int) -> None:
        proc, notify = self.procs[i]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        notify.close()
        self.procs[i] = None

    def stop_all(self) -> None:
        for running in filter(None, self.procs):
            proc, notify = running
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=15)
            notify.close()
            assert proc.returncode == 0, err.decode()[-3000:]


@pytest.fixture
def daemons(broker, tmp_path, hosts):
    """A daemon per testbed host, READY; stopped with SIGTERM after the test (each must exit 0)."""
    running = Daemons(tmp_path, hosts)
    for i in range(len(hosts)):
        running.start(i)
    yield running
    running.stop_all()


def start_guest(host) -> tuple[str, dict]:
    """The pinned test guest on `host` with its flavor recorded; (its name, its instance request)."""
    name = tb.define_and_start(host, tb.guest_xml("dm1", vcpus=1, memory_mib=256, uuid=GUEST_UUID))
    tb.wait_guest_ready(host, name)
    with host.connect() as conn:
        store_instance_metadata(conn, name, InstanceMetadata(EXTRA_SPECS, {}))
    return name, {"uuid": GUEST_UUID, "vcpus": 1, "memory_mb": 256, "extra_specs": EXTRA_SPECS, "image_properties": {}}


def migrate_body(mid: str, name: str, dest, placement: dict) -> dict:
    return {
        "migration_id": mid,
        "instance": name,
        "destination": {"host": dest.name, "libvirt_uri": dest.uri, "migration_uri": dest.migration_uri},
        "placement": placement,
        "claim_host": dest.name,
    }


def test_describe_fit_claim_and_a_numa_aware_move_through_the_daemons(hosts, daemons):
    h1, h2 = hosts
    a, b = daemons.files
    name, request = start_guest(h1)
    events = EventLog(a, "migration.#", "claim.#")
    keyring = Keyring.from_file(a.key_file)
    try:
        with RpcClient(a.config().bus, keyring, sender="orchestrator@testbed") as client:
            described = client.call(h2.name, "describe_host", {})
            assert described["host"] == h2.name and described["libvirt_uri"] == h2.uri
            assert described["migration_uri"] == h2.migration_uri
            assert client.call(h2.name, "fit", {"instance": request})["fits"] is True
            with pytest.raises(RemoteNoFit):
                client.call(h2.name, "fit", {"instance": {**request, "vcpus": 64}})

            spare = {"migration_id": "tb-spare", "instance": {**request, "uuid": str(uuid.uuid4())}, "source_host": "x"}
            client.call(h2.name, "claim", spare)
            released = client.call(h2.name, "release_claim", {"migration_id": "tb-spare", "reason": "not needed"})
            assert released["state"] == "released"

            mid = f"tb-move-{uuid.uuid4().hex[:6]}"
            claim = client.call(h2.name, "claim", {"migration_id": mid, "instance": request, "source_host": h1.name})
            # 1.1: the NUMA-aware move (1.0's live_migrate has no placement)
            accepted = client.call(
                h1.name, "live_migrate", migrate_body(mid, name, h2, claim["placement"]), version="1.1"
            )
            assert accepted == {"migration_id": mid, "accepted": True}
            done = wait_done(events, mid, timeout=180)
            assert done["status"] == "completed", done
            assert wait_confirmed(b, mid, timeout=30)
    finally:
        events.close()
    assert_runs_with_pins(h2, claim["placement"])


def test_sigkill_of_the_destination_mid_migration_keeps_its_claim_once(hosts, daemons):
    """The destination agent dies right after the move started; restarted, it has the claim (never
    lost, never doubled) and it ends confirmed: by the source's confirm or by the destination itself."""
    h1, h2 = hosts
    a, b = daemons.files
    name, request = start_guest(h1)
    with RpcClient(a.config().bus, Keyring.from_file(a.key_file), sender="orchestrator@testbed") as client:
        mid = f"tb-kill-{uuid.uuid4().hex[:6]}"
        claim = client.call(h2.name, "claim", {"migration_id": mid, "instance": request, "source_host": h1.name})
        client.call(h1.name, "live_migrate", migrate_body(mid, name, h2, claim["placement"]), version="1.1")
        daemons.kill(1)
        (kept,) = [c for c in claim_json(b) if c["migration_id"] == mid]
        assert kept["state"] in ("held", "migrating", "confirmed")
        daemons.start(1)
        assert wait_confirmed(b, mid, timeout=120)
    assert [c["state"] for c in claim_json(b) if c["migration_id"] == mid] == ["confirmed"]
    assert_runs_with_pins(h2, claim["placement"])


def assert_runs_with_pins(host, placement: dict) -> None:
    pins = placement["cells"][0]["cpu_pins"]["0"]
    with host.connect() as conn:
        dom = conn.lookupByUUIDString(GUEST_UUID)
        assert dom.isActive()
        arrived = parse_domain(dom.XMLDesc(0))
    assert sorted(arrived.vcpu_pins[0]) == pins


def wait_done(events: EventLog, mid: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    percents = []
    while (left := deadline - time.monotonic()) > 0:
        key, body = events.next(timeout=left, key_prefix=f"migration.{mid}.")
        if key.endswith(".progress"):
            percents.append(body["percent"])
        if key.endswith(".done"):
            assert percents == sorted(percents), percents  # a percent that never goes down
            return body
    raise AssertionError(f"no migration.{mid}.done in {timeout} s")


def wait_confirmed(files, mid: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(c["migration_id"] == mid and c["state"] == "confirmed" for c in claim_json(files)):
            return True
        time.sleep(0.5)
    return False
