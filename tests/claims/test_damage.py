"""The ledger on a damaged disk (issue 12, items 1-6): what can hide a live claim is found at open,
a damaged ledger is salvaged (never started empty silently) and new claims wait, every row's
content is checksummed, undecodable text and invalid rows are typed errors."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from agent.claims import rows as rowsmod
from agent.claims.errors import LedgerCorrupt, LedgerDamaged
from agent.claims.ledger import ClaimState, Ledger
from agent.claims.store import prepare
from agent.errors import AgentError, InvalidHostState
from agent.numa.state import HostState
from tests.claims.helpers import FakeClock, check_invariant, request, state_fn, topology

TOPO = topology(cells=2, cores_per_cell=4, threads=2, huge_2m=1024)
FN = state_fn(TOPO)


def settle(state_dir: Path) -> Path:
    """Fold the WAL into ledger.db (as after a clean stop) and return the file."""
    db = state_dir / "ledger.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return db


def ledger_with(tmp_path: Path, clock: FakeClock, n: int = 3) -> list:
    with Ledger.open(tmp_path, clock=clock) as led:
        made = [led.claim(f"m{i}", request(2, 512), "src", 600, FN) for i in range(n)]
    settle(tmp_path)
    return made


def pinned(claims) -> set[int]:
    out: set[int] = set()
    for c in claims:
        out |= c.placement.pinned_cpus
    return out


# --- item 1: a stale index page --------------------------------------------------------------------


def _index_root(db: Path, name: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0]
    finally:
        conn.close()


def test_stale_index_page_is_found_at_open_and_the_live_claim_kept(tmp_path):
    clock = FakeClock()
    with Ledger.open(tmp_path, clock=clock) as led:
        led.claim("old", request(2, 512), "src", 600, FN)
        led.release("old", "done")
    db = settle(tmp_path)
    page = 4096
    root = _index_root(db, "claims_state")
    stale = db.read_bytes()[(root - 1) * page : root * page]  # the index before "a" was claimed
    with Ledger.open(tmp_path, clock=clock) as led:
        a = led.claim("a", request(2, 512), "src", 600, FN)
    settle(tmp_path)
    data = bytearray(db.read_bytes())
    data[(root - 1) * page : root * page] = stale
    db.write_bytes(bytes(data))
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA quick_check").fetchall() == [("ok",)]  # what the open used to check
    hidden = raw.execute("SELECT migration_id FROM claims WHERE state IN ('held', 'migrating')").fetchall()
    raw.close()
    assert hidden == []  # the indexed query no longer sees the held claim
    with Ledger.open(tmp_path, clock=clock, on_corrupt="salvage") as led:
        assert led.recovered_from_corrupt is not None
        assert [c.migration_id for c in led.live_claims()] == ["a"]
        assert led.get("a").placement == a.placement
        assert led.damage is not None and led.damage.refusing_new_claims
        with pytest.raises(LedgerDamaged):
            led.claim("b", request(2, 512), "src", 600, FN)
        led.accept_damage("test: host checked")
        b = led.claim("b", request(2, 512), "src", 600, FN)
        assert not (b.placement.pinned_cpus & a.placement.pinned_cpus)
        check_invariant(TOPO, led.live_claims())


# --- items 2 and 4: never start empty silently -------------------------------------------------------


def _scribble(db: Path, every: int = 997) -> None:
    data = bytearray(db.read_bytes())
    for off in range(4096 + 100, len(data), every):
        data[off : off + 8] = b"\xff" * 8
    db.write_bytes(bytes(data))


def test_corrupt_ledger_is_never_followed_by_a_silent_empty_one(tmp_path, caplog):
    clock = FakeClock()
    ledger_with(tmp_path, clock)
    _scribble(tmp_path / "ledger.db")
    with pytest.raises(LedgerCorrupt) as ei:
        Ledger.open(tmp_path, clock=clock)  # the default: refused once, moved aside
    assert ei.value.moved_to is not None
    # the next open (the agent's retry, or an operator's command) salvages: loudly, and holding
    with caplog.at_level(logging.ERROR, logger="compute_agent.claims"):
        led = Ledger.open(tmp_path, clock=clock)
    with led:
        assert "DAMAGED" in caplog.text and "NEW CLAIMS REFUSED" in caplog.text
        damage = led.damage
        assert damage is not None and damage.refusing_new_claims
        assert damage.hold_until == pytest.approx(clock.t + 7200)
        assert damage.records[-1].moved_to == str(ei.value.moved_to)
        with pytest.raises(LedgerDamaged, match="accept-damage") as refused:
            led.claim("new", request(2, 512), "src", 600, FN)
        assert refused.value.hold_until == damage.hold_until
        assert damage.to_json()["refusing_new_claims"] is True and "REFUSED" in damage.summary
    # the hold is durable: a restart does not lift it
    with Ledger.open(tmp_path, clock=clock) as led:
        assert led.damage.refusing_new_claims
        clock.advance(7200)  # the longest a lost claim could still matter
        assert not led.damage.refusing_new_claims
        assert led.claim("new", request(2, 512), "src", 600, FN).state is ClaimState.HELD


def test_salvage_keeps_every_readable_claim_and_its_cpus(tmp_path):
    clock = FakeClock()
    made = ledger_with(tmp_path, clock, n=3)
    db = tmp_path / "ledger.db"
    root = _index_root(db, "transitions")
    data = bytearray(db.read_bytes())
    data[(root - 1) * 4096 : root * 4096] = b"\xa5" * 4096  # the history is lost, the claims are not
    db.write_bytes(bytes(data))
    with Ledger.open(tmp_path, clock=clock, on_corrupt="salvage") as led:
        assert [c.migration_id for c in led.live_claims()] == ["m0", "m1", "m2"]
        for c in made:
            assert led.get(c.migration_id).placement == c.placement
        assert led.transitions("m0") == []
        damage = led.damage
        assert damage is not None and damage.refusing_new_claims
        rec = damage.records[-1]
        assert (rec.salvaged, rec.live_salvaged) == (3, 3) and rec.unreadable > 0
        check_invariant(TOPO, led.live_claims())


def test_zero_length_ledger_is_damage_not_a_new_ledger(tmp_path):
    clock = FakeClock()
    ledger_with(tmp_path, clock)
    (tmp_path / "ledger.db").write_bytes(b"")
    (tmp_path / "ledger.db-wal").unlink(missing_ok=True)
    with pytest.raises(LedgerCorrupt, match="zero length"):
        Ledger.open(tmp_path, clock=clock)
    with Ledger.open(tmp_path, clock=clock) as led:
        assert led.damage is not None and led.damage.refusing_new_claims
        with pytest.raises(LedgerDamaged):
            led.claim("x", request(2, 512), "src", 600, FN)


def test_missing_ledger_next_to_its_wal_is_damage(tmp_path):
    clock = FakeClock()
    with Ledger.open(tmp_path, clock=clock) as led:
        led.claim("m", request(2, 512), "src", 600, FN)
        (tmp_path / "ledger.db").rename(tmp_path / "elsewhere.db")  # the WAL stays behind
    with Ledger.open(tmp_path, clock=clock) as led:
        assert led.damage is not None and led.damage.refusing_new_claims
        assert "missing" in led.damage.records[-1].detail


def test_first_start_is_not_damage_and_no_empty_file_is_left_half_made(tmp_path):
    with Ledger.open(tmp_path / "new") as led:
        assert led.damage is None and led.claim("m", request(), "s", 60, FN)
    assert not list((tmp_path / "new").glob("ledger.db.rebuild*"))


def test_accept_damage_is_recorded_durably(tmp_path):
    clock = FakeClock()
    ledger_with(tmp_path, clock)
    (tmp_path / "ledger.db").write_bytes(b"not a database at all" * 300)
    with Ledger.open(tmp_path, clock=clock, on_corrupt="salvage") as led:
        with pytest.raises(AgentError):
            led.accept_damage("  ")
        status = led.accept_damage("operator (uid 0): checked virsh list")
        assert status is not None and not status.refusing_new_claims
        assert "accepted" in status.summary
    with Ledger.open(tmp_path, clock=clock) as led:
        rec = led.damage.records[-1]
        assert rec.accepted_by == "operator (uid 0): checked virsh list" and rec.accepted_at == clock.t
        led.claim("x", request(2, 512), "src", 600, FN)


# --- item 3: damage inside a row ---------------------------------------------------------------------


def _flip_digit_in_placement(db: Path) -> None:
    data = bytearray(db.read_bytes())
    at = data.find(b'"host_cell":0')
    assert at > 0
    data[at + len(b'"host_cell":')] = ord("1")
    db.write_bytes(bytes(data))


def test_flipped_digit_in_a_stored_placement_is_found_by_its_checksum(tmp_path):
    clock = FakeClock()
    ledger_with(tmp_path, clock, n=1)
    db = tmp_path / "ledger.db"
    _flip_digit_in_placement(db)
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]  # invisible to SQLite
    raw.close()
    with Ledger.open(tmp_path, clock=clock, on_corrupt="salvage") as led:
        damage = led.damage
        assert damage is not None and damage.refusing_new_claims
        assert "checksum" in damage.records[-1].detail
        assert led.list_claims() == []  # the bad row is not data


def test_row_changed_while_open_is_never_used(tmp_path):
    clock = FakeClock()
    with Ledger.open(tmp_path, clock=clock) as led:
        a = led.claim("a", request(2, 512), "src", 600, FN)
        led.claim("b", request(2, 512), "src", 600, FN)
        led._conn.execute("UPDATE claims SET expires_at = expires_at + 1 WHERE migration_id = 'a'")
        assert [c.migration_id for c in led.list_claims()] == ["b"]  # skipped, reported
        assert [str(b) for b in led.unreadable_rows] == ["claims row 'a': checksum mismatch (the row changed on disk)"]
        with pytest.raises(LedgerCorrupt, match="'a'"):
            led.get("a")
        with pytest.raises(LedgerCorrupt):
            led.live_claims()
        with pytest.raises(LedgerCorrupt):  # a claim never fits around a row it cannot read
            led.claim("c", request(2, 512), "src", 600, FN)
        assert led.damage is not None and led.damage.seen_while_running
    with Ledger.open(tmp_path, clock=clock, on_corrupt="salvage") as led:  # the reopen salvages
        assert [c.migration_id for c in led.live_claims()] == ["b"]
        assert led.damage.refusing_new_claims and a.migration_id not in {c.migration_id for c in led.list_claims()}


def test_damage_met_in_use_is_found_by_verify_at_each_reconcile(tmp_path):
    """A state damaged after open (here: no longer a live state) hides the claim from the state
    query; `verify` (run by every reconcile) scans the table itself and stops new claims."""
    with Ledger.open(tmp_path) as led:
        led.claim("a", request(2, 512), "src", 600, FN)
        assert led.verify() is None
        led._conn.execute("PRAGMA ignore_check_constraints=ON")
        led._conn.execute("UPDATE claims SET state = 'hel\x64x' WHERE migration_id = 'a'")
        led.reconcile([])
        assert led.damage is not None and led.damage.refusing_new_claims and "'a'" in led.damage.summary
        with pytest.raises(LedgerCorrupt, match="'a'"):
            led.claim("c", request(2, 512), "src", 600, FN)
    with Ledger.open(tmp_path, on_corrupt="salvage") as led:  # the reopen salvages, and holds
        assert led.damage.refusing_new_claims


def test_upgrade_gives_old_rows_their_checksums(tmp_path):
    from agent.claims.store import MIGRATIONS

    with Ledger.open(tmp_path / "src") as led:
        c = led.claim("a", request(2, 512), "src", 600, FN)
        row = led._conn.execute(f"SELECT {', '.join(rowsmod.CLAIM_COLUMNS)} FROM claims").fetchone()
    conn = sqlite3.connect(tmp_path / "ledger.db")  # a v2 ledger, as the previous release wrote it
    for stmt in MIGRATIONS[0] + MIGRATIONS[1]:
        conn.execute(stmt)
    conn.execute(f"INSERT INTO claims ({', '.join(rowsmod.CLAIM_COLUMNS)}) VALUES ({', '.join('?' * 11)})", row)
    conn.execute(
        "INSERT INTO transitions (migration_id, from_state, to_state, at, reason) VALUES ('a', NULL, 'held', 1, 'x')"
    )
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    with Ledger.open(tmp_path) as led:
        assert led.damage is None and led.get("a") == c and len(led.transitions("a")) == 1
        sums = led._conn.execute("SELECT row_sum FROM claims UNION ALL SELECT row_sum FROM transitions").fetchall()
        assert all(len(s) == 32 for (s,) in sums)
        assert led.verify() is None


# --- item 5: undecodable text --------------------------------------------------------------------------


def test_undecodable_text_is_never_a_unicode_error(tmp_path):
    conn = prepare(sqlite3.connect(":memory:"))
    assert conn.execute("SELECT CAST(x'ff41' AS TEXT)").fetchone()[0] == "\ufffdA"
    clock = FakeClock()
    with Ledger.open(tmp_path, clock=clock) as led:
        led.claim("old", request(2, 512), "src", 600, FN)
        led.release("old", "done")
    db = settle(tmp_path)
    root = _index_root(db, "claims_state")
    stale = db.read_bytes()[(root - 1) * 4096 : root * 4096]
    ledger_with(tmp_path, clock, n=2)
    data = bytearray(db.read_bytes())
    data[(root - 1) * 4096 : root * 4096] = stale  # integrity_check will name this index...
    at = data.find(b"claims_state")
    while at >= 0:
        data[at + 7] = 0xFF  # ...whose name is no longer UTF-8
        at = data.find(b"claims_state", at + 1)
    db.write_bytes(bytes(data))
    raw = sqlite3.connect(db)
    with pytest.raises((UnicodeDecodeError, sqlite3.OperationalError)):
        raw.execute("PRAGMA integrity_check").fetchall()  # what crashed every command before
    raw.close()
    with pytest.raises(LedgerCorrupt, match="integrity_check"):
        Ledger.open(tmp_path, clock=clock, readonly=True)
    with Ledger.open(tmp_path, clock=clock, on_corrupt="salvage") as led:
        assert "\ufffd" in led.damage.records[-1].detail and led.damage.refusing_new_claims
        assert {c.migration_id for c in led.live_claims()} == {"m0", "m1"}


# --- item 6: rows are checked before they are stored ------------------------------------------------------


def test_negative_cell_ids_are_refused_before_anything_is_stored(tmp_path):
    doc = TOPO.to_json() if hasattr(TOPO, "to_json") else None
    if doc is None:
        pytest.skip("HostTopology has no to_json")
    for cell in doc["cells"]:
        if cell["id"] == 0:
            cell["id"] = -1
    from agent.numa.topology import HostTopology

    try:
        topo = HostTopology.from_json(doc)
    except AgentError:
        return  # refused at the edge already: nothing can reach the ledger
    with Ledger.open(tmp_path) as led:
        with pytest.raises(InvalidHostState, match="-1"):
            led.claim("m", request(2, 512), "src", 600, lambda claims: HostState(topology=topo))
        assert led.list_claims() == []


def test_invalid_row_values_are_refused_before_storing(tmp_path):
    with Ledger.open(tmp_path) as led:
        for bad_ttl in (float("nan"), -5):
            with pytest.raises(AgentError):
                led.claim("m", request(2, 512), "src", bad_ttl, FN)
        assert led.list_claims() == []
    assert rowsmod.claim_row_problem(("m", "u", "s", "{}", "{}", "held", 1.0, 2.0, 1.0, None, -1.0))
    assert rowsmod.claim_row_problem(("m", "u", "s", "{}", "{}", "bogus", 1.0, 2.0, 1.0, None, 1.0))
    assert rowsmod.claim_row_problem(("m", b"u", "s", "{}", "{}", "held", 1.0, 2.0, 1.0, None, 1.0))
    assert rowsmod.claim_row_problem(("m", "u", "s", "{}", "{}", "held", 1.0, 2.0, 1.0, None, 1.0)) is None


def test_bad_stored_row_is_named_and_skipped_by_list_and_show(tmp_path):
    import argparse
    import io
    import json

    from agent.claims.cli import add_claims_parser

    with Ledger.open(tmp_path) as led:
        led.claim("good", request(2, 512), "src", 600, FN)
        led.claim("bad", request(2, 512), "src", 600, FN)
        # a placement with host cell -1, stored with a valid checksum (as an old agent could have)
        row = led._conn.execute("SELECT * FROM claims WHERE migration_id = 'bad'").fetchone()
        doc = json.loads(row[4])
        doc["cells"][0]["host_cell"] = -1
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        values = list(row[:11])
        values[4] = text
        led._conn.execute(
            "UPDATE claims SET placement_json = ?, row_sum = ? WHERE migration_id = 'bad'",
            (text, rowsmod.row_sum(values)),
        )
    parser = argparse.ArgumentParser()
    add_claims_parser(parser.add_subparsers())
    for argv, code in ((["list"], 0), (["--json", "list"], 0), (["show", "bad"], 1), (["show", "good"], 0)):
        args = parser.parse_args(["claims", "--state-dir", str(tmp_path), *argv])
        out, err = io.StringIO(), io.StringIO()
        assert args.func(args, out, err) == code, (argv, err.getvalue())
        if argv == ["list"]:
            assert "good" in out.getvalue() and "'bad'" in out.getvalue() and "damaged row" in out.getvalue()
        if code == 1:
            assert "'bad'" in err.getvalue() and "Traceback" not in err.getvalue()


# --- found by the damage campaign ------------------------------------------------------------------


def _crash_copy(tmp_path: Path, names: tuple[str, ...] = ("ledger.db", "ledger.db-wal")) -> Path:
    """A ledger whose last commits are only in its WAL (copied while open, as a crash leaves it)."""
    src = tmp_path / "src"
    led = Ledger.open(src)
    for i in range(4):
        led.claim(f"m{i}", request(2, 512), "src", 600, FN)
    crash = tmp_path / "crash"
    crash.mkdir()
    for name in names:
        (crash / name).write_bytes((src / name).read_bytes())
    led.close()
    return crash


def test_damaged_wal_frame_hiding_later_commits_is_damage(tmp_path):
    """SQLite stops replaying the WAL at a bad frame and drops the commits behind it silently."""
    from agent.claims.walcheck import wal_damage

    crash = _crash_copy(tmp_path)
    wal = crash / "ledger.db-wal"
    assert wal_damage(wal) is None
    data = bytearray(wal.read_bytes())
    data[32 + 24 + 100] ^= 0x10  # inside the first frame's page
    wal.write_bytes(bytes(data))
    assert "later commit" in (wal_damage(wal) or "")
    with Ledger.open(crash, on_corrupt="salvage") as led:
        assert led.damage is not None and led.damage.refusing_new_claims
        assert "ledger.db-wal" in led.damage.records[-1].detail


def test_torn_last_wal_frame_is_not_damage(tmp_path):
    from agent.claims.walcheck import wal_damage

    crash = _crash_copy(tmp_path)
    wal = crash / "ledger.db-wal"
    wal.write_bytes(wal.read_bytes()[:-100])
    assert wal_damage(wal) is None
    with Ledger.open(crash) as led:
        assert led.damage is None and len(led.live_claims()) == 3  # the torn last commit never returned


def test_renamed_column_in_damaged_schema_text_is_damage(tmp_path):
    """integrity_check accepts a schema whose text names another column: compared with ours."""
    ledger_with(tmp_path, FakeClock(), n=1)
    db = tmp_path / "ledger.db"
    data = db.read_bytes()
    at = data.find(b"accepted_by")
    db.write_bytes(data[:at] + b"acceptxd_by" + data[at + 11 :])
    with pytest.raises(LedgerCorrupt, match="schema differs"):
        Ledger.open(tmp_path, readonly=True)
    with Ledger.open(tmp_path, on_corrupt="salvage") as led:
        assert led.damage is not None and [c.migration_id for c in led.live_claims()] == ["m0"]


def test_damaged_last_commit_is_found_through_the_wal_index(tmp_path):
    """A damaged frame of the last transaction hides no later commit; the -shm the writer left says
    it was committed (it is updated only after the frames are written)."""
    from agent.claims.walcheck import wal_damage

    crash = _crash_copy(tmp_path, ("ledger.db", "ledger.db-wal", "ledger.db-shm"))
    wal = crash / "ledger.db-wal"
    assert wal_damage(wal) is None
    data = bytearray(wal.read_bytes())
    data[-200] ^= 0x01  # inside the last frame: the last commit
    wal.write_bytes(bytes(data))
    assert "committed frame" in (wal_damage(wal) or "")
    (crash / "ledger.db-shm").unlink()  # after a reboot: no index, no evidence (documented)
    assert wal_damage(wal) is None
