"""Pure convergence rules of a live migration: schedules, progress, stall detection, verdict, prediction.

No libvirt, no clock, no I/O: every function takes the numbers it judges and returns a value, so the
monitor (``migration_monitor``) only collects samples and acts on what these rules say.

- ``downtime_steps`` / ``downtime_for``: Nova's linear max-downtime schedule.
- ``completion_timeout_s``: the completion timeout, per GiB of RAM.
- ``Watermark``: a percent that never goes down (best remaining-memory seen).
- ``TransferRate``: the transfer rate, smoothed over polls.
- ``ConvergenceTracker`` + ``StallDetector``: pre-copy is stalled when the dirty set stopped shrinking
  over iterations *and* remaining memory found no new local minimum for a while (never one sample).
- ``judge``: the verdict (converging / not converging, why) and the next action with its time.
- ``predict_precopy``: from a pre-flight dirty rate, whether pre-copy can converge at a bandwidth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal, Mapping

Phase = Literal["precopy", "postcopy", "paused-precopy"]
PostcopySwitch = Literal["on_stall", "on_timeout", "never"]
VerdictName = Literal["converging", "not converging", "unknown"]

MiB = 1 << 20
PAGE_SIZE = 4096  # bytes; jobStats' memory_dirty_rate is in pages of memory_page_size (absent: 4 KiB)

# a stalled pre-copy: an iteration's dirty set shrank by less than this fraction
NOT_CONVERGING_MIN_SHRINK = 0.10
# weight of the newest sample in the smoothed transfer rate: ~5 polls of memory, one outlier moves it 30 %
RATE_SMOOTHING = 0.3
# pre-flight: pre-copy converges only when the guest dirties less than this share of the bandwidth
# (the rest of the link is what shrinks the dirty set; 0.9 leaves room for measurement error)
PREDICT_MAX_DIRTY_SHARE = 0.9
# pre-flight: at most this many pre-copy passes are predicted (QEMU gives up converging long before)
PREDICT_MAX_ITERATIONS = 30


# --- progress value --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MigrationProgress:
    """One poll of a running migration, as the progress callback (and the events) see it."""

    phase: Phase
    percent: float  # 0..100, never goes down during a run (best remaining-memory watermark)
    memory_total: int  # bytes
    memory_processed: int  # bytes sent so far (can exceed total: pages are resent)
    memory_remaining: int  # bytes
    dirty_rate_pps: int  # pages dirtied per second (memory_dirty_rate)
    iteration: int  # memory_iteration: 1 = first pass over RAM
    max_downtime_ms: int  # the max downtime currently set (0 = not set yet)
    throttle_pct: int  # auto_converge_throttle
    elapsed_s: float
    dirty_rate_bps: int = 0  # bytes dirtied per second (pages/s x page size)
    transfer_rate_bps: int = 0  # smoothed bytes sent per second (0 = not measured yet)
    eta_s: float | None = None  # None: not converging or not known yet
    verdict: VerdictName = "unknown"
    verdict_why: str = ""
    next_action: str = ""  # e.g. "downtime step to 140 ms", "switch to post-copy", "timeout action abort"
    next_action_in_s: float | None = None  # 0 = now; None = nothing scheduled
    memory_bps: int = 0  # libvirt's own memory transfer bandwidth (jobStats memory_bps; 0 = not reported)
    memory_page_size: int = PAGE_SIZE  # bytes per page of dirty_rate_pps (jobStats memory_page_size)


def _num(stats: Mapping[str, Any], key: str) -> int:
    try:
        return int(stats.get(key, 0) or 0)
    except (TypeError, ValueError):
        return 0


def dirty_rate_bps(stats: Mapping[str, Any]) -> int:
    """Bytes dirtied per second from jobStats' pages/s and page size."""
    return _num(stats, "memory_dirty_rate") * (_num(stats, "memory_page_size") or PAGE_SIZE)


def progress_from_stats(
    stats: Mapping[str, Any], *, phase: Phase, max_downtime_ms: int, elapsed_s: float
) -> MigrationProgress:
    """MigrationProgress from one ``jobStats()`` dict (missing keys count as 0); the percent of this
    sample alone (the monitor replaces it with the watermark's)."""
    total, processed, remaining = (_num(stats, k) for k in ("memory_total", "memory_processed", "memory_remaining"))
    if total > 0:
        done = total - remaining if "memory_remaining" in stats else processed
        percent = min(max(done * 100.0 / total, 0.0), 100.0)
    else:
        percent = 0.0
    return MigrationProgress(
        phase=phase,
        percent=round(percent, 2),
        memory_total=total,
        memory_processed=processed,
        memory_remaining=remaining,
        dirty_rate_pps=_num(stats, "memory_dirty_rate"),
        iteration=_num(stats, "memory_iteration"),
        max_downtime_ms=max_downtime_ms,
        throttle_pct=_num(stats, "auto_converge_throttle"),
        elapsed_s=round(elapsed_s, 3),
        dirty_rate_bps=dirty_rate_bps(stats),
        memory_bps=_num(stats, "memory_bps"),
        memory_page_size=_num(stats, "memory_page_size") or PAGE_SIZE,
    )


