"""Ledgers filled for scale tests and benchmarks (tests/claims/test_scale.py, bench/claims_bench.py)."""

from __future__ import annotations

from pathlib import Path

from agent.claims.ledger import Ledger
from agent.claims.rows import CLAIM_COLUMNS
from agent.testing.builders import request, state_fn, topology

__all__ = ["fill_ledger"]


def fill_ledger(state_dir: Path, n: int, *, live_every: int = 400, now: float = 1_000_000.0) -> None:
    """A ledger with `n` claims, fast (about a second for 20,000): one real claim is stored through
    the ledger, then copied `n` times by one SQL statement, every copy's checksum computed by the
    ledger's own claim_sum. One claim in `live_every` is held, the others released."""

    cols = ", ".join(CLAIM_COLUMNS)
    with Ledger.open(state_dir, clock=lambda: now) as led:
        led.claim("proto", request(2, 512), "src", 600, state_fn(topology()))
        conn = led._conn
        assert conn is not None, "a ledger just opened read-write has a connection"
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            f"""WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i + 1 < ?)
            INSERT INTO claims ({cols}, row_sum)
            SELECT printf('m%06d', i), printf('00000000-0000-4000-8000-%012d', i), source_host, request_json,
                   placement_json, CASE WHEN i % ? = 0 THEN 'held' ELSE 'released' END,
                   created_at + i, expires_at + i, updated_at + i, reason, ttl_s, ''
            FROM seq, claims WHERE migration_id = 'proto'""",
            (n, live_every),
        )
        conn.execute("DELETE FROM claims WHERE migration_id = 'proto'")
        conn.execute(f"UPDATE claims SET row_sum = claim_sum({cols})")
        conn.execute("COMMIT")
