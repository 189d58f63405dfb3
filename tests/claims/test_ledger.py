"""The claim ledger: transitions, idempotency, expiry, retention, schema, corruption, reconcile."""

from __future__ import annotations

import logging
import sqlite3

import pytest

from agent.claims import store
from agent.claims.errors import (
    ClaimConflict,
    ClaimEnded,
    IllegalTransition,
    LedgerCorrupt,
    LedgerError,
    LedgerSchemaTooNew,
    NoFitError,
    UnknownClaim,
)
from agent.claims.ledger import SCHEMA_VERSION, ClaimState, Ledger
from agent.config import ComputeConfig
from agent.errors import AgentError, InvalidInput
from tests.claims.helpers import FakeClock, check_invariant, request, state_fn, topology

TOPO = topology(cells=2, cores_per_cell=4, threads=2, huge_2m=1024)
FN = state_fn(TOPO)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def ledger(tmp_path, clock):
    with Ledger.open(tmp_path, clock=clock, migrating_timeout_s=600, retention_s=3600) as led:
        yield led


def states(ledger, mid):
    return [(t.from_state and t.from_state.value, t.to_state.value) for t in ledger.transitions(mid)]


def test_happy_path_held_migrating_confirmed(ledger, clock):
    c = ledger.claim("m-1", request(4, 2048), "src-1", 60, FN)
    assert c.state is ClaimState.HELD and c.expires_at == clock.t + 60 and c.source_host == "src-1"
    assert len(c.placement.pinned_cpus) == 4
    clock.advance(10)
    m = ledger.start("m-1")
    assert m.state is ClaimState.MIGRATING and m.expires_at == clock.t + 600
    clock.advance(300)
    m2 = ledger.start("m-1")  # progress: refreshes the expiry, no transition row
    assert m2.state is ClaimState.MIGRATING and m2.expires_at == clock.t + 600
    done = ledger.confirm("m-1")
    assert done.state is ClaimState.CONFIRMED
    assert states(ledger, "m-1") == [(None, "held"), ("held", "migrating"), ("migrating", "confirmed")]
    assert ledger.get("m-1") == done
    assert ledger.live_claims() == []
    assert all(t.at > 0 and t.reason for t in ledger.transitions("m-1"))


def test_release_from_held_and_migrating_frees_resources(ledger):
    ledger.claim("a", request(8, 1024), "s", 60, FN)
    ledger.claim("b", request(8, 1024), "s", 60, FN)
    with pytest.raises(NoFitError) as ei:
        ledger.claim("c", request(8, 1024), "s", 60, FN)
    assert ei.value.reason
    ledger.start("b")
    assert ledger.release("a", "migration aborted").state is ClaimState.RELEASED
    assert ledger.release("b", "failure").state is ClaimState.RELEASED
    assert ledger.claim("c", request(8, 1024), "s", 60, FN).state is ClaimState.HELD
    assert states(ledger, "b")[-1] == ("migrating", "released")
    assert ledger.get("a").reason == "migration aborted"


def test_illegal_transitions_raise_typed_errors(ledger):
    ledger.claim("m", request(), "s", 60, FN)
    ledger.confirm("m")  # held -> confirmed is allowed (domain seen running before start)
    with pytest.raises(IllegalTransition) as ei:
        ledger.release("m", "late failure")
    assert ei.value.from_state == "confirmed" and ei.value.to_state == "released"
    with pytest.raises(IllegalTransition):
        ledger.start("m")
    assert ledger.confirm("m").state is ClaimState.CONFIRMED  # repeat: no-op
    ledger.claim("r", request(), "s", 60, FN)
    ledger.release("r", "x")
    assert ledger.release("r", "again").reason == "x"  # repeat: no-op, first reason kept
    for op in (lambda: ledger.start("r"), lambda: ledger.confirm("r")):
        with pytest.raises(IllegalTransition):
            op()
    assert isinstance(IllegalTransition("a", "b", "c"), InvalidInput)
    assert len(ledger.transitions("r")) == 2


