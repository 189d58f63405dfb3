"""Two real daemons on the libvirt testbed (one per testbed host, each on its own libvirtd, both on the
machine's RabbitMQ under a prefix of the test's own), driven only through the bus client, as an
orchestrator would: describe, dry-run fit, claim/release, a NUMA-aware live migration A -> B with B's
pinning, abort, force-complete refused in post-copy, progress events in order with a percent that
never goes down, and the source agent SIGKILLed mid-migration and restarted.

The daemons run as processes (`python -m agent.cli daemon --config ...`, the real /sys: the testbed
hosts share this machine's CPUs). Guests are the testbed's TCG guests (agent.testing.testbed); the
non-converging one (HOT_GUEST) over the capped link (HOT_MIGRATION) keeps a migration running for as
long as a scenario needs.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from agent.testing import testbed as tb

_ok, _why = tb.testbed_available()
pytestmark = [
    pytest.mark.testbed,
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not _ok, reason=f"testbed not available: {_why}"),
]

libvirt = pytest.importorskip("libvirt")

from agent.bus.errors import CallTimeout, RemoteError, RemoteRefused  # noqa: E402
from agent.bus.events import EventSubscriber  # noqa: E402
from agent.bus.keys import Keyring  # noqa: E402
from agent.bus.rpc import RpcClient  # noqa: E402
from agent.config import load_config  # noqa: E402
from agent.libvirt_ops.domain_read import parse_domain  # noqa: E402
from agent.libvirt_ops.instance_metadata import InstanceMetadata, store_instance_metadata  # noqa: E402
from tests.bus.conftest import SECRET_A, ensure_broker  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
READY_S = 60.0  # a daemon answers describe_host within this after its start (2 shared cores)
DONE_S = 240.0  # a scenario's migration ends within this


@dataclass
class Agent:
    host: tb.TestbedHost
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the process owns it
        argv = [sys.executable, "-m", "agent.cli", "daemon", "--config", str(self.config_path)]
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(20)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Fleet:
    a: Agent
    b: Agent
    client: RpcClient
    events: queue.Queue[tuple[str, dict[str, Any]]]

    def call(self, agent: Agent, method: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return self.client.call(agent.host.name, method, body, **kw)

    def wait_ready(self, agent: Agent) -> None:
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            assert agent.proc is not None and agent.proc.poll() is None, agent.log_text()[-3000:]
            try:
                self.call(agent, "describe_host", {}, timeout=3.0)
                return
            except (CallTimeout, RemoteError):
                time.sleep(0.5)
        raise AssertionError(f"{agent.host.name} not serving after {READY_S} s:\n{agent.log_text()[-3000:]}")

    def events_of(self, mid: str, until_done: bool = True, timeout: float = DONE_S) -> list[tuple[str, dict]]:
        """This migration's events in arrival order, up to its `.done` (others are put back)."""
        got: list[tuple[str, dict]] = []
        others: list[tuple[str, dict]] = []
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                try:
                    key, body = self.events.get(timeout=1.0)
                except queue.Empty:
                    continue
                if not key.startswith(f"migration.{mid}."):
                    others.append((key, body))
                    continue
                got.append((key, body))
                if key.endswith(".done") or not until_done:
                    return got
        finally:
            for item in others:
                self.events.put(item)
        raise AssertionError(f"no done event for {mid} in {timeout} s; got {[k for k, _ in got]}")

    def first_progress(self, mid: str) -> dict[str, Any]:
        key, body = self.events_of(mid, until_done=False, timeout=60)[0]
        assert key.endswith(".progress"), key
        return body

    def transferring(self, mid: str) -> list[dict[str, Any]]:
        """Progress events up to the first one showing memory on the wire: QEMU takes post-copy
        requests only once its migration runs (libvirt's job starts earlier, with the destination's
        preparation)."""
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["percent"] <= 0:
            seen.append(self.first_progress(mid))
        return seen


