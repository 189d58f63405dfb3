"""The udev watcher: a real kernel uevent reaches the callback; the debounce on a fake clock."""

import errno
import glob
import queue
import threading
import time

import pytest

from agent.daemon.errors import HotplugWatchError
from agent.daemon.hotplug import LOST_EVENTS, Debouncer, HotplugWatcher, TopologyEvent

CPU = TopologyEvent("cpu", "change", "cpu0")
MEM = TopologyEvent("memory", "online", "memory7")


# --- the debounce, on a fake clock ----------------------------------------------------------------


def test_events_close_together_make_one_batch():
    d = Debouncer(quiet_s=0.5, max_wait_s=5)
    assert d.timeout(0.0) is None
    d.add(CPU, 0.0)
    d.add(MEM, 0.3)
    assert d.timeout(0.3) == pytest.approx(0.5)
    assert d.take_due(0.79) == ()
    d.add(CPU, 0.6)
    assert d.take_due(1.09) == ()
    assert d.take_due(1.1) == (CPU, MEM, CPU)
    assert d.timeout(1.2) is None and d.take_due(9.0) == ()


def test_a_storm_is_still_reported_at_max_wait():
    d = Debouncer(quiet_s=0.5, max_wait_s=2)
    batches = []
    for tick in range(30):  # an event every 0.2 s for 6 s: never quiet for 0.5 s
        now = tick * 0.2
        d.add(CPU, now)
        if batch := d.take_due(now):
            batches.append((round(now, 1), len(batch)))
    assert batches == [(2.0, 11), (4.2, 11)]


def test_max_wait_shorter_than_quiet_is_raised_to_quiet():
    d = Debouncer(quiet_s=1.0, max_wait_s=0.1)
    d.add(CPU, 0.0)
    assert d.timeout(0.0) == 1.0


# --- the watcher, with real uevents ---------------------------------------------------------------


def trigger_uevent(pattern: str = "cpu/cpu[0-9]*") -> str:
    paths = sorted(glob.glob(f"/sys/devices/system/{pattern}/uevent"))
    for path in paths:
        try:
            with open(path, "w") as fh:
                fh.write("change")  # harmless: udev re-runs the CPU's rules
            return path
        except OSError as exc:
            reason = f"{path}: {exc}"
    pytest.skip(f"cannot trigger a {pattern} uevent here ({reason if paths else 'no CPU in sysfs'})")


@pytest.fixture
def watcher():
    batches: queue.Queue = queue.Queue()
    w = HotplugWatcher(batches.put, debounce_s=0.05)
    w.start()
    yield w, batches
    w.stop()


def test_a_real_cpu_uevent_reaches_the_callback_within_2s(watcher):
    w, batches = watcher
    started = time.monotonic()
    path = trigger_uevent()
    batch = batches.get(timeout=2)
    latency = time.monotonic() - started
    cpu = path.split("/")[-2]
    assert TopologyEvent("cpu", "change", cpu) in batch
    assert latency < 2.0
    print(f"uevent -> callback: {latency * 1000:.1f} ms (debounce 50 ms, source {w.source})")


@pytest.mark.parametrize("subsystem, pattern", [("node", "node/node[0-9]*"), ("memory", "memory/memory[0-9]*")])
def test_node_and_memory_uevents_are_watched_too(watcher, subsystem, pattern):
    _, batches = watcher
    path = trigger_uevent(pattern)
    batch = batches.get(timeout=2)
    assert TopologyEvent(subsystem, "change", path.split("/")[-2]) in batch


def test_stop_ends_the_thread_and_a_restart_works():
    w = HotplugWatcher(lambda batch: None, debounce_s=0.05)
    before = threading.active_count()
    w.start()
    with pytest.raises(HotplugWatchError, match="already running"):
        w.start()
    w.stop()
    assert threading.active_count() == before
    w.start()
    w.stop()
    w.stop()  # idempotent


def test_a_failing_callback_does_not_end_the_watch(caplog):
    calls: queue.Queue = queue.Queue()

    def broken(batch):
        calls.put(batch)
        raise RuntimeError("bug in the callback")

    w = HotplugWatcher(broken, debounce_s=0.02)
    w.start()
    try:
        trigger_uevent()
        calls.get(timeout=2)
        trigger_uevent()
        calls.get(timeout=2)
    finally:
        w.stop()
    assert "topology change callback failed" in caplog.text


class OverflowedMonitor:
    """A monitor whose socket overflowed: the kernel dropped uevents (ENOBUFS)."""

    def poll(self, timeout):
        raise OSError(errno.ENOBUFS, "No buffer space available")


def test_lost_uevents_still_report_a_change(caplog):
    batches = []
    w = HotplugWatcher(batches.append, debounce_s=0.5, clock=lambda: 10.0)
    w._drain(OverflowedMonitor())
    assert "uevents lost" in caplog.text
    w._deliver(w._debouncer.take_due(10.4))
    assert batches == []
    w._deliver(w._debouncer.take_due(10.5))
    assert batches == [(LOST_EVENTS,)]


def test_an_unknown_source_is_a_typed_error():
    with pytest.raises(HotplugWatchError, match="nonsense"):
        HotplugWatcher(lambda batch: None, source="nonsense").start()