def test_unknown_claim_and_bad_ids(ledger):
    for op in (ledger.get, ledger.start, ledger.confirm, ledger.transitions, lambda m: ledger.release(m, "why")):
        with pytest.raises(UnknownClaim):
            op("nope")
    for bad in ("", "a" * 129, "has space", "semi;colon", "é", None, 5):
        with pytest.raises(InvalidInput):
            ledger.get(bad)
        with pytest.raises(InvalidInput):
            ledger.claim(bad, request(), "s", 60, FN)
    ledger.claim("A-z.0:9_" + "x" * 120, request(), "s", 60, FN)


def test_bad_requests_and_parameters(ledger):
    with pytest.raises(InvalidInput):
        ledger.claim("m", {"uuid": "not-a-uuid", "vcpus": 2, "memory_mb": 1}, "s", 60, FN)
    with pytest.raises(InvalidInput):
        ledger.claim("m", {"uuid": "8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a10", "vcpus": 10**9, "memory_mb": 1}, "s", 60, FN)
    with pytest.raises(InvalidInput):
        ledger.claim("m", 42, "s", 60, FN)
    for ttl in (0, -1, float("nan"), float("inf"), 10**12, True, "60"):
        with pytest.raises(InvalidInput):
            ledger.claim("m", request(), "s", ttl, FN)
    for src in ("", " x", "a\nb", "h" * 256, None):
        with pytest.raises(InvalidInput):
            ledger.claim("m", request(), src, 60, FN)
    with pytest.raises(InvalidInput):
        ledger.release("m", "")
    with pytest.raises(InvalidInput):
        ledger.list_claims(["bogus"])
    assert ledger.list_claims() == []


def test_claim_from_request_document(ledger):
    doc = {
        "uuid": "8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a10",
        "vcpus": 2,
        "memory_mb": 1024,
        "extra_specs": {"hw:cpu_policy": "dedicated", "hw:mem_page_size": "2048"},
    }
    c = ledger.claim("doc", doc, "s", 60, FN)
    assert c.instance_uuid == doc["uuid"] and c.request["vcpus"] == 2
    # the same request as JSON text is the same request
    import json

    assert ledger.claim("doc", json.dumps(doc), "s", 60, FN) == c


def test_idempotent_by_migration_id_and_conflicts(ledger, clock):
    req = request(2, 1024, uuid="8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a10")
    c1 = ledger.claim("m", req, "src", 60, FN)
    clock.advance(5)
    assert ledger.claim("m", req, "src", 120, FN) == c1  # same request: same claim (ttl not changed)
    assert len(ledger.list_claims()) == 1 and len(ledger.transitions("m")) == 1
    with pytest.raises(ClaimConflict):
        ledger.claim("m", request(4, 1024, uuid=req.uuid), "src", 60, FN)
    with pytest.raises(ClaimConflict):
        ledger.claim("m", req, "other-src", 60, FN)
    # the same instance cannot hold two live claims
    with pytest.raises(ClaimConflict):
        ledger.claim("m2", req, "src", 60, FN)
    ledger.release("m", "abort")
    with pytest.raises(ClaimEnded, match="released: abort"):  # ended: never returned as if valid
        ledger.claim("m", req, "src", 60, FN)
    assert ledger.claim("m2", req, "src", 60, FN).state is ClaimState.HELD


def test_ttl_expiry_with_injected_clock(ledger, clock, caplog):
    ledger.claim("h", request(), "s", 30, FN)
    ledger.claim("g", request(), "s", 30, FN)
    ledger.start("g")
    clock.advance(29)
    assert ledger.expire_due() == []
    clock.advance(1)
    with caplog.at_level(logging.WARNING, logger="compute_agent.claims"):
        expired = ledger.expire_due()
    assert [c.migration_id for c in expired] == ["h"] and "TTL" in expired[0].reason
    assert "expired" in caplog.text
    clock.advance(599 - 30)
    assert ledger.expire_due() == []
    clock.advance(100)
    (g,) = ledger.expire_due()
    assert g.state is ClaimState.EXPIRED and "no progress" in g.reason
    with pytest.raises(IllegalTransition):
        ledger.start("h")
    assert ledger.release("h", "late abort").state is ClaimState.EXPIRED  # already not holding: no-op


