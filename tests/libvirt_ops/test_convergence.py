"""The pure convergence rules (agent.libvirt_ops.convergence): exhaustive and property tests."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.libvirt_ops.convergence import (
    MiB,
    Situation,
    StallDetector,
    TransferRate,
    Watermark,
    dirty_rate_bps,
    eta_s,
    judge,
    next_downtime_step,
    predict_precopy,
)

STEPS = ((0.0, 100), (10.0, 175), (20.0, 250))


def situation(**kw) -> Situation:
    base = dict(
        phase="precopy",
        elapsed_s=5.0,
        remaining=100 * MiB,
        transfer_bps=30.0 * MiB,
        dirty_bps=10.0 * MiB,
        stalled=False,
        postcopy_armed=False,
        postcopy_switch="on_timeout",
        timeout_s=60.0,
        timeout_action="abort",
        timeout_fired=False,
        steps=STEPS,
    )
    base.update(kw)
    return Situation(**base)


# --- watermark -------------------------------------------------------------------------------------


def test_watermark_example():
    w = Watermark()
    seen = []
    for remaining in (40, 70, 20, 90):
        w = w.observe(100, remaining)
        seen.append(w.percent)
    assert seen == [60.0, 60.0, 80.0, 80.0]
    assert Watermark().percent == 0.0 and Watermark().observe(0, 5).percent == 0.0


@given(st.lists(st.tuples(st.integers(0, 1 << 40), st.integers(0, 1 << 40)), max_size=40))
def test_watermark_percent_never_goes_down_and_stays_in_range(samples):
    w, last = Watermark(), 0.0
    for total, remaining in samples:
        w = w.observe(total, remaining)
        assert 0.0 <= w.percent <= 100.0
        assert w.percent >= last
        last = w.percent


# --- rates and ETA ---------------------------------------------------------------------------------


def test_transfer_rate_smooths_and_ignores_time_going_backwards():
    r = TransferRate().observe(0.0, 0).observe(1.0, 100 * MiB).observe(2.0, 200 * MiB)
    assert r.bps == pytest.approx(100 * MiB)
    spike = r.observe(3.0, 600 * MiB)  # one 400 MiB/s sample moves it only 30 %
    assert spike.bps == pytest.approx(0.3 * 400 * MiB + 0.7 * 100 * MiB)
    assert spike.observe(2.5, 700 * MiB).bps == spike.bps  # clock went back: no sample
    assert TransferRate().observe(1.0, 5).bps is None


@given(st.lists(st.tuples(st.floats(0, 1e6), st.integers(0, 1 << 40)), max_size=30))
def test_transfer_rate_is_never_negative(samples):
    r = TransferRate()
    for at, processed in samples:
        r = r.observe(at, processed)
        assert r.bps is None or r.bps >= 0


def test_eta():
    assert eta_s(100 * MiB, 30.0 * MiB, 10.0 * MiB) == 5.0
    assert eta_s(100 * MiB, 10.0 * MiB, 10.0 * MiB) is None  # dirtied as fast as sent
    assert eta_s(100 * MiB, None, 0) is None


def test_dirty_rate_bytes_from_pages():
    assert dirty_rate_bps({"memory_dirty_rate": 10}) == 40960
    assert dirty_rate_bps({"memory_dirty_rate": 10, "memory_page_size": 2 << 20}) == 20 << 20
    assert dirty_rate_bps({"memory_dirty_rate": "junk"}) == 0


# --- stall detector --------------------------------------------------------------------------------


def feed(det: StallDetector, samples):
    return [det.observe(t, it, mib * MiB) for t, (it, mib) in enumerate(samples)]


def test_stall_needs_iterations_and_an_old_low():
    samples = [(1, 400), (1, 100), (2, 64), (2, 40), (3, 64), (3, 30), (4, 64)] + [(4, 64)] * 6
    seen = feed(StallDetector(window_s=4), samples)
    # iterations say stalled from sample 6 (iteration 4 begins); the 30 MiB low was at t=5: 4 s later
    assert seen.index(True) == 9
    assert all(seen[9:])


def test_no_stall_while_new_lows_keep_coming():
    samples = [(2, 64), (3, 64), (4, 64)] + [(4, 63 - i) for i in range(20)]
    assert not any(feed(StallDetector(window_s=3), samples))


def test_no_stall_on_one_sample_or_in_the_first_pass():
    assert not any(feed(StallDetector(window_s=0), [(1, 500)] * 20))
    assert not any(feed(StallDetector(window_s=0), [(2, 64)]))


@given(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 512)), max_size=40))
def test_stall_never_on_a_new_low_nor_within_one_iteration(samples):
    ordered = sorted(samples, key=lambda s: s[0])  # iterations only go up
    seen = feed(StallDetector(window_s=2), ordered)
    for i, stalled in enumerate(seen):
        if stalled:  # a sample that reaches a new low is progress, never a stall
            assert ordered[i][1] >= min(m for _it, m in ordered[:i])
    assert not any(feed(StallDetector(window_s=0), [(3, m) for _i, m in samples]))


# --- verdict and next action -----------------------------------------------------------------------


def test_verdict_converging_with_eta_and_next_downtime_step():
    v = judge(situation())
    assert v.verdict == "converging" and v.eta_s == 5.0
    assert (v.next_action, v.next_action_in_s) == ("downtime step to 175 ms", 5.0)


def test_verdict_not_converging_says_why_and_the_timeout_comes_next():
    v = judge(situation(elapsed_s=25.0, dirty_bps=40.0 * MiB))
    assert v.verdict == "not converging" and "40.0 MiB/s" in v.why and "30.0 MiB/s" in v.why
    assert v.eta_s is None
    assert (v.next_action, v.next_action_in_s) == ("timeout action abort", 35.0)


def test_verdict_stalled_with_on_stall_switches_now():
    v = judge(situation(stalled=True, postcopy_armed=True, postcopy_switch="on_stall"))
    assert v.verdict == "not converging" and "not shrinking" in v.why
    assert (v.next_action, v.next_action_in_s) == ("switch to post-copy", 0.0)


def test_verdict_on_timeout_switch_is_the_timeout_action():
    v = judge(situation(elapsed_s=30.0, postcopy_armed=True))
    assert (v.next_action, v.next_action_in_s) == ("switch to post-copy", 30.0)


def test_verdict_unknown_before_a_rate_and_nothing_next_in_postcopy():
    assert judge(situation(transfer_bps=None)).verdict == "unknown"
    v = judge(situation(phase="postcopy"))
    assert v.verdict == "converging" and v.eta_s == 0.0 and v.next_action == "" and v.next_action_in_s is None
    assert judge(situation(timeout_fired=True, elapsed_s=30.0)).next_action == ""


def test_verdict_while_the_postcopy_stream_is_broken():
    v = judge(situation(phase="postcopy", postcopy_paused=True))
    assert v.verdict == "unknown" and "broken" in v.why and v.eta_s is None
    assert (v.next_action, v.next_action_in_s) == ("post-copy resume", 0.0)


def test_next_downtime_step():
    assert next_downtime_step(list(STEPS), 0.0) == (10.0, 175)
    assert next_downtime_step(list(STEPS), 20.0) is None


@given(
    st.sampled_from(["precopy", "postcopy", "paused-precopy"]),
    st.floats(0, 1e5),
    st.one_of(st.none(), st.floats(0, 1e10)),
    st.floats(0, 1e10),
    st.booleans(),
    st.booleans(),
    st.sampled_from(["on_stall", "on_timeout", "never"]),
    st.one_of(st.none(), st.floats(1, 1e5)),
    st.booleans(),
)
def test_judge_is_total(phase, elapsed, transfer, dirty, stalled, armed, switch, timeout, fired):
    v = judge(
        situation(
            phase=phase,
            elapsed_s=elapsed,
            transfer_bps=transfer,
            dirty_bps=dirty,
            stalled=stalled,
            postcopy_armed=armed,
            postcopy_switch=switch,
            timeout_s=timeout,
            timeout_fired=fired,
        )
    )
    assert v.verdict in ("converging", "not converging", "unknown")
    assert v.next_action_in_s is None or v.next_action_in_s >= 0
    assert (v.next_action == "") == (v.next_action_in_s is None)
    if v.verdict != "converging":
        assert v.eta_s is None and v.why


# --- pre-flight prediction -------------------------------------------------------------------------


def test_predict_docstring_example():
    p = predict_precopy(20.0 * MiB, 100.0 * MiB, 1 << 30, 500)
    assert p.converges and p.iterations == 2 and p.predicted_s == pytest.approx(12.3, abs=0.1)


def test_predict_testbed_hot_guest_does_not_converge():
    # agent/testing/testbed.py HOT_GUEST: ~20 MB/s dirtied over a 16 MiB/s link
    p = predict_precopy(19.0 * MiB, 16.0 * MiB, 256 * MiB, 1000)
    assert not p.converges and "cannot shrink" in p.why and p.dirty_share == pytest.approx(19 / 16)


def test_predict_unlimited_and_idle():
    assert predict_precopy(1e9, None, 1 << 30, 500).converges
    idle = predict_precopy(0.0, 10.0 * MiB, 1 << 30, 500)
    assert idle.converges and idle.iterations == 1


def test_predict_too_many_passes():
    p = predict_precopy(8.9 * MiB, 10.0 * MiB, 64 << 30, 100)
    assert not p.converges and "passes" in p.why


@given(st.floats(0, 1e10), st.floats(1, 1e10), st.integers(1, 1 << 42), st.integers(100, 100_000))
def test_predict_monotone_in_dirty_rate(dirty, bandwidth, memory, downtime):
    p = predict_precopy(dirty, bandwidth, memory, downtime)
    if p.converges:
        assert predict_precopy(dirty / 2, bandwidth, memory, downtime).converges
        assert p.iterations is not None and 1 <= p.iterations
    else:
        assert predict_precopy(dirty * 2 + 1, bandwidth, memory, downtime).converges is False
