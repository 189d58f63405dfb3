"""The source role on the machine's real RabbitMQ (a prefix of its own per test): an orchestrator's
RpcClient and EventSubscriber on one side, a stand-in destination agent answering the claim calls on
the other, test:///default for the domains and a scripted runner for the migration itself (the test
driver cannot migrate)."""

from __future__ import annotations

import threading
import uuid as uuidlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import pytest

from agent.bus.errors import RemoteInvalidRequest, RemoteNotFound, RemoteRefused
from agent.bus.events import EventPublisher, EventSubscriber
from agent.bus.keys import Keyring
from agent.bus.rpc import RpcClient, RpcServer
from agent.bus.schemas import ConfirmClaimBody, MigrationDoneEvent, MigrationProgressEvent, ReleaseClaimBody
from agent.config import BusConfig
from agent.daemon.source import Source
from tests.bus.conftest import SECRET_A, ensure_broker
from tests.daemon.test_source_fakes import (
    FakeRunner,
    define_domain,
    drop_domain,
    make_harness,
    placement_for,
    progress,
    wait_for,
)


@pytest.fixture(scope="module")
def broker() -> None:
    ensure_broker()


@pytest.fixture
def bus_cfg(broker: None, tmp_path: Path) -> BusConfig:
    key_file = tmp_path / "bus.keys"
    key_file.write_text(f"k1 {SECRET_A.hex()}\n")
    return replace(
        BusConfig(),
        exchange_prefix=f"test-src-{uuidlib.uuid4().hex[:10]}",
        key_file=key_file,
        call_timeout_s=5.0,
        heartbeat_s=10,
        progress_interval_s=0.05,
    )


@dataclass
class Destination:
    """Answers confirm_claim / release_claim as a destination agent would, and remembers them."""

    calls: list[tuple[str, str]] = field(default_factory=list)

    def confirm(self, body: ConfirmClaimBody) -> dict[str, Any]:
        self.calls.append(("confirm_claim", body.migration_id))
        return {"migration_id": body.migration_id, "state": "confirmed"}

    def release(self, body: ReleaseClaimBody) -> dict[str, Any]:
        self.calls.append(("release_claim", body.migration_id))
        return {"migration_id": body.migration_id, "state": "released"}


@dataclass
class Wire:
    client: RpcClient
    source: Source
    destination: Destination
    runners: list[FakeRunner]
    events: list[tuple[str, Any]]


@pytest.fixture
def wire(bus_cfg: BusConfig, tmp_path: Path) -> Iterator[Wire]:
    keyring = Keyring.from_file(bus_cfg.key_file)
    runners: list[FakeRunner] = []
    h = make_harness(tmp_path, runners, bus=bus_cfg, progress_interval_s=0.05)
    publisher = EventPublisher(bus_cfg, keyring, sender="hv-01")
    peers = RpcClient(bus_cfg, keyring, sender="hv-01")
    ctx = replace(h.ctx, events=publisher, peers=lambda: peers)
    source = Source(ctx, runner_factory=h.runner_factory, sleep=lambda s: None)
    src_server, dst_server = RpcServer(bus_cfg, "hv-01", keyring), RpcServer(bus_cfg, "hv-02", keyring)
    source.register(src_server)
    dest = Destination()
    dst_server.register("confirm_claim", dest.confirm, since="1.1", body_type=ConfirmClaimBody)
    dst_server.register("release_claim", dest.release, since="1.1", body_type=ReleaseClaimBody)
    events: list[tuple[str, Any]] = []
    lock = threading.Lock()

    def record(key: str, body: Any) -> None:
        with lock:
            events.append((key, body))

    subscriber = EventSubscriber(bus_cfg, keyring, name="orchestrator")
    subscriber.subscribe("migration.*.progress", record, body_type=MigrationProgressEvent)
    subscriber.subscribe("migration.*.done", record, body_type=MigrationDoneEvent)
    for part in (src_server, dst_server, subscriber):
        part.start()
    source.start()
    client = RpcClient(bus_cfg, keyring, sender="orchestrator@test")
    try:
        yield Wire(client, source, dest, runners, events)
    finally:
        for stop in (client.close, subscriber.stop, src_server.stop, dst_server.stop, peers.close, publisher.close):
            stop()


@pytest.fixture
def vm() -> Iterator[tuple[str, str]]:
    name, uuid = define_domain()
    yield name, uuid
    drop_domain(name)