def test_expired_claims_free_resources_for_the_next_claim(ledger, clock):
    ledger.claim("a", request(16, 1024, numa_nodes=2), "s", 30, FN)  # every CPU of the host
    with pytest.raises(NoFitError):
        ledger.claim("b", request(2, 1024), "s", 30, FN)
    clock.advance(31)
    assert ledger.claim("b", request(2, 1024), "s", 30, FN).state is ClaimState.HELD  # expiry inside claim
    assert ledger.get("a").state is ClaimState.EXPIRED


def test_prune_after_retention(ledger, clock):
    ledger.claim("old", request(), "s", 30, FN)
    ledger.release("old", "x")
    ledger.claim("live", request(), "s", 7200, FN)
    clock.advance(3599)
    assert ledger.prune() == 0
    clock.advance(1)
    assert ledger.prune() == 1
    with pytest.raises(UnknownClaim):
        ledger.get("old")
    with pytest.raises(UnknownClaim):
        ledger.transitions("old")
    assert ledger.get("live").state is ClaimState.HELD  # live claims are never pruned
    n = ledger._conn.execute("SELECT count(*) FROM transitions WHERE migration_id='old'").fetchone()[0]
    assert n == 0


def test_reopen_keeps_everything(tmp_path, clock):
    with Ledger.open(tmp_path, clock=clock) as led:
        c = led.claim("m", request(), "s", 60, FN)
        led.start("m")
    with Ledger.open(tmp_path, clock=clock) as led:
        got = led.get("m")
        assert got.state is ClaimState.MIGRATING and got.placement == c.placement
        assert led.schema_version == SCHEMA_VERSION
        conn = led._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


V1 = [
    """CREATE TABLE claims (migration_id TEXT PRIMARY KEY NOT NULL, instance_uuid TEXT NOT NULL,
       source_host TEXT NOT NULL, request_json TEXT NOT NULL, placement_json TEXT NOT NULL,
       state TEXT NOT NULL CHECK (state IN ('held','migrating','confirmed','released','expired')),
       created_at REAL NOT NULL, expires_at REAL NOT NULL, updated_at REAL NOT NULL, reason TEXT)""",
    """CREATE TABLE transitions (id INTEGER PRIMARY KEY AUTOINCREMENT,
       migration_id TEXT NOT NULL REFERENCES claims(migration_id) ON DELETE CASCADE,
       from_state TEXT, to_state TEXT NOT NULL, at REAL NOT NULL, reason TEXT)""",
]


