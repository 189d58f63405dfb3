"""Crash safety: a process doing claims is SIGKILLed at random points, 50 times, on one ledger.

The child prints each migration id only AFTER `claim()` returned, i.e. after COMMIT returned with
``synchronous=FULL``: a printed id must therefore be in the ledger after the kill. The child claims
ids in a fixed order (r<run>-0, r<run>-1, ...), so at most ONE more id can exist than were printed:
the one whose transaction was in flight when the signal hit (it may have committed before its id
reached the pipe, or its print may have been cut mid-line). That one must be all or nothing: its
claim row and its creation transition are both there, with a readable placement, or neither is.
Anything else in the ledger for this run (two extra ids, a gap, half a claim) is a failure.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.claims.ledger import ClaimState, Ledger

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import sys
from agent.claims.ledger import Ledger
from tests.claims.helpers import request, state_fn, topology

state_dir, run = sys.argv[1], sys.argv[2]
topo = topology(cells=2, cores_per_cell=32, threads=2, huge_2m=0, memory_mb_per_cell=1 << 20)
fn = state_fn(topo)
led = Ledger.open(state_dir)
sys.stdout.write("READY\n"); sys.stdout.flush()
i = 0
while True:
    # ttl 1 s: claims expire inside later claims, so the small host never fills up
    led.claim(f"r{run}-{i}", request(1, 64, dedicated=False, page_kb=None), "src", 1, fn)
    sys.stdout.write(f"r{run}-{i}\n"); sys.stdout.flush()
    i += 1
"""

RUNS = 50


@pytest.mark.slow
def test_sigkill_during_claims_never_loses_or_tears_a_claim(tmp_path):
    rng = random.Random(1234)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    state_dir = tmp_path / "state"
    total_printed = 0
    in_flight_present = 0
    for run in range(RUNS):
        errlog = open(tmp_path / "child.err", "w+b")  # a file: a full stderr pipe would stall the child
        child = subprocess.Popen(
            [sys.executable, str(script), str(state_dir), str(run)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=errlog,
        )
        assert child.stdout is not None
        first = child.stdout.readline()
        assert first == b"READY\n", (tmp_path / "child.err").read_bytes()[-2000:]
        time.sleep(rng.uniform(0.0, 0.12))
        child.send_signal(signal.SIGKILL)
        # read through the same buffered file as readline() (communicate() would skip its buffer)
        rest = child.stdout.read()
        child.wait(30)
        errlog.close()
        err = (tmp_path / "child.err").read_bytes()
        assert child.returncode == -signal.SIGKILL, err.decode(errors="replace")[-2000:]
        lines = rest.split(b"\n")
        complete = [ln.decode() for ln in lines[:-1]]  # the last element is a partial line or b""
        printed = set(complete)
        assert complete == [f"r{run}-{i}" for i in range(len(complete))]
        total_printed += len(complete)

        db = state_dir / "ledger.db"
        with sqlite3.connect(db) as raw:
            assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        with Ledger.open(state_dir) as led:
            assert led.recovered_from_corrupt is None and led.corrupt_files == ()
            conn = led._conn
            ids = {
                r[0] for r in conn.execute("SELECT migration_id FROM claims WHERE migration_id LIKE ?", (f"r{run}-%",))
            }
            tids = {
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT migration_id FROM transitions WHERE migration_id LIKE ? AND from_state IS NULL",
                    (f"r{run}-%",),
                )
            }
            assert printed <= ids, f"run {run}: committed claims lost: {sorted(printed - ids)}"
            extra = ids - printed
            nxt = f"r{run}-{len(complete)}"
            assert extra <= {nxt}, f"run {run}: unexpected claims {sorted(extra)}"
            assert tids == ids, f"run {run}: claim rows {sorted(ids ^ tids)} without their transition"
            for mid in ids:
                c = led.get(mid)  # placement parses
                assert c.state in (ClaimState.HELD, ClaimState.EXPIRED)
                assert c.placement.cells
            in_flight_present += bool(extra)
        if run == 0:
            assert total_printed > 0, "the child never committed a claim: kill delays too short"
    # the kills landed at different points: some runs committed many claims
    assert total_printed > RUNS
    print(f"{RUNS} kills, {total_printed} acknowledged claims, {in_flight_present} in-flight claims committed")


@pytest.mark.parametrize("victim", ["-wal"])
def test_truncated_wal_tail_is_recovered_not_corrupt(tmp_path, victim):
    """A torn last WAL frame (power loss mid-write) is ignored by SQLite: the ledger opens fine."""
    from tests.claims.helpers import request, state_fn, topology

    fn = state_fn(topology(cells=2, cores_per_cell=8))
    led = Ledger.open(tmp_path)
    led.claim("a", request(1, 64), "s", 60, fn)
    led.claim("b", request(1, 64), "s", 60, fn)
    wal = tmp_path / ("ledger.db" + victim)
    data = wal.read_bytes()
    # copy the files while open (as a crash would leave them), tearing the WAL's last frame
    crash = tmp_path / "crash"
    crash.mkdir()
    (crash / "ledger.db").write_bytes((tmp_path / "ledger.db").read_bytes())
    (crash / ("ledger.db" + victim)).write_bytes(data[:-100])
    led.close()
    with Ledger.open(crash) as again:
        ids = [c.migration_id for c in again.list_claims()]
        assert ids in (["a"], ["a", "b"], [])  # a torn commit is all or nothing
        assert "a" in ids or ids == []
