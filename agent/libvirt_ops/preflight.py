"""Pre-flight: measure the guest's dirty rate with libvirt's dirty-rate calculation
(``virDomainStartDirtyRateCalc`` + the ``dirtyrate.*`` domain stats, libvirt >= 7.2) and predict
whether pre-copy converges at the configured bandwidth (``convergence.predict_precopy``).

A host or guest without the calculation (old libvirt/QEMU, a refused call) gets no report: the
migration goes on, the pre-flight is advice, never a gate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import libvirt

from agent.libvirt_ops.convergence import ConvergencePrediction, MiB, predict_precopy
from agent.libvirt_ops.errors import libvirt_error_details

# after the measuring period, poll the result this often and this many times (QEMU needs a moment
# to publish it; a calculation that never finishes must not hold the migration up)
_RESULT_POLL_S = 0.2
_RESULT_POLLS = 10


@dataclass(frozen=True, slots=True)
class PreflightReport:
    measured_s: int  # length of the calculation
    dirty_rate_bps: int  # bytes dirtied per second (libvirt reports MiB/s)
    bandwidth_bps: int | None  # the configured cap (None: unlimited)
    prediction: ConvergencePrediction


def measure_preflight(
    conn: Any,
    dom: Any,
    cfg: Any,
    *,
    memory_bytes: int,
    sleep: Callable[[float], None],
    log: logging.Logger,
) -> PreflightReport | None:
    seconds = int(cfg.live_migration_preflight_dirty_rate_s)
    if seconds <= 0 or not hasattr(dom, "startDirtyRateCalc") or not hasattr(conn, "domainListGetStats"):
        return None
    rate_mib = _measure(conn, dom, seconds, sleep, log)
    if rate_mib is None:
        return None
    bandwidth = cfg.live_migration_bandwidth_mib * MiB or None
    prediction = predict_precopy(rate_mib * MiB, bandwidth, memory_bytes, cfg.live_migration_downtime_ms)
    log.info("migration pre-flight: dirty rate %d MiB/s over %d s: %s", rate_mib, seconds, prediction.why)
    return PreflightReport(seconds, rate_mib * MiB, bandwidth, prediction)


def _measure(conn: Any, dom: Any, seconds: int, sleep: Callable[[float], None], log: logging.Logger) -> int | None:
    """MiB/s dirtied, None when the calculation is unavailable or gives no result."""
    try:
        dom.startDirtyRateCalc(seconds, 0)
    except libvirt.libvirtError as exc:
        log.info("migration pre-flight: no dirty-rate calculation: %s", libvirt_error_details(exc)[1])
        return None
    sleep(float(seconds))
    for _ in range(_RESULT_POLLS):
        stats = _dirtyrate_stats(conn, dom, log)
        if stats is None:
            return None
        if stats.get("dirtyrate.calc_status") == libvirt.VIR_DOMAIN_DIRTYRATE_MEASURED:
            return int(stats.get("dirtyrate.megabytes_per_second", 0) or 0)
        sleep(_RESULT_POLL_S)
    log.info("migration pre-flight: the dirty-rate calculation gave no result in time")
    return None


def _dirtyrate_stats(conn: Any, dom: Any, log: logging.Logger) -> dict[str, Any] | None:
    try:
        records = conn.domainListGetStats([dom], libvirt.VIR_DOMAIN_STATS_DIRTYRATE)
    except libvirt.libvirtError as exc:
        log.info("migration pre-flight: reading the dirty rate failed: %s", libvirt_error_details(exc)[1])
        return None
    return dict(records[0][1]) if records else None