def test_schema_migration_from_v1(tmp_path, clock, caplog):
    # a v1 ledger as the first release wrote it, holding one live claim
    with Ledger.open(tmp_path / "src", clock=clock) as led:
        c = led.claim("m", request(), "s", 60, FN)
        row = led._conn.execute(
            "SELECT migration_id, instance_uuid, source_host, request_json, placement_json, "
            "state, created_at, expires_at, updated_at, reason FROM claims"
        ).fetchone()
    db = tmp_path / "ledger.db"
    conn = sqlite3.connect(db)
    for stmt in V1:
        conn.execute(stmt)
    conn.execute("INSERT INTO claims VALUES (?,?,?,?,?,?,?,?,?,?)", row)
    conn.execute(
        "INSERT INTO transitions (migration_id, from_state, to_state, at, reason) VALUES ('m', NULL, 'held', 1, 'x')"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with caplog.at_level(logging.INFO, logger="compute_agent.claims"):
        led = Ledger.open(tmp_path, clock=clock)
    with led:
        assert f"upgraded from schema version 1 to {SCHEMA_VERSION}" in caplog.text  # v3: row checksums
        assert led.schema_version == SCHEMA_VERSION
        got = led.get("m")
        assert got.placement == c.placement and got.state is ClaimState.HELD and got.ttl_s == 0
        assert len(led.transitions("m")) == 1
        indexes = {r[0] for r in led._conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"claims_state", "claims_instance", "transitions_claim"} <= indexes
        # and it keeps working: the v1 claim still holds its CPUs
        check_invariant(TOPO, [got, led.claim("n", request(), "s", 60, FN)])


def test_newer_schema_is_refused_and_left_untouched(tmp_path):
    with Ledger.open(tmp_path):
        pass
    db = tmp_path / "ledger.db"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    with pytest.raises(LedgerSchemaTooNew) as ei:
        Ledger.open(tmp_path)
    assert ei.value.found == SCHEMA_VERSION + 1 and isinstance(ei.value, AgentError)
    assert db.read_bytes() == before
    assert not list(tmp_path.glob("*.corrupt-*"))


def test_not_a_database_is_moved_aside(tmp_path, caplog):
    db = tmp_path / "ledger.db"
    db.write_bytes(b"this is not sqlite at all" * 100)
    (tmp_path / "ledger.db-wal").write_bytes(b"junk")
    with caplog.at_level(logging.ERROR, logger="compute_agent.claims"):
        with pytest.raises(LedgerCorrupt) as ei:
            Ledger.open(tmp_path)
    moved = ei.value.moved_to
    assert moved is not None and moved.name.startswith("ledger.db.corrupt-")
    assert moved.read_bytes().startswith(b"this is not sqlite")  # never emptied
    assert moved.with_name(moved.name + "-wal").exists()
    assert not db.exists()
    assert "corrupt" in caplog.text
    # the daemon may choose to start fresh: the corrupt file stays, and is surfaced
    with Ledger.open(tmp_path) as led:
        assert led.list_claims() == [] and led.corrupt_files == (moved,)


def test_damaged_database_is_moved_aside_or_recreated(tmp_path):
    with Ledger.open(tmp_path) as led:
        for i in range(40):
            led.claim(f"m{i}", request(1, 2), "s", 60, state_fn(topology(cells=2, cores_per_cell=32)))
        led._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db = tmp_path / "ledger.db"
    data = bytearray(db.read_bytes())
    assert len(data) > 3 * 4096
    for off in range(4096 + 100, len(data), 997):  # scribble over every page but the header
        data[off : off + 8] = b"\xff" * 8
    db.write_bytes(bytes(data))
    led = Ledger.open(tmp_path, on_corrupt="recreate")
    with led:
        assert led.recovered_from_corrupt is not None and led.recovered_from_corrupt.exists()
        assert led.list_claims() == []
        assert led.corrupt_files == (led.recovered_from_corrupt,)


def test_closed_ledger_raises_typed_error(tmp_path):
    led = Ledger.open(tmp_path)
    led.close()
    with pytest.raises(AgentError):
        led.list_claims()


def test_reconcile_decisions(ledger, clock, caplog):
    r_run = request(2, 256, uuid="aaaaaaaa-0000-4000-8000-000000000001")
    ledger.claim("runs", r_run, "s", 60, FN)
    ledger.claim("stale", request(2, 256), "s", 30, FN)
    ledger.claim("failed", request(2, 256), "src-f", 600, FN)
    ledger.start("failed")
    ledger.claim("busy", request(2, 256), "src-b", 600, FN)
    ledger.start("busy")
    ledger.claim("held", request(2, 256), "s", 600, FN)
    ledger.claim("boom", request(2, 256), "src-x", 600, FN)
    ledger.start("boom")
    clock.advance(31)

    def source_failed(c):
        if c.source_host == "src-x":
            raise OSError("bus down")
        return c.source_host == "src-f"

    with caplog.at_level(logging.INFO, logger="compute_agent.claims"):
        decisions = ledger.reconcile(
            [r_run.uuid.upper(), "bbbbbbbb-0000-4000-8000-000000000000"], source_reports_failed=source_failed
        )
    got = {d.migration_id: (d.from_state.value, d.to_state.value) for d in decisions}
    assert got == {"runs": ("held", "confirmed"), "stale": ("held", "expired"), "failed": ("migrating", "released")}
    assert all(d.reason.startswith("reconcile:") for d in decisions)
    for mid in got:
        assert f"reconcile: claim {mid}" in caplog.text
    assert "bus down" in caplog.text
    assert ledger.get("busy").state is ClaimState.MIGRATING
    assert ledger.get("held").state is ClaimState.HELD
    assert ledger.get("boom").state is ClaimState.MIGRATING
    assert ledger.reconcile([]) == []  # nothing more to decide


def test_reconcile_accepts_domain_placements_and_expires_migrating(ledger, clock):
    from agent.libvirt_ops.domain_xml import DomainPlacement

    r = request()
    ledger.claim("a", r, "s", 60, FN)
    ledger.start("a")
    ledger.claim("b", request(), "s", 60, FN)
    ledger.start("b")
    clock.advance(601)
    dom = DomainPlacement(name="vm", uuid=r.uuid, vcpus=2, memory_kib=1024)
    decisions = ledger.reconcile([dom])
    assert [(d.migration_id, d.to_state) for d in decisions] == [("a", ClaimState.CONFIRMED), ("b", ClaimState.EXPIRED)]
    with pytest.raises(InvalidInput):
        ledger.reconcile([object()])


def test_reconcile_prunes_old_terminal_claims(ledger, clock):
    ledger.claim("x", request(), "s", 60, FN)
    ledger.release("x", "y")
    clock.advance(3601)
    ledger.reconcile([])
    with pytest.raises(UnknownClaim):
        ledger.get("x")


def test_fitter_double_booking_is_refused(tmp_path):
    first = {}

    def bad_fitter(req, state):
        from agent.numa.fit import fit

        p = fit(req, state.__class__(topology=state.topology))  # ignores usage: would double book
        first.setdefault("p", p)
        return p

    with Ledger.open(tmp_path, fitter=bad_fitter) as led:
        led.claim("a", request(), "s", 60, FN)
        with pytest.raises(AgentError, match="refusing"):
            led.claim("b", request(), "s", 60, FN)
        assert [c.migration_id for c in led.list_claims()] == ["a"]


def test_pinning_never_starves_existing_floating_vcpus(tmp_path):
    """Without a cpu_shared_set, pinning shrinks the shared pool: the FITTER refuses a placement
    after which floating vCPUs already on the cell would exceed its capacity (the ledger has no
    placement rule of its own, so this fails if the fitter's rule goes)."""
    topo = topology(cells=1, cores_per_cell=1, threads=1, huge_2m=0)
    fn = state_fn(topo)
    with Ledger.open(tmp_path) as led:
        led.claim("float", request(1, 2, dedicated=False, page_kb=None), "s", 60, fn)
        with pytest.raises(NoFitError, match="floating vCPUs already on the cell") as ei:
            led.claim("pin", request(1, 2, page_kb=None), "s", 60, fn)
        assert ei.value.nofit is not None and not ei.value.nofit.fits
        assert [c.migration_id for c in led.list_claims()] == ["float"]
    # two CPUs at ratio 1.0: one may be pinned (the floating vCPU keeps the other)...
    topo2 = topology(cells=1, cores_per_cell=2, threads=1, huge_2m=0)
    fn2 = state_fn(topo2, cfg=ComputeConfig(reserved_host_memory_mb=0, cpu_allocation_ratio=1.0))
    with Ledger.open(tmp_path / "two") as led:
        led.claim("float", request(1, 2, dedicated=False, page_kb=None), "s", 60, fn2)
        assert len(led.claim("pin", request(1, 2, page_kb=None), "s", 60, fn2).placement.pinned_cpus) == 1
        # ...but not the second: it would leave the floating vCPU no CPU at all
        with pytest.raises(NoFitError, match="floating"):
            led.claim("pin2", request(1, 2, page_kb=None), "s", 60, fn2)


def test_ledger_records_what_the_fitter_accepts(tmp_path):
    """No placement rule of its own in the ledger: a cell already over its floating ratio, with
    disjoint dedicated and shared sets, still takes a pinned guest (the fitter says it fits)."""
    from agent.numa.fit import fit
    from agent.numa.state import HostState

    st = HostState.from_json(
        {
            "cells": [
                {
                    "id": 0,
                    "cpus": [0, 1, 2, 3],
                    "memory_kb": 8 * 1024 * 1024,
                    "pages": [{"size_kb": 4, "total": 2 * 1024 * 1024, "free": 2 * 1024 * 1024}],
                    "floating_vcpus": 5,
                }
            ],
            "cpu_dedicated_set": [2, 3],
            "cpu_shared_set": [0, 1],
            "cpu_allocation_ratio": 1.0,
        }
    )
    req = request(1, 512, page_kb=4)
    assert fit(req, st).fits
    with Ledger.open(tmp_path) as led:
        c = led.claim("m1", req, "src", 60, lambda live: st)
        assert c.state is ClaimState.HELD and c.placement == fit(req, st)
    import agent.claims.ledger as ledger_mod

    assert not hasattr(ledger_mod, "_starved_floating")


def test_foreign_sqlite_file_is_moved_aside(tmp_path):
    conn = sqlite3.connect(tmp_path / "ledger.db")
    conn.execute("CREATE TABLE something_else (x)")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerCorrupt, match="not a claim ledger"):
        Ledger.open(tmp_path)
    assert list(tmp_path.glob("ledger.db.corrupt-*"))


