"""The source role with a scripted runner on test:///default (the test driver cannot migrate)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import libvirt
import pytest

from agent.bus.errors import (
    CallTimeout,
    RemoteBusy,
    RemoteConflict,
    RemoteInvalidRequest,
    RemoteNotFound,
    RemoteRefused,
)
from agent.bus.schemas import DescribeInstanceBody, LiveMigrateBody, LiveMigrateBodyV10, MigrationIdBody, decode_body
from agent.daemon import source as source_mod
from agent.daemon.source import Source
from agent.errors import InvalidRequest
from agent.libvirt_ops.instance_metadata import InstanceMetadata, store_instance_metadata
from agent.libvirt_ops.policy import MigrationPolicy
from tests.daemon.test_source_fakes import (
    URI,
    FailingRunner,
    FakeRunner,
    Harness,
    define_domain,
    drop_domain,
    make_harness,
    placement_for,
    progress,
    wait_for,
)


@pytest.fixture
def vm() -> Iterator[tuple[str, str]]:
    name, uuid = define_domain()
    yield name, uuid
    drop_domain(name)


@pytest.fixture
def vm2() -> Iterator[tuple[str, str]]:
    name, uuid = define_domain()
    yield name, uuid
    drop_domain(name)


def source_for(h: Harness) -> Source:
    return Source(h.ctx, runner_factory=h.runner_factory, sleep=lambda s: None, recover=False)


def migrate_body(
    instance: str, migration_id: str = "m-1", *, placement: bool = True, dest: str = "hv-02"
) -> LiveMigrateBodyV10:
    doc: dict = {
        "migration_id": migration_id,
        "instance": instance,
        "destination": {"host": dest, "libvirt_uri": "qemu+tcp://10.0.0.2/system", "migration_uri": "tcp://10.0.0.2"},
    }
    if not placement:
        return decode_body(doc, LiveMigrateBodyV10)
    doc["placement"] = placement_for().to_json()
    doc["claim_host"] = dest
    return decode_body(doc, LiveMigrateBody)


def status(src: Source, migration_id: str = "m-1") -> dict:
    return src.migration_status(MigrationIdBody(migration_id))


def set_meta(name: str, specs: dict[str, str], props: dict[str, str] | None = None) -> None:
    conn = libvirt.open(URI)
    try:
        store_instance_metadata(conn, name, InstanceMetadata(specs, props or {}))
    finally:
        conn.close()


# --- describe_instance ------------------------------------------------------------------------------


def test_describe_instance_reads_the_metadata_and_says_who_decided(tmp_path: Path, vm: tuple[str, str]) -> None:
    name, uuid = vm
    set_meta(name, {"compute:live_migration_post_copy": "true"}, {"hw_rng_model": "virtio"})
    src = source_for(make_harness(tmp_path, []))
    for ref in (name, uuid):
        doc = src.describe_instance(DescribeInstanceBody(ref))
        assert (doc["uuid"], doc["name"], doc["state"], doc["vcpus"], doc["memory_mb"]) == (
            uuid,
            name,
            "running",
            2,
            512,
        )
        assert doc["extra_specs"] == {"compute:live_migration_post_copy": "true"}
        assert doc["image_properties"] == {"hw_rng_model": "virtio"}
        assert doc["placement"] is None
        assert doc["policy"]["post_copy"] is True and doc["policy"]["auto_converge"] is False
        assert "compute:live_migration_post_copy=true" in doc["policy"]["decided_by"]
        assert "[libvirt] live_migration_permit_auto_converge=false" in doc["policy"]["decided_by"]


def test_describe_instance_without_metadata_uses_host_config(tmp_path: Path, vm: tuple[str, str]) -> None:
    doc = source_for(make_harness(tmp_path, [])).describe_instance(DescribeInstanceBody(vm[0]))
    assert doc["extra_specs"] == {} and doc["policy"]["post_copy"] is False
    assert "[libvirt] live_migration_permit_post_copy=false" in doc["policy"]["decided_by"]


def test_describe_unknown_instance_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(RemoteNotFound):
        source_for(make_harness(tmp_path, [])).describe_instance(DescribeInstanceBody("no-such-vm"))


def test_describe_contradictory_metadata_names_the_keys(tmp_path: Path, vm: tuple[str, str]) -> None:
    conn = libvirt.open(URI)  # written around the CLI's check, as a hand-edited domain could be
    conn.lookupByName(vm[0]).setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        '<instance>{"extra_specs": {"compute:live_migration_post_copy": "true", '
        '"compute:live_migration_auto_converge": "true"}}</instance>',
        "ci",
        "https://compute-agent.dev/xmlns/instance/1",
        libvirt.VIR_DOMAIN_AFFECT_LIVE,
    )
    conn.close()
    with pytest.raises(InvalidRequest, match="compute:live_migration"):
        source_for(make_harness(tmp_path, [])).describe_instance(DescribeInstanceBody(vm[0]))


# --- live_migrate: the NUMA-aware move --------------------------------------------------------------


def test_numa_aware_move_end_to_end(tmp_path: Path, vm: tuple[str, str]) -> None:
    runner = FakeRunner(
        [
            progress(10, elapsed=1, processed=100, memory_bps=150),  # libvirt's rate until the runner has one
            progress(30, elapsed=2, processed=300, transfer=200, memory_bps=150),
            progress(20),
        ]
    )
    h = make_harness(tmp_path, [runner])
    src = source_for(h)
    assert src.live_migrate(migrate_body(vm[0])) == {"migration_id": "m-1", "accepted": True}
    runner.started.wait(2)
    wait_for(lambda: len(h.events.bodies(".progress")) == 3)
    runner.emit(progress(50, phase="postcopy", elapsed=3, processed=600, transfer=300, eta=12.5))
    runner.finish()
    wait_for(lambda: status(src)["status"] == "completed")
    domain, target, placement, request = runner.calls[0]
    assert domain == vm[1] and target.host == "hv-02" and placement == placement_for()
    assert request.uuid == vm[1]
    percents = [b["percent"] for b in h.events.bodies(".progress")]
    assert percents == sorted(percents) and percents[-1] == 50  # never goes down
    assert [b["bandwidth_bps"] for b in h.events.bodies(".progress")] == [150, 200, 0, 300]  # the runner's rates
    assert h.events.bodies(".progress")[-1]["eta_s"] == 12.5  # the runner's ETA
    assert h.events.bodies(".progress")[-1]["dirty_rate_bps"] == 10 * 4096
    assert h.events.bodies(".progress")[-1]["phase"] == "postcopy"
    wait_for(lambda: h.events.keys()[-1] == "migration.m-1.done")
    (done,) = h.events.bodies(".done")
    assert (done["status"], done["host_now"], done["downtime_ms"], done["total_s"]) == ("completed", "hv-02", 42, 1.5)
    assert done["policy"] == {"auto_converge": False, "post_copy": False, "decided_by": done["policy"]["decided_by"]}
    assert h.peers.calls == [("hv-02", "confirm_claim", {"migration_id": "m-1"})]
    record = src.store.get("m-1")
    assert record is not None and record.claim_action == "confirmed" and record.percent == 100.0
    assert "migration m-1 completed" in h.changes


def test_live_migrate_is_idempotent_by_id(tmp_path: Path, vm: tuple[str, str]) -> None:
    runner = FakeRunner()
    src = source_for(make_harness(tmp_path, [runner]))
    src.live_migrate(migrate_body(vm[0]))
    runner.started.wait(2)
    assert src.live_migrate(migrate_body(vm[0]))["accepted"] is True
    assert src.live_migrate(migrate_body(vm[1]))["accepted"] is True  # by UUID: the same instance
    with pytest.raises(RemoteConflict, match="goes to"):
        src.live_migrate(migrate_body(vm[0], dest="hv-03"))
    runner.finish()
    wait_for(lambda: status(src)["status"] == "completed")
    assert src.live_migrate(migrate_body(vm[0]))["accepted"] is True  # after the end too
    assert len(runner.calls) == 1


def test_a_second_migration_of_the_same_instance_is_a_conflict(tmp_path: Path, vm: tuple[str, str]) -> None:
    runner = FakeRunner()
    src = source_for(make_harness(tmp_path, [runner]))
    src.live_migrate(migrate_body(vm[0]))
    with pytest.raises(RemoteConflict, match="already being migrated"):
        src.live_migrate(migrate_body(vm[0], "m-2"))
    runner.finish()


def test_unknown_instance_and_a_placement_for_another_domain(tmp_path: Path, vm: tuple[str, str]) -> None:
    src = source_for(make_harness(tmp_path, []))
    with pytest.raises(RemoteNotFound):
        src.live_migrate(migrate_body("no-such-vm"))
    body = migrate_body(vm[0]).__class__(**{**_fields(migrate_body(vm[0])), "placement": _doc(placement_for(vcpus=3))})
    with pytest.raises(RemoteInvalidRequest, match="body.placement"):
        src.live_migrate(body)
    assert src.store.get("m-1") is None


def test_a_stopped_instance_is_not_migrated(tmp_path: Path, vm: tuple[str, str]) -> None:
    conn = libvirt.open(URI)
    conn.lookupByName(vm[0]).destroy()
    conn.close()
    with pytest.raises(RemoteConflict, match="shutoff"):
        source_for(make_harness(tmp_path, [])).live_migrate(migrate_body(vm[0]))


# --- the legacy move --------------------------------------------------------------------------------


def test_legacy_move_of_a_shared_instance_passes_no_placement(tmp_path: Path, vm: tuple[str, str]) -> None:
    runner = FakeRunner()
    h = make_harness(tmp_path, [runner])
    src = source_for(h)
    src.live_migrate(migrate_body(vm[0], placement=False))
    runner.started.wait(2)
    runner.finish()
    wait_for(lambda: status(src)["status"] == "completed")
    assert runner.calls[0][2] is None
    assert h.peers.calls == []  # no claim to settle
    record = src.store.get("m-1")
    assert record is not None and record.version == "1.0" and record.claim_action == "none"


def test_legacy_move_of_a_numa_instance_is_refused(tmp_path: Path) -> None:
    name, _ = define_domain(pins=True)
    try:
        with pytest.raises(RemoteInvalidRequest, match="NUMA topology"):
            source_for(make_harness(tmp_path, [])).live_migrate(migrate_body(name, placement=False))
    finally:
        drop_domain(name)


def test_legacy_move_of_a_flavor_pinned_instance_is_refused(tmp_path: Path, vm: tuple[str, str]) -> None:
    set_meta(vm[0], {"hw:cpu_policy": "dedicated"})
    with pytest.raises(RemoteInvalidRequest, match="enable_numa_live_migration"):
        source_for(make_harness(tmp_path, [])).live_migrate(migrate_body(vm[0], placement=False))


def test_claim_host_without_placement_is_invalid(tmp_path: Path, vm: tuple[str, str]) -> None:
    body = decode_body({**_fields(migrate_body(vm[0], placement=False)), "claim_host": "hv-02"}, LiveMigrateBody)
    with pytest.raises(RemoteInvalidRequest, match="claim_host"):
        source_for(make_harness(tmp_path, [])).live_migrate(body)


# --- the outbound limit and abort -------------------------------------------------------------------


def test_limit_queues_and_a_queued_abort_leaves_nothing(
    tmp_path: Path, vm: tuple[str, str], vm2: tuple[str, str]
) -> None:
    first = FakeRunner()
    h = make_harness(tmp_path, [first], limit=1)
    src = source_for(h)
    src.live_migrate(migrate_body(vm[0], "m-1"))
    src.live_migrate(migrate_body(vm2[0], "m-2"))
    first.started.wait(2)
    assert status(src, "m-2")["status"] == "queued"
    assert src.status() == "1 migration out, 1 queued"
    state = src.abort_migration(MigrationIdBody("m-2"))
    wait_for(lambda: status(src, "m-2")["status"] == "aborted")
    assert state["status"] in ("running", "aborted")
    wait_for(lambda: ("hv-02", "release_claim") in [(c[0], c[1]) for c in h.peers.calls])
    first.finish()
    wait_for(lambda: status(src, "m-1")["status"] == "completed")
    assert len(first.calls) == 1 and not h.runners  # m-2 never reached a runner
    assert "migration.m-2.done" in h.events.keys() and not h.events.bodies("m-2.progress")


def test_the_next_queued_migration_starts_when_a_slot_frees(
    tmp_path: Path, vm: tuple[str, str], vm2: tuple[str, str]
) -> None:
    first, second = FakeRunner(), FakeRunner()
    src = source_for(make_harness(tmp_path, [first, second], limit=1))
    src.live_migrate(migrate_body(vm[0], "m-1"))
    src.live_migrate(migrate_body(vm2[0], "m-2"))
    first.started.wait(2)
    assert not second.started.is_set()
    first.finish()
    assert second.started.wait(2)
    second.finish()
    wait_for(lambda: status(src, "m-2")["status"] == "completed")


def test_two_slots_run_two_at_once(tmp_path: Path, vm: tuple[str, str], vm2: tuple[str, str]) -> None:
    first, second = FakeRunner(), FakeRunner()
    src = source_for(make_harness(tmp_path, [first, second], limit=2))
    src.live_migrate(migrate_body(vm[0], "m-1"))
    src.live_migrate(migrate_body(vm2[0], "m-2"))
    assert first.started.wait(2) and second.started.wait(2)
    first.finish()
    second.finish()


def test_a_full_queue_answers_busy(
    tmp_path: Path, vm: tuple[str, str], vm2: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(source_mod, "MAX_QUEUED", 1)
    first = FakeRunner()
    src = source_for(make_harness(tmp_path, [first], limit=1))
    src.live_migrate(migrate_body(vm[0], "m-1"))
    first.started.wait(2)
    src.live_migrate(migrate_body(vm2[0], "m-2"))  # waits in the queue
    third, _ = define_domain()
    try:
        with pytest.raises(RemoteBusy) as exc:
            src.live_migrate(migrate_body(third, "m-3"))
    finally:
        drop_domain(third)
    assert exc.value.retry_after and src.store.get("m-3") is None
    src.abort_migration(MigrationIdBody("m-2"))
    first.finish()


def test_abort_a_running_migration_releases_the_claim(tmp_path: Path, vm: tuple[str, str]) -> None:
    runner = FakeRunner([progress(5)])
    h = make_harness(tmp_path, [runner])
    src = source_for(h)
    src.live_migrate(migrate_body(vm[0]))
    wait_for(lambda: status(src)["phase"] == "precopy")  # the job runs (not preparing)
    src.abort_migration(MigrationIdBody("m-1"))
    wait_for(lambda: status(src)["status"] == "aborted")
    wait_for(lambda: len(h.events.bodies(".done")) == 1)
    assert h.events.bodies(".done")[0]["host_now"] == "hv-01"
    assert [c[1] for c in h.peers.calls] == ["release_claim"]
    assert src.abort_migration(MigrationIdBody("m-1"))["status"] == "aborted"  # repeating is harmless


def test_abort_while_preparing_is_applied_when_the_job_appears(tmp_path: Path, vm: tuple[str, str]) -> None:
    runner = FakeRunner([progress(1)])
    h = make_harness(tmp_path, [runner])
    src = source_for(h)
    src.live_migrate(migrate_body(vm[0]))
    runner.started.wait(2)
    # as if the abort came between run() being called and libvirt's job existing
    flight = src._flights["m-1"]
    flight.abort_requested, flight.started = True, False
    runner.emit(progress(2))
    wait_for(lambda: status(src)["status"] == "aborted")


def test_abort_and_force_complete_in_postcopy_are_refused(tmp_path: Path, vm: tuple[str, str]) -> None:
    runner = FakeRunner([progress(5)])
    src = source_for(make_harness(tmp_path, [runner]))
    src.live_migrate(migrate_body(vm[0]))
    wait_for(lambda: status(src)["phase"] == "precopy")  # the job runs (not preparing)
    src.force_complete(MigrationIdBody("m-1"))  # switches to post-copy
    with pytest.raises(RemoteRefused, match="nothing to force"):  # before the monitor saw the switch
        src.force_complete(MigrationIdBody("m-1"))
    runner.emit(progress(60, phase="postcopy"))
    with pytest.raises(RemoteRefused, match="post-copy"):
        src.force_complete(MigrationIdBody("m-1"))
    with pytest.raises(RemoteRefused, match="post-copy"):
        src.abort_migration(MigrationIdBody("m-1"))
    runner.finish()
    wait_for(lambda: status(src)["status"] == "completed")


def test_force_complete_of_a_paused_guest_is_no_refusal(tmp_path: Path, vm: tuple[str, str]) -> None:
    """Without post-copy, force-complete pauses the guest; asked again, the guest is already paused and
    pre-copy completes: the answer is the migration's state, not Refused (that is for post-copy only)."""
    runner = FakeRunner([progress(5)], post_copy=False)
    src = source_for(make_harness(tmp_path, [runner]))
    src.live_migrate(migrate_body(vm[0]))
    wait_for(lambda: status(src)["phase"] == "precopy")
    first = src.force_complete(MigrationIdBody("m-1"))
    again = src.force_complete(MigrationIdBody("m-1"))
    assert runner.paused and first["status"] == again["status"] == "running"
    runner.finish()
    wait_for(lambda: status(src)["status"] == "completed")