def write_config(path: Path, host: tb.TestbedHost, prefix: str, key_file: Path, state_dir: Path) -> None:
    migration = {k: str(v) for k, v in tb.HOT_MIGRATION.items()}
    sections = {
        "DEFAULT": {"host": host.name, "my_ip": host.address, "log_level": "INFO"},
        "libvirt": {"connection_uri": host.uri, **migration},
        "claims": {"state_dir": str(state_dir)},
        "bus": {
            "exchange_prefix": prefix,
            "key_file": str(key_file),
            "call_timeout_s": "15",
            "progress_interval_s": "0.5",
        },
    }
    path.write_text("".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in o.items()) for s, o in sections.items()))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    ensure_broker()
    h1, h2 = tb.ensure_testbed(2)
    for h in (h1, h2):
        tb.destroy_all(h)
    base = tmp_path_factory.mktemp("e2e")
    key_file = base / "bus.keys"
    key_file.write_text(f"k1 {SECRET_A.hex()}\n")
    prefix = f"test-e2e-{uuidlib.uuid4().hex[:8]}"
    agents = []
    for h in (h1, h2):
        path = base / f"{h.name}.conf"
        write_config(path, h, prefix, key_file, base / h.name / "state")
        agents.append(Agent(h, path, base / f"{h.name}.log"))
    cfg = load_config(agents[0].config_path).bus
    events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
    subscriber = EventSubscriber(cfg, Keyring.from_file(key_file), name="e2e")
    subscriber.subscribe("migration.#", lambda key, body: events.put((key, body)))
    subscriber.start()
    client = RpcClient(cfg, Keyring.from_file(key_file), sender="orchestrator@e2e")
    fleet = Fleet(agents[0], agents[1], client, events)
    try:
        for agent in agents:
            agent.start()
        for agent in agents:
            fleet.wait_ready(agent)
        yield fleet
    finally:
        for agent in agents:
            if agent.proc is not None and agent.proc.poll() is None:
                agent.kill(signal.SIGTERM)
        client.close()
        subscriber.stop()
        for h in (h1, h2):
            tb.destroy_all(h)


# --- helpers ------------------------------------------------------------------------------------------


def start_guest(host: tb.TestbedHost, name: str, specs: dict[str, str], *, hot: bool = False) -> str:
    uuid = str(uuidlib.uuid4())
    dirt = {k: v for k, v in tb.HOT_GUEST.items() if k != "memory_mib"} if hot else {}
    tb.define_and_start(host, tb.guest_xml(name, vcpus=1, memory_mib=256, uuid=uuid, vcpu_pins={0: [0]}, **dirt))
    tb.wait_guest_ready(host, name, timeout=90)
    conn = host.connect()
    try:
        store_instance_metadata(conn, name, InstanceMetadata(specs))
    finally:
        conn.close()
    return uuid


def request_of(fleet: Fleet, name: str) -> dict[str, Any]:
    described = fleet.call(fleet.a, "describe_instance", {"instance": name})
    keys = ("uuid", "vcpus", "memory_mb", "extra_specs", "image_properties")
    return {k: described[k] for k in keys}


def claim(fleet: Fleet, mid: str, request: dict[str, Any]) -> dict[str, Any]:
    return fleet.call(fleet.b, "claim", {"migration_id": mid, "instance": request, "source_host": fleet.a.host.name})


def migrate(fleet: Fleet, mid: str, name: str, placement: dict[str, Any]) -> None:
    b = fleet.b.host
    body = {
        "migration_id": mid,
        "instance": name,
        "destination": {"host": b.name, "libvirt_uri": b.uri, "migration_uri": b.migration_uri},
        "placement": placement,
        "claim_host": b.name,
    }
    assert fleet.call(fleet.a, "live_migrate", body, version="1.1") == {"migration_id": mid, "accepted": True}


def domain_state(host: tb.TestbedHost, uuid: str) -> tuple[bool, str] | None:
    """(active, live XML) of the domain on `host`, None when it is not there."""
    conn = host.connect()
    try:
        dom = conn.lookupByUUIDString(uuid)
        return bool(dom.isActive()), dom.XMLDesc(0)
    except libvirt.libvirtError:
        return None
    finally:
        conn.close()