def test_from_config_and_host_state_fn_with_domains(tmp_path):
    from agent.claims.hoststate import host_state_fn
    from agent.config import ClaimsConfig, ComputeConfig
    from agent.libvirt_ops.domain_xml import DomainPlacement

    cfg = ClaimsConfig(state_dir=tmp_path, migrating_timeout_s=5, retention_s=7)
    topo = topology(cells=1, cores_per_cell=2, threads=1, huge_2m=0)
    running = [
        DomainPlacement(
            name="d",
            uuid="cccccccc-0000-4000-8000-000000000000",
            vcpus=1,
            memory_kib=1024,
            vcpu_pins={0: frozenset({0})},
        )
    ]
    fn = host_state_fn(lambda: topo, lambda: running, ComputeConfig(reserved_host_memory_mb=0))
    with Ledger.from_config(cfg) as led:
        assert led.migrating_timeout_s == 5 and led.retention_s == 7
        c = led.claim("m", request(1, 2, page_kb=None), "s", 60, fn)
        assert c.placement.pinned_cpus == {1}  # CPU 0 is the running domain's
        with pytest.raises(NoFitError):
            led.claim("n", request(1, 2, page_kb=None), "s", 60, fn)


def test_bad_input_is_logged(ledger, caplog):
    with caplog.at_level(logging.WARNING, logger="compute_agent.claims"):
        with pytest.raises(UnknownClaim):
            ledger.release("ghost", "why")
        with pytest.raises(InvalidInput):
            ledger.claim("bad id", request(), "s", 60, FN)
    assert "release refused" in caplog.text and "unknown_claim" in caplog.text
    assert "claim refused" in caplog.text and "invalid_input" in caplog.text


