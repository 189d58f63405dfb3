"""The source's durable migration record (agent.daemon.migrations)."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from agent.daemon.migrations import MIGRATIONS_FILE, MigrationRecord, MigrationStore, MigrationStoreError


def record(migration_id: str = "m-1", **changes: object) -> MigrationRecord:
    base = MigrationRecord(
        migration_id=migration_id,
        instance="vm1",
        instance_uuid="8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a10",
        instance_name="vm1",
        dest_host="hv-02",
        dest_libvirt_uri="qemu+tcp://10.0.0.2/system",
        dest_migration_uri="tcp://10.0.0.2",
        claim_host="hv-02",
        placement_json='{"fits": true}',
        version="1.1",
        status="queued",
        phase="queued",
        percent=0.0,
        created_at=100.0,
        updated_at=100.0,
        claim_action="pending",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> MigrationStore:
    clock = iter(float(t) for t in range(1000, 100000))
    return MigrationStore.open(tmp_path, clock=lambda: next(clock))


def test_add_is_idempotent_by_id(store: MigrationStore) -> None:
    first, created = store.add(record())
    assert created and store.get("m-1") == first
    again, created = store.add(record(instance="other"))
    assert not created and again == first


def test_update_keeps_other_fields_and_stamps_the_time(store: MigrationStore) -> None:
    store.add(record())
    updated = store.update("m-1", status="running", percent=12.5, auto_converge=True)
    assert updated.status == "running" and updated.percent == 12.5 and updated.auto_converge is True
    assert updated.updated_at > 100.0 and updated.instance == "vm1"
    assert store.get("m-1") == updated
    with pytest.raises(KeyError):
        store.update("nope", status="failed")
    with pytest.raises(TypeError):
        store.update("m-1", colour="red")


def test_state_maps_preparing_to_running(store: MigrationStore) -> None:
    store.add(record(status="preparing", phase="preparing"))
    state = store.get("m-1").state()  # type: ignore[union-attr]
    assert state == {
        "migration_id": "m-1",
        "instance": "vm1",
        "status": "running",
        "phase": "preparing",
        "percent": 0.0,
        "reason": None,
    }


def test_unfinished_lists_active_and_unsettled(store: MigrationStore) -> None:
    store.add(record("a", status="running"))
    store.add(record("b", status="completed", claim_action="confirmed"))
    store.add(record("c", status="failed", claim_action="pending"))
    store.add(record("d", status="queued", claim_action="none"))
    assert [r.migration_id for r in store.unfinished()] == ["a", "c", "d"]
    assert {r.migration_id for r in store.recent(active_only=True)} == {"a", "d"}
    assert len(store.recent()) == 4


def test_records_survive_reopening(tmp_path: Path) -> None:
    MigrationStore.open(tmp_path).add(record(status="running", abort_requested=True))
    again = MigrationStore.open(tmp_path).get("m-1")
    assert again is not None and again.status == "running" and again.abort_requested is True


def test_prune_forgets_old_settled_ones_only(tmp_path: Path) -> None:
    now = [10_000_000.0]
    store = MigrationStore.open(tmp_path, clock=lambda: now[0])
    store.add(record("old", status="completed", claim_action="confirmed", updated_at=1.0))
    store.add(record("unsettled", status="failed", claim_action="pending", updated_at=1.0))
    store.add(record("running", status="running", updated_at=1.0))
    assert store.prune(retention_s=60) == 1
    assert store.get("old") is None and store.get("unsettled") and store.get("running")


def test_concurrent_updates_lose_nothing(store: MigrationStore) -> None:
    store.add(record())

    def bump(field: str) -> None:
        for _ in range(50):
            store.update("m-1", **{field: True})

    threads = [threading.Thread(target=bump, args=(f,)) for f in ("abort_requested", "post_copy")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = store.get("m-1")
    assert final is not None and final.abort_requested and final.post_copy


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / MIGRATIONS_FILE)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(MigrationStoreError, match="newer"):
        MigrationStore.open(tmp_path)


def test_garbage_file_is_a_typed_error(tmp_path: Path) -> None:
    (tmp_path / MIGRATIONS_FILE).write_bytes(b"not a database" * 100)
    with pytest.raises(MigrationStoreError, match=MIGRATIONS_FILE):
        MigrationStore.open(tmp_path)


def test_to_json_has_the_placement_decoded(store: MigrationStore) -> None:
    store.add(record())
    doc = store.get("m-1").to_json()  # type: ignore[union-attr]
    assert doc["placement"] == {"fits": True} and "placement_json" not in doc