# --- schedules -------------------------------------------------------------------------------------


def _data_gib(memory_mb: int | float) -> float:
    """GiB of guest RAM to transfer, at least 1 (small guests still get sane delays)."""
    return max(float(memory_mb) / 1024.0, 1.0)


def downtime_steps(cfg: Any, memory_mb: int | float) -> list[tuple[float, int]]:
    """[(seconds after start, max downtime ms)], Nova's linear schedule.

    ``steps`` increases from ``downtime/steps`` to ``downtime`` (= live_migration_downtime_ms), one
    every ``live_migration_downtime_delay_s`` x GiB of RAM (min 1 GiB). E.g. 500 ms, 10 steps,
    75 s/GiB, 2 GiB: 0 s -> 50 ms, 150 s -> 95 ms, 300 s -> 140 ms, ..., 1500 s -> 500 ms.
    """
    downtime = cfg.live_migration_downtime_ms
    steps = max(int(cfg.live_migration_downtime_steps), 1)
    delay = cfg.live_migration_downtime_delay_s * _data_gib(memory_mb)
    base = downtime / steps
    offset = (downtime - base) / steps
    return [(delay * i, max(int(base + offset * i), 1)) for i in range(steps + 1)]


def downtime_for(steps: list[tuple[float, int]], elapsed_s: float) -> int | None:
    """The step value in force at `elapsed_s` (None before the first marker)."""
    value: int | None = None
    for at, ms in steps:
        if elapsed_s >= at:
            value = ms
    return value


def next_downtime_step(steps: list[tuple[float, int]], elapsed_s: float) -> tuple[float, int] | None:
    """The first step still to come after `elapsed_s`, or None when all are in force."""
    return next(((at, ms) for at, ms in steps if at > elapsed_s), None)


def completion_timeout_s(cfg: Any, memory_mb: int | float) -> float | None:
    """live_migration_completion_timeout_s x GiB of RAM (min 1 GiB); None = no timeout."""
    if cfg.live_migration_completion_timeout_s <= 0:
        return None
    return cfg.live_migration_completion_timeout_s * _data_gib(memory_mb)


# --- progress watermark and transfer rate ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Watermark:
    """The best (lowest) remaining memory seen: a percent that never goes down although every
    pre-copy iteration starts again with the dirty set. E.g. total 100, remaining 40, 70, 20:
    percent 60, 60, 80."""

    total: int = 0
    best_remaining: int | None = None

    def observe(self, total: int, remaining: int) -> Watermark:
        if total <= 0:
            return self
        best = remaining if self.best_remaining is None else min(self.best_remaining, remaining)
        return Watermark(total=max(total, self.total), best_remaining=max(best, 0))

    @property
    def percent(self) -> float:
        if self.total <= 0 or self.best_remaining is None:
            return 0.0
        return round(min(max((self.total - self.best_remaining) * 100.0 / self.total, 0.0), 100.0), 2)


@dataclass(frozen=True, slots=True)
class TransferRate:
    """Bytes sent per second, smoothed (exponential moving average over polls of memory_processed).
    E.g. 0 B at 0 s, 100 MiB at 1 s, 200 MiB at 2 s: 100 MiB/s."""

    at_s: float | None = None
    processed: int = 0
    bps: float | None = None

    def observe(self, at_s: float, processed: int) -> TransferRate:
        if self.at_s is None or at_s <= self.at_s or processed < self.processed:
            return TransferRate(at_s=at_s, processed=processed, bps=self.bps)
        sample = (processed - self.processed) / (at_s - self.at_s)
        bps = sample if self.bps is None else RATE_SMOOTHING * sample + (1 - RATE_SMOOTHING) * self.bps
        return TransferRate(at_s=at_s, processed=processed, bps=bps)


def eta_s(remaining: int, transfer_bps: float | None, dirty_bps: float) -> float | None:
    """Seconds until pre-copy sends the rest: remaining / (transfer - dirty); None when the guest
    dirties as fast as memory is sent (no end in sight) or the rate is unknown.
    E.g. 100 MiB left, 30 MiB/s sent, 10 MiB/s dirtied: 5 s."""
    if transfer_bps is None or transfer_bps <= dirty_bps:
        return None
    return round(max(remaining, 0) / (transfer_bps - dirty_bps), 1)