# --- B1 / B11: an instance that runs here; the inventory contract ----------------------------------


def test_claim_for_an_instance_running_here_is_refused_and_its_cpus_stay_taken(tmp_path):
    from agent.claims.hoststate import host_state_fn
    from agent.libvirt_ops.domain_xml import DomainPlacement
    from agent.libvirt_ops.inventory import DomainInventory

    x, y = "8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a10", "8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a11"
    topo = topology(cells=1, cores_per_cell=6, threads=1, huge_2m=0)
    dom_x = DomainPlacement(
        name="X", uuid=x, vcpus=2, memory_kib=1024 * 1024, vcpu_pins={0: frozenset({2}), 1: frozenset({3})}
    )
    cfg = ComputeConfig(reserved_host_memory_mb=0)
    for domains in (lambda: [dom_x], lambda: DomainInventory((dom_x,), frozenset({x}))):
        fn = host_state_fn(topo, domains, cfg)
        with Ledger.open(tmp_path / str(id(domains))) as led:
            with pytest.raises(ClaimConflict, match="already runs on this host"):
                led.claim("m-x", request(2, 1024, page_kb=4, uuid=x.upper()), "other-host", 600, fn)
            assert led.list_claims() == []
            b = led.claim("m-y", request(2, 1024, page_kb=4, uuid=y), "other-host", 600, fn)
            c = led.claim("m-z", request(2, 1024, page_kb=4), "other-host", 600, fn)
            assert not (b.placement.pinned_cpus | c.placement.pinned_cpus) & {2, 3}
            check_invariant(topo, led.live_claims(), [dom_x], cfg)
    # the domain defined here but not running (an incoming copy, or shut off): no refusal
    fn = host_state_fn(topo, lambda: DomainInventory((dom_x,), frozenset()), cfg)
    with Ledger.open(tmp_path / "inactive") as led:
        assert led.claim("m-x", request(2, 1024, page_kb=4, uuid=x), "src", 600, fn).state is ClaimState.HELD