def assert_in_order(events: list[tuple[str, dict]]) -> None:
    percents = [b["percent"] for k, b in events if k.endswith(".progress")]
    assert percents, "no progress event"
    assert percents == sorted(percents), f"percent went down: {percents}"
    assert events[-1][0].endswith(".done")


# --- scenarios ----------------------------------------------------------------------------------------


def test_describe_fit_claim_release(fleet: Fleet) -> None:
    uuid = start_guest(fleet.a.host, "e2e-desc", {"hw:cpu_policy": "dedicated"})
    request = request_of(fleet, "e2e-desc")
    assert request["uuid"] == uuid and request["extra_specs"] == {"hw:cpu_policy": "dedicated"}
    fitted = fleet.call(fleet.b, "fit", {"instance": request})
    assert fitted["fits"] is True
    mid = f"e2e-claim-{uuid[:8]}"
    held = claim(fleet, mid, request)
    assert held["placement"]["cells"][0]["cpu_pins"]
    released = fleet.call(fleet.b, "release_claim", {"migration_id": mid, "reason": "dry run over"})
    assert released["state"] == "released"
    tb.destroy_domain(fleet.a.host, "e2e-desc")


def test_numa_aware_migration_lands_with_the_destinations_pinning(fleet: Fleet) -> None:
    uuid = start_guest(fleet.a.host, "e2e-move", {"hw:cpu_policy": "dedicated"})
    request = request_of(fleet, "e2e-move")
    mid = f"e2e-move-{uuid[:8]}"
    placement = claim(fleet, mid, request)["placement"]
    migrate(fleet, mid, "e2e-move", placement)
    events = fleet.events_of(mid)
    assert_in_order(events)
    done = events[-1][1]
    assert (done["status"], done["host_now"]) == ("completed", fleet.b.host.name), done
    there = domain_state(fleet.b.host, uuid)
    assert there is not None and there[0], "not running on the destination"
    pins = {v: frozenset(c) for v, c in parse_domain(there[1]).vcpu_pins.items()}
    assert pins == {0: frozenset(placement["cells"][0]["cpu_pins"]["0"])}
    assert domain_state(fleet.a.host, uuid) is None
    state = fleet.call(fleet.a, "migration_status", {"migration_id": mid})
    assert (state["status"], state["percent"]) == ("completed", 100.0)
    assert fleet.call(fleet.b, "confirm_claim", {"migration_id": mid})["state"] == "confirmed"
    tb.destroy_domain(fleet.b.host, "e2e-move")


def test_abort_leaves_the_guest_on_the_source_and_releases_the_claim(fleet: Fleet) -> None:
    uuid = start_guest(fleet.a.host, "e2e-abort", {"hw:cpu_policy": "dedicated"}, hot=True)
    request = request_of(fleet, "e2e-abort")
    mid = f"e2e-abort-{uuid[:8]}"
    migrate(fleet, mid, "e2e-abort", claim(fleet, mid, request)["placement"])
    fleet.first_progress(mid)
    fleet.call(fleet.a, "abort_migration", {"migration_id": mid})
    events = fleet.events_of(mid)
    done = events[-1][1]
    assert (done["status"], done["host_now"]) == ("aborted", fleet.a.host.name), done
    here = domain_state(fleet.a.host, uuid)
    assert here is not None and here[0]
    assert domain_state(fleet.b.host, uuid) is None
    assert fleet.call(fleet.b, "release_claim", {"migration_id": mid})["state"] == "released"
    tb.destroy_domain(fleet.a.host, "e2e-abort")