def test_force_complete_before_the_job_is_refused(tmp_path: Path, vm: tuple[str, str], vm2: tuple[str, str]) -> None:
    first = FakeRunner()
    src = source_for(make_harness(tmp_path, [first], limit=1))
    src.live_migrate(migrate_body(vm[0], "m-1"))
    src.live_migrate(migrate_body(vm2[0], "m-2"))
    with pytest.raises(RemoteRefused, match="not started"):
        src.force_complete(MigrationIdBody("m-2"))
    first.finish()
    src.abort_migration(MigrationIdBody("m-2"))


def test_unknown_migration_is_not_found(tmp_path: Path) -> None:
    src = source_for(make_harness(tmp_path, []))
    for method in (src.migration_status, src.abort_migration, src.force_complete):
        with pytest.raises(RemoteNotFound):
            method(MigrationIdBody("nope"))


# --- outcomes and the claim ---------------------------------------------------------------------------


def test_a_runner_refusal_fails_the_migration_and_releases(tmp_path: Path, vm: tuple[str, str]) -> None:
    h = make_harness(tmp_path, [FailingRunner()])
    src = source_for(h)
    src.live_migrate(migrate_body(vm[0]))
    wait_for(lambda: status(src)["status"] == "failed")
    assert "destination refused" in status(src)["reason"]
    wait_for(lambda: [c[1] for c in h.peers.calls] == ["release_claim"])