def body(instance: str, migration_id: str, *, placement: bool = True) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "migration_id": migration_id,
        "instance": instance,
        "destination": {
            "host": "hv-02",
            "libvirt_uri": "qemu+tcp://127.0.0.3/system",
            "migration_uri": "tcp://127.0.0.3",
        },
    }
    if placement:
        doc.update(placement=placement_for().to_json(), claim_host="hv-02")
    return doc


def test_describe_instance_over_the_bus(wire: Wire, vm: tuple[str, str]) -> None:
    result = wire.client.call("hv-01", "describe_instance", {"instance": vm[0]})
    assert result["uuid"] == vm[1] and result["state"] == "running" and result["placement"] is None
    assert set(result["policy"]) == {"auto_converge", "post_copy", "decided_by"}
    with pytest.raises(RemoteNotFound):
        wire.client.call("hv-01", "describe_instance", {"instance": "no-such-vm"})


def test_a_numa_aware_move_over_the_bus(wire: Wire, vm: tuple[str, str]) -> None:
    runner = FakeRunner([progress(10, elapsed=1, processed=1 << 20)])
    wire.runners.append(runner)
    mid = f"mig-{uuidlib.uuid4().hex[:8]}"
    assert wire.client.call("hv-01", "live_migrate", body(vm[0], mid), version="1.1") == {
        "migration_id": mid,
        "accepted": True,
    }
    assert wire.client.call("hv-01", "live_migrate", body(vm[0], mid), version="1.1")["accepted"] is True  # idempotent
    runner.started.wait(5)
    wait_for(lambda: wire.client.call("hv-01", "migration_status", {"migration_id": mid})["phase"] == "precopy")
    for p in (30, 25, 45):  # 25: libvirt's remaining grew for a moment; the percent must not go down
        runner.emit(progress(p, elapsed=p, processed=p << 20))
        wait_for(lambda p=p: runner.on_progress is not None)
        threading.Event().wait(0.06)
    state = wire.client.call("hv-01", "force_complete", {"migration_id": mid})
    assert state["status"] == "running"
    runner.emit(progress(70, phase="postcopy", elapsed=80, processed=80 << 20))
    with pytest.raises(RemoteRefused):
        wire.client.call("hv-01", "abort_migration", {"migration_id": mid})
    with pytest.raises(RemoteRefused):
        wire.client.call("hv-01", "force_complete", {"migration_id": mid})
    runner.finish()
    wait_for(lambda: any(k.endswith(".done") for k, _ in wire.events), timeout=10)
    progress_events = [b for k, b in wire.events if k == f"migration.{mid}.progress"]
    percents = [b.percent for b in progress_events]
    assert percents == sorted(percents) and percents[0] == 10 and percents[-1] == 70
    assert progress_events[-1].phase == "postcopy" and progress_events[-1].destination == "hv-02"
    (done,) = [b for k, b in wire.events if k == f"migration.{mid}.done"]
    assert (done.status, done.host_now, done.downtime_ms) == ("completed", "hv-02", 42)
    assert wire.destination.calls == [("confirm_claim", mid)]
    final = wire.client.call("hv-01", "migration_status", {"migration_id": mid})
    assert (final["status"], final["percent"]) == ("completed", 100.0)


def test_abort_over_the_bus_releases_the_claim(wire: Wire, vm: tuple[str, str]) -> None:
    runner = FakeRunner([progress(5)])
    wire.runners.append(runner)
    mid = f"mig-{uuidlib.uuid4().hex[:8]}"
    wire.client.call("hv-01", "live_migrate", body(vm[0], mid), version="1.1")
    runner.started.wait(5)
    wait_for(lambda: wire.client.call("hv-01", "migration_status", {"migration_id": mid})["phase"] == "precopy")
    wire.client.call("hv-01", "abort_migration", {"migration_id": mid})
    wait_for(lambda: any(k == f"migration.{mid}.done" for k, _ in wire.events), timeout=10)
    (done,) = [b for k, b in wire.events if k == f"migration.{mid}.done"]
    assert (done.status, done.host_now) == ("aborted", "hv-01")
    assert wire.destination.calls == [("release_claim", mid)]


def test_legacy_call_of_a_numa_instance_is_refused_over_the_bus(wire: Wire) -> None:
    name, _ = define_domain(pins=True)
    try:
        with pytest.raises(RemoteInvalidRequest, match="NUMA"):
            wire.client.call("hv-01", "live_migrate", body(name, "mig-legacy", placement=False), version="1.0")
    finally:
        drop_domain(name)
    with pytest.raises(RemoteNotFound):
        wire.client.call("hv-01", "migration_status", {"migration_id": "mig-legacy"})