def test_force_complete_switches_to_post_copy_then_both_controls_are_refused(fleet: Fleet) -> None:
    specs = {"hw:cpu_policy": "dedicated", "compute:live_migration_post_copy": "true"}
    uuid = start_guest(fleet.a.host, "e2e-pc", specs, hot=True)
    request = request_of(fleet, "e2e-pc")
    mid = f"e2e-pc-{uuid[:8]}"
    migrate(fleet, mid, "e2e-pc", claim(fleet, mid, request)["placement"])
    seen = [("migration.x.progress", body) for body in fleet.transferring(mid)]
    fleet.call(fleet.a, "force_complete", {"migration_id": mid})
    refused = 0
    deadline = time.monotonic() + 60
    while refused < 2 and time.monotonic() < deadline:
        try:
            fleet.call(fleet.a, "force_complete", {"migration_id": mid})
        except RemoteRefused:
            refused += 1
            with pytest.raises(RemoteRefused):
                fleet.call(fleet.a, "abort_migration", {"migration_id": mid})
            refused += 1
        time.sleep(0.2)
    events = seen + fleet.events_of(mid)
    assert_in_order(events)
    done = events[-1][1]
    assert done["status"] == "completed" and done["policy"]["post_copy"] is True, done
    assert refused == 2 or any(b.get("phase") == "postcopy" for _, b in events)
    tb.destroy_domain(fleet.b.host, "e2e-pc")


def test_source_sigkilled_mid_migration_takes_the_job_up_again(fleet: Fleet) -> None:
    specs = {"hw:cpu_policy": "dedicated", "compute:live_migration_post_copy": "true"}
    uuid = start_guest(fleet.a.host, "e2e-kill", specs, hot=True)
    request = request_of(fleet, "e2e-kill")
    mid = f"e2e-kill-{uuid[:8]}"
    migrate(fleet, mid, "e2e-kill", claim(fleet, mid, request)["placement"])
    before = fleet.transferring(mid)[-1]
    fleet.a.kill(signal.SIGKILL)
    conn = fleet.a.host.connect()
    try:
        stats = conn.lookupByUUIDString(uuid).jobStats(0)
    finally:
        conn.close()
    assert stats.get("type") in (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED), stats
    killed_at = fleet.a.log_path.stat().st_size
    fleet.a.start()
    fleet.wait_ready(fleet.a)
    deadline = time.monotonic() + 60
    while "following it again" not in fleet.a.log_text()[killed_at:] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "following it again" in fleet.a.log_text()[killed_at:], fleet.a.log_text()[killed_at:][-3000:]
    after = fleet.events_of(mid, until_done=False, timeout=60)
    assert after[0][0].endswith(".progress") and after[0][1]["percent"] >= before["percent"]
    fleet.call(fleet.a, "force_complete", {"migration_id": mid})
    events = after + fleet.events_of(mid)
    assert_in_order([("migration.x.progress", before), *events])
    done = events[-1][1]
    assert (done["status"], done["host_now"]) == ("completed", fleet.b.host.name), done
    assert fleet.call(fleet.b, "confirm_claim", {"migration_id": mid})["state"] == "confirmed"
    state = fleet.call(fleet.a, "migration_status", {"migration_id": mid})
    assert state["status"] == "completed"
    print(json.dumps({"before_kill_percent": before["percent"], "events_after_restart": len(events)}))
    tb.destroy_domain(fleet.b.host, "e2e-kill")


def test_a_migration_that_completes_while_the_source_is_down_is_confirmed_after_its_restart(fleet: Fleet) -> None:
    uuid = start_guest(fleet.a.host, "e2e-down", {"hw:cpu_policy": "dedicated"})
    request = request_of(fleet, "e2e-down")
    mid = f"e2e-down-{uuid[:8]}"
    migrate(fleet, mid, "e2e-down", claim(fleet, mid, request)["placement"])
    fleet.transferring(mid)
    fleet.a.kill(signal.SIGKILL)
    deadline = time.monotonic() + DONE_S
    while domain_state(fleet.a.host, uuid) is not None and time.monotonic() < deadline:
        time.sleep(0.5)  # libvirt finishes the job without the agent
    there = domain_state(fleet.b.host, uuid)
    assert there is not None and there[0], "the job did not complete on its own"
    fleet.a.start()
    fleet.wait_ready(fleet.a)
    events = fleet.events_of(mid)
    done = events[-1][1]
    assert (done["status"], done["host_now"]) == ("completed", fleet.b.host.name), done
    assert fleet.call(fleet.b, "confirm_claim", {"migration_id": mid})["state"] == "confirmed"
    assert fleet.call(fleet.a, "migration_status", {"migration_id": mid})["status"] == "completed"
    tb.destroy_domain(fleet.b.host, "e2e-down")