def test_failed_in_postcopy_leaves_the_claim(tmp_path: Path, vm: tuple[str, str]) -> None:
    runner = FakeRunner(status="failed")
    runner.postcopy = True
    h = make_harness(tmp_path, [runner])
    src = source_for(h)
    src.live_migrate(migrate_body(vm[0]))
    runner.started.wait(2)
    runner.finish()
    wait_for(lambda: status(src)["status"] == "failed")
    wait_for(lambda: src.store.get("m-1").claim_action == "left")  # type: ignore[union-attr]
    assert h.peers.calls == []


def test_claim_calls_are_retried_a_bounded_number_of_times(
    tmp_path: Path, vm: tuple[str, str], vm2: tuple[str, str]
) -> None:
    first, second = FakeRunner(), FakeRunner()
    h = make_harness(tmp_path, [first, second], limit=2)
    h.peers.failures = [CallTimeout("no reply"), CallTimeout("no reply")]
    src = source_for(h)
    src.live_migrate(migrate_body(vm[0], "m-1"))
    first.started.wait(2)
    first.finish()
    wait_for(lambda: src.store.get("m-1").claim_action == "confirmed")  # type: ignore[union-attr]
    assert len(h.peers.calls) == 3
    h.peers.failures = [CallTimeout("no reply")] * len(source_mod.CLAIM_CALL_DELAYS_S)
    src.live_migrate(migrate_body(vm2[0], "m-2"))
    second.started.wait(2)
    second.finish()
    wait_for(lambda: src.store.get("m-2").claim_action == "failed")  # type: ignore[union-attr]
    assert len(h.peers.calls) == 3 + len(source_mod.CLAIM_CALL_DELAYS_S)


