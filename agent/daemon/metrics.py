"""Prometheus metrics of one agent, in a registry of its own (never prometheus_client's global one),
served as text on `[DEFAULT] metrics_listen` when the operator asks for it.

Names follow what KubeVirt and RabbitMQ operators read: `compute_agent_migrations_total{outcome,phase}`
counts finished migrations, `compute_agent_migration_data_remaining_bytes{migration_id}` and
`compute_agent_migration_dirty_memory_rate_bytes{migration_id}` follow the running ones.

Running migrations and claims are pushed as snapshots by the threads that own them (the monitor, the
ledger) and rendered at scrape time, so a scrape never calls into an object another thread owns and a
finished migration leaves no stale series behind.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.daemon.errors import MetricsServerError


@dataclass(frozen=True, slots=True)
class RunningMigration:
    """One migration in flight, as its monitor last saw it."""

    migration_id: str
    role: str  # "source" | "destination"
    phase: str
    remaining_bytes: int
    dirty_rate_bytes_per_s: float


class _Snapshots(Collector):
    """Gauges rendered from the latest pushed snapshots (replaced whole: one reference swap)."""

    def __init__(self) -> None:
        self.migrations: tuple[RunningMigration, ...] = ()
        self.claims: Mapping[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        migrations, claims = self.migrations, self.claims
        yield from _running_families(migrations)
        held = GaugeMetricFamily("compute_agent_claims", "Claims in the ledger by state", labels=["state"])
        for state, count in sorted(claims.items()):
            held.add_metric([state], count)
        yield held


def _running_families(migrations: tuple[RunningMigration, ...]) -> Iterator[Metric]:
    running = GaugeMetricFamily(
        "compute_agent_migrations_running", "Migrations in flight by role and phase", labels=["role", "phase"]
    )
    for (role, phase), count in sorted(Tally((m.role, m.phase) for m in migrations).items()):
        running.add_metric([role, phase], count)
    remaining = GaugeMetricFamily(
        "compute_agent_migration_data_remaining_bytes", "Memory still to copy", labels=["migration_id", "role"]
    )
    dirty = GaugeMetricFamily(
        "compute_agent_migration_dirty_memory_rate_bytes",
        "Guest memory dirtied per second during the copy",
        labels=["migration_id", "role"],
    )
    for m in migrations:
        remaining.add_metric([m.migration_id, m.role], m.remaining_bytes)
        dirty.add_metric([m.migration_id, m.role], m.dirty_rate_bytes_per_s)
    yield from (running, remaining, dirty)


class AgentMetrics:
    """Every metric of one agent; methods are named after what happened."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._snapshots = _Snapshots()
        self.registry.register(self._snapshots)
        reg = self.registry
        self._migrations = Counter(
            "compute_agent_migrations",
            "Migrations ended, by outcome and the phase they ended in",
            ["outcome", "phase"],
            registry=reg,
        )
        self._dropped = Counter(
            "compute_agent_bus_messages_dropped", "Bus messages dropped unexecuted, by reason", ["reason"], registry=reg
        )
        self._reconnects = Counter("compute_agent_bus_reconnects", "Reconnections to the broker", registry=reg)
        self._damage = Counter("compute_agent_ledger_damage_found", "Damaged claim ledger rows found", registry=reg)

    def migration_ended(self, outcome: str, phase: str) -> None:
        self._migrations.labels(outcome=outcome, phase=phase).inc()

    def message_dropped(self, reason: str) -> None:
        self._dropped.labels(reason=reason).inc()

    def reconnected(self) -> None:
        self._reconnects.inc()

    def ledger_damage_found(self, count: int = 1) -> None:
        self._damage.inc(count)

    def set_running_migrations(self, migrations: Iterable[RunningMigration]) -> None:
        self._snapshots.migrations = tuple(migrations)

    def set_claims(self, by_state: Mapping[str, int]) -> None:
        self._snapshots.claims = dict(by_state)

    def render(self) -> bytes:
        """The text exposition format, as a scrape would get it."""
        return generate_latest(self.registry)


class MetricsServer:
    """The HTTP endpoint: a thread of its own, started and stopped with the daemon."""

    def __init__(self, metrics: AgentMetrics, host: str, port: int) -> None:
        self._metrics, self._host, self._port = metrics, host, port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        """Listen and serve; returns the bound (host, port) (port 0 picks a free one)."""
        try:
            self._server, self._thread = start_http_server(self._port, self._host, registry=self._metrics.registry)
        except OSError as exc:
            raise MetricsServerError(f"[DEFAULT] metrics_listen = {self._host}:{self._port}: {exc}") from exc
        return self._host, self._server.server_port

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = self._thread = None
