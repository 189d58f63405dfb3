"""[upgrade_levels], [workarounds], [orchestrator]: typed values, and a clear error naming the option."""

from __future__ import annotations

import pytest

from agent.config import load_config
from agent.errors import ConfigError


def test_defaults() -> None:
    cfg = load_config(text="[compute]\n")
    assert cfg.upgrade_levels.agent == "auto"
    assert cfg.workarounds.enable_numa_live_migration is False
    assert cfg.orchestrator.migrate_max_retries == -1


def test_values_are_read() -> None:
    cfg = load_config(
        text="[upgrade_levels]\nagent = 1.0\n[workarounds]\nenable_numa_live_migration = true\n"
        "[orchestrator]\nmigrate_max_retries = 2\ndiscovery_timeout_s = 0.5\n"
    )
    assert cfg.upgrade_levels.agent == "1.0"
    assert cfg.workarounds.enable_numa_live_migration is True
    assert (cfg.orchestrator.migrate_max_retries, cfg.orchestrator.discovery_timeout_s) == (2, 0.5)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[upgrade_levels]\nagent = latest\n", "[upgrade_levels] agent"),
        ("[upgrade_levels]\nagent = 1\n", "[upgrade_levels] agent"),
        ("[workarounds]\nenable_numa_live_migration = maybe\n", "[workarounds] enable_numa_live_migration"),
        ("[workarounds]\nother = 1\n", "[workarounds] other"),
        ("[orchestrator]\nmigrate_max_retries = -2\n", "[orchestrator] migrate_max_retries"),
        ("[orchestrator]\ndiscovery_timeout_s = 0\n", "[orchestrator] discovery_timeout_s"),
    ],
)
def test_bad_values_name_the_option(text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load_config(text=text)


def test_example_file_reads() -> None:
    cfg = load_config("conf/compute-agent.conf.example")
    assert cfg.orchestrator.claim_ttl_s == 300