def test_release_of_an_unknown_claim_counts_as_released(tmp_path: Path, vm: tuple[str, str]) -> None:
    h = make_harness(tmp_path, [FailingRunner()])
    h.peers.failures = [RemoteNotFound("no claim")]
    src = source_for(h)
    src.live_migrate(migrate_body(vm[0]))
    wait_for(lambda: src.store.get("m-1").claim_action == "released")  # type: ignore[union-attr]


def test_progress_is_throttled(tmp_path: Path, vm: tuple[str, str]) -> None:
    runner = FakeRunner([progress(p) for p in range(1, 30)])
    h = make_harness(tmp_path, [runner], progress_interval_s=60.0)
    src = source_for(h)
    src.live_migrate(migrate_body(vm[0]))
    runner.started.wait(2)
    runner.finish()
    wait_for(lambda: status(src)["status"] == "completed")
    assert len(h.events.bodies(".progress")) == 1


def test_stop_starts_nothing_more(tmp_path: Path, vm: tuple[str, str], vm2: tuple[str, str]) -> None:
    first = FakeRunner()
    h = make_harness(tmp_path, [first, FakeRunner()], limit=1)
    src = source_for(h)
    src.live_migrate(migrate_body(vm[0], "m-1"))
    src.live_migrate(migrate_body(vm2[0], "m-2"))
    first.started.wait(2)
    src.stop()
    first.finish()
    wait_for(lambda: status(src, "m-1")["status"] == "completed")
    assert status(src, "m-2")["status"] == "queued"  # taken up by the next start