# --- stall detection -------------------------------------------------------------------------------


class ConvergenceTracker:
    """Judges pre-copy by iterations: not converging once the dirty set (the largest
    ``memory_remaining`` polled in an iteration) stopped shrinking by at least `min_shrink` between
    two observed iterations >= 2 (the first pass over RAM says nothing about convergence).

    Feed it every polled (memory_iteration, memory_remaining); ``observe`` returns True once stalled.
    """

    def __init__(self, min_shrink: float = NOT_CONVERGING_MIN_SHRINK) -> None:
        self.min_shrink = min_shrink
        self._current: int | None = None
        self._current_max = 0
        self._done: list[tuple[int, int]] = []  # (iteration, max remaining) of finished iterations
        self.stalled = False
        self.why = ""

    def observe(self, iteration: int, remaining: int) -> bool:
        if self.stalled:
            return True
        if iteration < 2:  # first pass over RAM: nothing to judge yet
            return False
        if self._current is not None and iteration == self._current:
            self._current_max = max(self._current_max, remaining)
        elif self._current is None or iteration > self._current:
            self._next_iteration(iteration, remaining)
        return self.stalled

    def _next_iteration(self, iteration: int, remaining: int) -> None:
        if self._current is not None:
            self._done.append((self._current, self._current_max))
        self._current, self._current_max = iteration, remaining
        if len(self._done) < 2:
            return
        (it_a, prev), (it_b, last) = self._done[-2], self._done[-1]
        if prev > 0 and last >= (1.0 - self.min_shrink) * prev:
            self.stalled = True
            self.why = (
                f"pre-copy not converging: dirty set {last >> 20} MiB at iteration {it_b} "
                f"vs {prev >> 20} MiB at iteration {it_a} (shrank < {self.min_shrink:.0%})"
            )


class StallDetector:
    """Pre-copy is stalled when both hold (so one odd sample never triggers an action):

    - over iterations: the dirty set stopped shrinking (``ConvergenceTracker``), and
    - over time: remaining memory found no new local minimum for `window_s` (as KubeVirt's
      progress timeout: a migration that still reaches new lows is making progress).

    E.g. window 4 s: remaining 64, 40, 64, 30, 64 MiB over iterations 2-4 stalls the tracker, but the
    detector waits until 4 s after the 30 MiB low.
    """

    def __init__(self, window_s: float, min_shrink: float = NOT_CONVERGING_MIN_SHRINK) -> None:
        self.window_s = window_s
        self.tracker = ConvergenceTracker(min_shrink)
        self._low: int | None = None
        self._low_at = 0.0
        self.stalled = False

    def observe(self, at_s: float, iteration: int, remaining: int) -> bool:
        if self._low is None or remaining < self._low:
            self._low, self._low_at = remaining, at_s
        self.tracker.observe(iteration, remaining)
        self.stalled = self.tracker.stalled and at_s - self._low_at >= self.window_s
        return self.stalled

    @property
    def why(self) -> str:
        if not self.stalled:
            return ""
        low = (self._low or 0) >> 20
        return f"{self.tracker.why}; no new low of remaining memory ({low} MiB) for {self.window_s:.0f} s"


# --- verdict and next action -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Situation:
    """What the verdict is judged on (one poll, already smoothed)."""

    phase: Phase
    elapsed_s: float
    remaining: int
    transfer_bps: float | None
    dirty_bps: float
    stalled: bool
    postcopy_armed: bool  # the policy armed post-copy (VIR_MIGRATE_POSTCOPY)
    postcopy_switch: PostcopySwitch
    timeout_s: float | None
    timeout_action: str
    timeout_fired: bool
    steps: tuple[tuple[float, int], ...]
    postcopy_paused: bool = False  # the post-copy stream broke: both sides wait for the resume


@dataclass(frozen=True, slots=True)
class Verdict:
    verdict: VerdictName
    why: str
    eta_s: float | None
    next_action: str
    next_action_in_s: float | None


def _mib_s(bps: float) -> str:
    return f"{bps / MiB:.1f} MiB/s"


def convergence_verdict(s: Situation) -> tuple[VerdictName, str]:
    """converging / not converging (with why) / unknown (rates not measured yet)."""
    if s.postcopy_paused:
        return "unknown", "post-copy stream broken: both sides wait paused for the resume"
    if s.phase == "postcopy":
        return "converging", "post-copy: the guest runs on the destination, the rest is pulled"
    if s.phase == "paused-precopy":
        return "converging", "guest paused: nothing is dirtied any more"
    rates = f"dirtied {_mib_s(s.dirty_bps)} vs sent {_mib_s(s.transfer_bps or 0)}"
    if s.stalled:
        return "not converging", f"dirty set not shrinking over iterations ({rates})"
    if s.transfer_bps is None:
        return "unknown", "transfer rate not measured yet"
    if s.dirty_bps >= s.transfer_bps:
        return "not converging", f"guest dirties memory as fast as it is sent ({rates})"
    return "converging", rates


