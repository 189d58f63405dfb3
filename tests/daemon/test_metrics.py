"""The metrics endpoint, scraped over HTTP; and the [DEFAULT] metrics_listen option."""

import urllib.request

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import load_config
from agent.daemon.errors import MetricsServerError
from agent.daemon.metrics import AgentMetrics, MetricsServer, RunningMigration
from agent.errors import ConfigError


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def served():
    metrics = AgentMetrics()
    server = MetricsServer(metrics, "127.0.0.1", 0)
    host, port = server.start()
    yield metrics, f"http://{host}:{port}/metrics"
    server.stop()


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return samples(resp.read().decode())


def test_scrape_shows_what_happened(served):
    metrics, url = served
    metrics.migration_ended("completed", "precopy")
    metrics.migration_ended("completed", "precopy")
    metrics.migration_ended("aborted", "postcopy")
    metrics.message_dropped("expired")
    metrics.message_dropped("bad_signature")
    metrics.reconnected()
    metrics.ledger_damage_found(3)
    metrics.set_claims({"held": 2, "migrating": 1})
    metrics.set_running_migrations(
        [
            RunningMigration("m-1", "source", "precopy", 1 << 30, 5e6),
            RunningMigration("m-2", "source", "precopy", 4096, 0.0),
        ]
    )
    got = scrape(url)
    assert got[("compute_agent_migrations_total", (("outcome", "completed"), ("phase", "precopy")))] == 2
    assert got[("compute_agent_migrations_total", (("outcome", "aborted"), ("phase", "postcopy")))] == 1
    assert got[("compute_agent_bus_messages_dropped_total", (("reason", "expired"),))] == 1
    assert got[("compute_agent_bus_reconnects_total", ())] == 1
    assert got[("compute_agent_ledger_damage_found_total", ())] == 3
    assert got[("compute_agent_claims", (("state", "held"),))] == 2
    assert got[("compute_agent_migrations_running", (("phase", "precopy"), ("role", "source")))] == 2
    m1 = (("migration_id", "m-1"), ("role", "source"))
    assert got[("compute_agent_migration_data_remaining_bytes", m1)] == 1 << 30
    assert got[("compute_agent_migration_dirty_memory_rate_bytes", m1)] == 5e6


def test_a_finished_migration_leaves_no_series(served):
    metrics, url = served
    metrics.set_running_migrations([RunningMigration("m-9", "destination", "postcopy", 10, 1.0)])
    assert any("m-9" in str(key) for key in scrape(url))
    metrics.set_running_migrations([])
    assert not any("m-9" in str(key) for key in scrape(url))


def test_two_agents_share_no_registry():
    a, b = AgentMetrics(), AgentMetrics()
    a.reconnected()
    assert b"compute_agent_bus_reconnects_total 1.0" in a.render()
    assert b"compute_agent_bus_reconnects_total 0.0" in b.render()
    assert b"compute_agent" not in generate_latest(REGISTRY)


def test_a_port_in_use_is_a_typed_error(served):
    _, url = served
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(MetricsServerError, match="metrics_listen"):
        MetricsServer(AgentMetrics(), "127.0.0.1", port).start()


def test_stop_frees_the_port():
    server = MetricsServer(AgentMetrics(), "127.0.0.1", 0)
    _, port = server.start()
    server.stop()
    again = MetricsServer(AgentMetrics(), "127.0.0.1", port)
    again.start()
    again.stop()


@pytest.mark.parametrize(
    "value, expected",
    [("127.0.0.1:9180", ("127.0.0.1", 9180)), ("[::1]:9180", ("::1", 9180)), ("localhost:1", ("localhost", 1))],
)
def test_metrics_listen_option(value, expected):
    assert load_config(text=f"[DEFAULT]\nmetrics_listen = {value}\n").metrics_listen == expected


def test_metrics_listen_is_off_by_default():
    assert load_config(text="[DEFAULT]\nhost = hv-1\n").metrics_listen is None
    assert load_config(text="[DEFAULT]\nmetrics_listen =\n").metrics_listen is None


@pytest.mark.parametrize("value", ["9180", ":9180", "host:", "host:0", "host:65536", "::1:9180", "h:x"])
def test_bad_metrics_listen_names_the_option(value):
    with pytest.raises(ConfigError, match=r"\[DEFAULT\] metrics_listen"):
        load_config(text=f"[DEFAULT]\nmetrics_listen = {value}\n")
