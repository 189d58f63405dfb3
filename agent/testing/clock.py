"""One fake clock: a callable that returns a time only the test moves, and a `sleep` that advances it.

The agent takes its clock and sleep as arguments (the ledger's `clock=`, the migration runner's
`clock=` and `sleep=`), so a test that hands it a FakeClock decides every instant and never waits::

    clock = FakeClock(0.0)
    runner = MigrationRunner(conn, cfg, clock=clock, sleep=clock.sleep, connect=connect)
    clock.advance(60)  # or set clock.t directly

A sleep loop that never ends would hang the test; `sleep` refuses to go on past `max_sleep_s` of
fake time slept in total and raises RuntimeError instead.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_START",
    "RUNAWAY_SLEEP_S",
    "FakeClock",
]

# Starts far from 0 so that a time of 0 (a default, "never") can not pass for a real instant.
DEFAULT_START = 1_000_000.0
# 100,000 fake seconds (about 28 hours) is beyond any schedule the tests drive (migration
# timeouts are minutes); a loop that gets there is not ending.
RUNAWAY_SLEEP_S = 100_000.0


class FakeClock:
    """Time that moves only by `advance`, `sleep` or assignment to `t`."""

    def __init__(self, t: float = DEFAULT_START, *, max_sleep_s: float = RUNAWAY_SLEEP_S) -> None:
        self.t = t
        self.slept = 0.0
        self.max_sleep_s = max_sleep_s

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s

    def sleep(self, dt: float) -> None:
        """Advance by `dt`, as time.sleep would have taken; RuntimeError past `max_sleep_s` in total."""
        self.t += dt
        self.slept += dt
        if self.slept > self.max_sleep_s:
            raise RuntimeError("fake clock ran away: the monitor never ended")