def test_no_claim_on_a_host_with_unreadable_domains(tmp_path):
    from agent.claims.hoststate import host_state_fn
    from agent.libvirt_ops.inventory import DomainInventory, IncompleteInventory

    fn = host_state_fn(
        TOPO,
        lambda: DomainInventory((), frozenset(), ("vm3: not well-formed",)),
        ComputeConfig(reserved_host_memory_mb=0),
    )
    with Ledger.open(tmp_path) as led:
        with pytest.raises(IncompleteInventory, match="vm3"):
            led.claim("m", request(), "s", 60, fn)
        assert led.list_claims() == []


# --- B3: reconcile decides from the fresh row ----------------------------------------------------


def test_reconcile_decides_expiry_inside_the_transaction(tmp_path):
    clock = FakeClock(1000.0)

    class Racy(Ledger):
        """A bus `progress` lands right after reconcile took its snapshot of the live claims."""

        def live_claims(self):
            snap = super().live_claims()
            clock.t = 1299.0
            self.progress("m1")  # before the expiry (1300): legitimately moves it to 1599
            return snap

    with Racy.open(tmp_path, clock=clock, migrating_timeout_s=300) as led:
        led.claim("m1", request(), "src", 60, FN)
        led.start("m1")  # expires at 1300
        assert led.reconcile([], now=1300.0, prune=False) == []
        got = led.get("m1")
        assert got.state is ClaimState.MIGRATING and got.expires_at == 1599.0
        assert [t.to_state.value for t in led.transitions("m1")] == ["held", "migrating"]


def test_reconcile_release_skipped_when_the_claim_moved_while_asking_the_source(ledger, clock):
    ledger.claim("m", request(), "src", 60, FN)
    ledger.start("m")

    def source_failed(c):
        clock.advance(1)
        ledger.progress("m")  # the migration is alive after all
        return True

    assert ledger.reconcile([], source_reports_failed=source_failed) == []
    assert ledger.get("m").state is ClaimState.MIGRATING


# --- B5: SQLite errors in a write ----------------------------------------------------------------


def test_sqlite_error_in_a_write_rolls_back_and_raises_ledger_error(tmp_path, caplog):
    topo = topology(cells=1, cores_per_cell=64, threads=1, huge_2m=0)
    fn = state_fn(topo)
    with Ledger.open(tmp_path) as led:
        n = led._conn.execute("PRAGMA page_count").fetchone()[0]
        led._conn.execute(f"PRAGMA max_page_count={n}")  # the disk is full
        ok = []
        with caplog.at_level(logging.ERROR, logger="compute_agent.claims"):
            with pytest.raises(LedgerError, match="full"):
                for i in range(60):
                    ok.append(led.claim(f"m{i}", request(1, 16, page_kb=4), "src", 60, fn).migration_id)
        assert "rolled back" in caplog.text
        assert not led._conn.in_transaction
        assert [c.migration_id for c in led.list_claims()] == ok  # the failed claim left nothing behind
        led._conn.execute("PRAGMA max_page_count=1073741823")  # space again: the ledger still works
        assert led.claim("again", request(1, 16, page_kb=4), "src", 60, fn).state is ClaimState.HELD


def test_programming_error_is_a_bug_not_corruption(tmp_path, monkeypatch):
    with Ledger.open(tmp_path):
        pass
    before = (tmp_path / "ledger.db").read_bytes()

    def buggy(conn, path):
        raise sqlite3.ProgrammingError("Incorrect number of bindings supplied")

    monkeypatch.setattr(store, "migrate", buggy)
    with pytest.raises(LedgerError) as ei:
        Ledger.open(tmp_path)
    assert not isinstance(ei.value, LedgerCorrupt)
    assert not list(tmp_path.glob("ledger.db.corrupt-*"))
    assert (tmp_path / "ledger.db").read_bytes() == before