def _timeout_step(s: Situation) -> tuple[str, float] | None:
    if s.timeout_s is None or s.timeout_fired:
        return None
    switch = s.postcopy_armed and s.postcopy_switch == "on_timeout"
    what = "switch to post-copy" if switch else f"timeout action {s.timeout_action}"
    return what, max(s.timeout_s - s.elapsed_s, 0.0)


def next_action(s: Situation, verdict: VerdictName) -> tuple[str, float | None]:
    """The next thing the monitor will do and in how many seconds (0 = now), ("", None) if none."""
    if s.postcopy_paused:
        return "post-copy resume", 0.0
    if s.phase != "precopy":
        return "", None
    if s.stalled and s.postcopy_armed and s.postcopy_switch == "on_stall":
        return "switch to post-copy", 0.0
    candidates: list[tuple[str, float]] = []
    step = next_downtime_step(list(s.steps), s.elapsed_s)
    if step is not None:
        candidates.append((f"downtime step to {step[1]} ms", step[0] - s.elapsed_s))
    timeout = _timeout_step(s)
    if timeout is not None:
        candidates.append(timeout)
    if not candidates:
        return "", None
    what, in_s = min(candidates, key=lambda c: c[1])
    return what, round(in_s, 1)


def judge(s: Situation) -> Verdict:
    verdict, why = convergence_verdict(s)
    eta = 0.0 if s.phase == "postcopy" else eta_s(s.remaining, s.transfer_bps, s.dirty_bps)
    if verdict != "converging":
        eta = None
    what, in_s = next_action(s, verdict)
    return Verdict(verdict=verdict, why=why, eta_s=eta, next_action=what, next_action_in_s=in_s)


def with_verdict(
    progress: MigrationProgress, v: Verdict, percent: float, transfer_bps: float | None
) -> MigrationProgress:
    return replace(
        progress,
        percent=percent,
        transfer_rate_bps=int(transfer_bps or 0),
        eta_s=v.eta_s,
        verdict=v.verdict,
        verdict_why=v.why,
        next_action=v.next_action,
        next_action_in_s=v.next_action_in_s,
    )


# --- pre-flight prediction -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConvergencePrediction:
    """Whether pre-copy is expected to converge, from a measured dirty rate and the bandwidth."""

    converges: bool
    why: str
    dirty_share: float | None  # dirty rate / bandwidth (None: unlimited bandwidth)
    iterations: int | None  # predicted pre-copy passes (None: does not converge / unknown)
    predicted_s: float | None  # predicted pre-copy time (None: does not converge / unknown)


def predict_precopy(
    dirty_bps: float, bandwidth_bps: float | None, memory_bytes: int, max_downtime_ms: int
) -> ConvergencePrediction:
    """Each pass sends what the previous one left, while the guest dirties `dirty_bps`: pass n
    leaves memory x r^n with r = dirty / bandwidth. Pre-copy converges when r stays under
    PREDICT_MAX_DIRTY_SHARE and the rest fits in the max downtime within PREDICT_MAX_ITERATIONS.
    E.g. 1 GiB, 100 MiB/s link, 20 MiB/s dirtied, 500 ms: r 0.2, 2 passes, about 12 s.
    Unlimited bandwidth (None or 0) is taken to converge (nothing to compare the rate with)."""
    if not bandwidth_bps:
        return ConvergencePrediction(True, "bandwidth unlimited: assumed to converge", None, None, None)
    share = max(dirty_bps, 0.0) / bandwidth_bps
    rates = f"guest dirties {_mib_s(dirty_bps)} at {_mib_s(bandwidth_bps)} bandwidth ({share:.0%})"
    if share >= PREDICT_MAX_DIRTY_SHARE:
        return ConvergencePrediction(False, f"{rates}: the dirty set cannot shrink", share, None, None)
    final = bandwidth_bps * max_downtime_ms / 1000.0
    passes = 1 if memory_bytes <= final or share == 0 else math.ceil(math.log(final / memory_bytes) / math.log(share))
    passes = max(passes, 1)
    if passes > PREDICT_MAX_ITERATIONS:
        return ConvergencePrediction(False, f"{rates}: needs {passes} passes", share, None, None)
    sent = memory_bytes * (1 - share**passes) / (1 - share)  # geometric series of the passes
    return ConvergencePrediction(True, f"{rates}: {passes} passes", share, passes, round(sent / bandwidth_bps, 1))