# --- helpers ------------------------------------------------------------------------------------------


def _fields(body: LiveMigrateBodyV10) -> dict:
    import msgspec

    return msgspec.to_builtins(body)


def _doc(placement: object) -> dict:
    return placement.to_json()  # type: ignore[attr-defined]


def test_an_instance_gone_while_queued_fails_without_a_runner(tmp_path: Path, vm: tuple[str, str]) -> None:
    first = FakeRunner()
    h = make_harness(tmp_path, [first], limit=1)
    src = source_for(h)
    src.live_migrate(migrate_body(vm[0], "m-1"))
    name, _ = define_domain()
    src.live_migrate(migrate_body(name, "m-2"))
    drop_domain(name)
    first.started.wait(2)
    first.finish()
    wait_for(lambda: status(src, "m-2")["status"] == "failed")
    assert "not started" in status(src, "m-2")["reason"]
    wait_for(lambda: src.store.get("m-2").claim_action == "released")  # type: ignore[union-attr]


def test_the_migration_thread_carries_the_journal_fields(tmp_path: Path, vm: tuple[str, str]) -> None:
    import structlog

    seen: dict = {}

    class Recording(FakeRunner):
        def run(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            seen.update(structlog.contextvars.get_contextvars())
            return super().run(*args, **kwargs)

    runner = Recording()
    src = source_for(make_harness(tmp_path, [runner]))
    src.live_migrate(migrate_body(vm[0]))
    runner.started.wait(2)
    runner.finish()
    wait_for(lambda: status(src)["status"] == "completed")
    assert seen == {
        "migration_id": "m-1",
        "instance_uuid": vm[1],
        "source_host": "hv-01",
        "dest_host": "hv-02",
        "claim_id": "m-1",
    }


def test_the_policy_recorded_is_the_one_the_runner_decided(tmp_path: Path, vm: tuple[str, str]) -> None:
    runner = FakeRunner([progress(5)])
    runner.policy = MigrationPolicy(True, False, "auto-converge on (runner's words); post-copy off (x)")
    src = source_for(make_harness(tmp_path, [runner]))
    src.live_migrate(migrate_body(vm[0]))
    wait_for(lambda: status(src)["phase"] == "precopy")
    record = src.store.get("m-1")
    assert record is not None and (record.auto_converge, record.post_copy) == (True, False)
    assert record.decided_by == runner.policy.reason
    runner.finish()
    wait_for(lambda: status(src)["status"] == "completed")