# --- B7 / B12: an ended claim is never used as if valid -------------------------------------------


def test_retried_claim_of_an_expired_claim_raises_claim_ended(tmp_path):
    clock = FakeClock(0.0)
    fn = state_fn(topology(cells=1, cores_per_cell=2, threads=1, huge_2m=0))
    a, b = request(2, 512, page_kb=4), request(2, 512, page_kb=4)
    with Ledger.open(tmp_path, clock=clock) as led:
        led.claim("m1", a, "src", 60, fn)
        clock.t = 100
        m2 = led.claim("m2", b, "src", 60, fn)  # expires m1 and takes its CPUs
        with pytest.raises(ClaimEnded, match="expired") as ei:
            led.claim("m1", a, "src", 60, fn)  # a bus retry of m1
        assert ei.value.state == "expired" and "TTL" in ei.value.reason
        assert isinstance(ei.value, IllegalTransition)
        # expired at the retry itself (no sweep before): recorded, and refused all the same
        clock.t = 200
        with pytest.raises(ClaimEnded):
            led.claim("m2", b, "src", 60, fn)
        assert led.get("m2").state is ClaimState.EXPIRED and m2.state is ClaimState.HELD


@pytest.mark.parametrize("action", ["start", "confirm", "progress"])
def test_start_or_confirm_past_expiry_expires_the_claim_and_raises(ledger, clock, action):
    ledger.claim("m", request(), "s", 60, FN)
    if action == "progress":
        ledger.start("m")
        clock.advance(600)  # migrating_timeout_s
    else:
        clock.advance(60)
    with pytest.raises(ClaimEnded, match=f"expired before {'start' if action != 'confirm' else 'confirm'}"):
        getattr(ledger, action)("m")
    got = ledger.get("m")
    assert got.state is ClaimState.EXPIRED and got.reason.startswith("expired before")
    assert states(ledger, "m")[-1][1] == "expired"
    with pytest.raises(ClaimEnded):  # and it stays ended
        getattr(ledger, action)("m")


# --- B14: read-only opening ----------------------------------------------------------------------


def test_readonly_open_never_writes_upgrades_or_moves(tmp_path):
    with pytest.raises(LedgerError, match="no ledger"):
        Ledger.open(tmp_path / "none", readonly=True)
    assert not (tmp_path / "none").exists()
    with Ledger.open(tmp_path, clock=FakeClock()) as led:
        led.claim("m", request(), "s", 60, FN)
    with Ledger.open(tmp_path, readonly=True) as ro:
        assert ro.readonly and [c.migration_id for c in ro.list_claims()] == ["m"]
        assert len(ro.transitions("m")) == 1
        with pytest.raises(LedgerError, match="read-only"):
            ro.release("m", "no")
        with pytest.raises(LedgerError, match="read-only"):
            ro.expire_due()
    # an old schema is not upgraded by a read-only open
    db = tmp_path / "v1" / "ledger.db"
    db.parent.mkdir()
    conn = sqlite3.connect(db)
    for stmt in V1:
        conn.execute(stmt)
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match="older"):
        Ledger.open(db.parent, readonly=True)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()
    # a damaged one is reported, left in place
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ledger.db").write_bytes(b"garbage" * 500)
    with pytest.raises(LedgerCorrupt) as ei:
        Ledger.open(bad, readonly=True)
    assert ei.value.moved_to is None and (bad / "ledger.db").read_bytes() == b"garbage" * 500
    assert not list(bad.glob("ledger.db.corrupt-*"))


def test_prune_is_one_delete_relying_on_cascade(ledger, clock):
    for i in range(3):
        ledger.claim(f"x{i}", request(), "s", 60, FN)
        ledger.release(f"x{i}", "y")
    clock.advance(3600)
    assert ledger.prune() == 3
    assert ledger._conn.execute("SELECT count(*) FROM transitions").fetchone()[0] == 0
