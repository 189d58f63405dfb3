from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from agent.config import AgentConfig, format_cpu_set, load_config, parse_cpu_set
from agent.errors import ConfigError


def test_defaults_when_default_file_absent(monkeypatch, tmp_path):
    monkeypatch.setattr("agent.config.DEFAULT_CONFIG_PATH", tmp_path / "absent.conf")
    assert load_config() == AgentConfig()


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.conf")


def test_full_file(tmp_path):
    path = tmp_path / "agent.conf"
    path.write_text(
        "[DEFAULT]\nhost = hv-01\nlog_level = debug\n"
        "[compute]\ncpu_dedicated_set = 2-7,^5\ncpu_shared_set = 0-1\nreserved_host_memory_mb = 2048\n"
        "reserved_huge_pages = 0:2048:64, 1:1048576:1\ncpu_allocation_ratio = 2.5\n"
        "placement_preference = pack\n"
        "[libvirt]\nlive_migration_permit_post_copy = true\nlive_migration_timeout_action = force_complete\n"
        "live_migration_bandwidth_mib = 100\n"
        "[claims]\nstate_dir = /tmp/ca\nclaim_ttl_s = 60\n"
    )
    cfg = load_config(path)
    assert cfg.host == "hv-01" and cfg.log_level == "DEBUG"
    assert cfg.compute.cpu_dedicated_set == frozenset({2, 3, 4, 6, 7})
    assert cfg.compute.cpu_shared_set == frozenset({0, 1})
    assert cfg.compute.reserved_huge_pages == ((0, 2048, 64), (1, 1048576, 1))
    assert cfg.compute.placement_preference == "pack"
    assert cfg.libvirt.live_migration_permit_post_copy is True
    assert cfg.libvirt.live_migration_permit_auto_converge is False
    assert cfg.libvirt.live_migration_timeout_action == "force_complete"
    assert cfg.claims.state_dir == Path("/tmp/ca") and cfg.claims.claim_ttl_s == 60


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[libvirt]\nlive_migration_permit_post_copy = maybe\n", "[libvirt] live_migration_permit_post_copy"),
        ("[compute]\ncpu_allocation_ratio = -1\n", "[compute] cpu_allocation_ratio"),
        ("[compute]\ncpu_allocation_ratio = nan\n", "[compute] cpu_allocation_ratio"),
        ("[compute]\ncpu_dedicated_set = 3-1\n", "[compute] cpu_dedicated_set"),
        ("[compute]\ncpu_dedicated_set = a-b\n", "[compute] cpu_dedicated_set"),
        ("[compute]\ncpu_dedicated_set = 0-3\ncpu_shared_set = 3-4\n", "overlap on 3"),
        ("[compute]\nbogus = 1\n", "[compute] bogus: unknown option"),
        ("[nosuch]\nx = 1\n", "unknown section"),
        ("[libvirt]\nlive_migration_timeout_action = explode\n", "live_migration_timeout_action"),
        ("[claims]\nclaim_ttl_s = 0\n", "[claims] claim_ttl_s"),
        ("[DEFAULT]\nlog_level = loud\n", "log_level"),
        ("not an ini file", "<text>"),
    ],
)
def test_bad_values_name_the_option(text, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(text=text)
    assert fragment in str(err.value)


def test_shipped_example_config_loads():
    example = Path(__file__).resolve().parents[1] / "conf" / "compute-agent.conf.example"
    load_config(example)


@given(st.sets(st.integers(min_value=0, max_value=300), max_size=40))
def test_cpu_set_round_trip(cpus):
    assert parse_cpu_set(format_cpu_set(cpus)) == frozenset(cpus)
