from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import AgentConfig, load_config
from agent.cpuset import format_cpu_set, parse_cpu_set
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


# --- regressions: [DEFAULT] handling and option checks ----------------------------------------------


def test_section_option_is_not_hidden_by_default_section():
    # configparser copies [DEFAULT] into every section; a "skip what [DEFAULT] has" filter used to
    # drop [libvirt] connection_uri = b silently and run with the built-in default
    with pytest.raises(ConfigError, match=r"\[DEFAULT\] connection_uri: unknown option"):
        load_config(text="[DEFAULT]\nconnection_uri = a\n[libvirt]\nconnection_uri = b\n")
    cfg = load_config(text="[DEFAULT]\nhost = hv-01\n[libvirt]\nconnection_uri = qemu+ssh://x/system\n")
    assert cfg.libvirt.connection_uri == "qemu+ssh://x/system" and cfg.host == "hv-01"
    # [DEFAULT] values are not copied into sections any more: host in [libvirt] is an unknown option
    with pytest.raises(ConfigError, match=r"\[libvirt\] host: unknown option"):
        load_config(text="[DEFAULT]\nhost = a\n[libvirt]\nhost = b\n")


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[DEFAULT]\nbogus = 1\n", "[DEFAULT] bogus: unknown option"),
        ("[DEFAULT]\ncpu_dedicated_set = 0-3\n", "[DEFAULT] cpu_dedicated_set: unknown option"),
        ("[libvirt]\nlive_migration_poll_interval_s = 0.01\n", "[libvirt] live_migration_poll_interval_s"),
        ("[libvirt]\nlive_migration_poll_interval_s = 1e-300\n", "[libvirt] live_migration_poll_interval_s"),
        ("[compute]\ncpu_dedicated_set =\n", "selects no CPU"),
        ("[compute]\ncpu_shared_set = 0-3,^0-3\n", "selects no CPU"),
        ("[compute]\ncpu_dedicated_set = ,\n", "selects no CPU"),
        ("[claims]\nstate_dir = relative/dir\n", "[claims] state_dir"),
        ("[claims]\nstate_dir =\n", "[claims] state_dir"),
        ("[compute]\nreserved_huge_pages = 0:2048:1, 0:2048:5\n", "listed twice"),
        ("[compute]\nreserved_huge_pages = 0:2048\n", "[compute] reserved_huge_pages"),
        ("[compute]\nreserved_huge_pages = 0:1_0:1\n", "[compute] reserved_huge_pages"),
        ("[libvirt]\nlive_migration_bandwidth_mib = 1_0\n", "[libvirt] live_migration_bandwidth_mib"),
        ("[libvirt]\nlive_migration_bandwidth_mib = +3\n", "[libvirt] live_migration_bandwidth_mib"),
        ("[libvirt]\nlive_migration_bandwidth_mib = \u0663\n", "[libvirt] live_migration_bandwidth_mib"),
        ("[libvirt]\nlive_migration_bandwidth_mib = " + "1" * 5000 + "\n", "[libvirt] live_migration_bandwidth_mib"),
        ("[compute]\ncpu_dedicated_set = 1_0\n", "[compute] cpu_dedicated_set"),
        ("[compute]\ncpu_dedicated_set = +3\n", "[compute] cpu_dedicated_set"),
        ("[compute]\ncpu_dedicated_set = \u0663\n", "[compute] cpu_dedicated_set"),
    ],
)
def test_more_bad_values_name_the_option(text, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(text=text)
    assert fragment in str(err.value)


def test_poll_interval_floor_is_accepted():
    assert (
        load_config(text="[libvirt]\nlive_migration_poll_interval_s = 0.05\n").libvirt.live_migration_poll_interval_s
        == 0.05
    )


def test_distinct_reserved_huge_pages_are_fine():
    cfg = load_config(text="[compute]\nreserved_huge_pages = 0:2048:1, 1:2048:1, 0:1048576:1\n")
    assert cfg.compute.reserved_huge_pages == ((0, 2048, 1), (1, 2048, 1), (0, 1048576, 1))


# --- parse_cpu_set: bounded work, ASCII numbers ---------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        ",".join(["0-65536"] * 2000),  # used to expand 131 million ids (seconds; minutes for 4 MiB)
        "0-9999999",  # range end checked against the id limit before expanding
        "0-1048576",  # within the id limit but more ids than any host has
        "1" * 5000,  # int() raises its own ValueError past 4300 digits; never reached now
        "1_0",
        "+3",
        "\u0663",
        "3 4",
        "0x1",
        "-1",
        "1-2-3",
        ",".join(["1"] * 70000),  # too many elements
    ],
)
def test_parse_cpu_set_refuses_hostile_text_quickly(text):
    import time

    t0 = time.monotonic()
    with pytest.raises(ValueError):
        parse_cpu_set(text)
    assert time.monotonic() - t0 < 0.5


def test_parse_cpu_set_syntax_kept():
    assert parse_cpu_set(" 0 - 3 , ^2 ,8,, ") == {0, 1, 3, 8}
    assert parse_cpu_set("") == frozenset()
    assert parse_cpu_set("1048576") == {1048576}
    with pytest.raises(ValueError):
        parse_cpu_set("1048577")
    with pytest.raises(ValueError):
        parse_cpu_set("0,^1", allow_exclude=False)
    with pytest.raises(ValueError):
        parse_cpu_set("0,,1", allow_empty_elements=False)


# --- agent.cpuset / agent.units: the shared vocabulary the config uses -------------------------------


def test_parse_cpu_set_clip_excluded_ignores_excluded_ids_above_max():
    # Nova's masks: "^50" on a 4-vCPU flavor excludes nothing; an included id above max is refused
    assert parse_cpu_set("0-3,^50", max_id=3, clip_excluded=True) == {0, 1, 2, 3}
    assert parse_cpu_set("0-3,^2-60", max_id=3, clip_excluded=True) == {0, 1}
    with pytest.raises(ValueError):
        parse_cpu_set("0-3,^50", max_id=3)
    with pytest.raises(ValueError):
        parse_cpu_set("0-4", max_id=3, clip_excluded=True)


def test_kernel_cpu_list_and_id_list_formatter():
    from agent.cpuset import format_id_list, parse_kernel_cpu_list

    assert parse_kernel_cpu_list("0-3,8") == {0, 1, 2, 3, 8}
    for bad in ("0,^1", "0,,1", "65537"):
        with pytest.raises(ValueError):
            parse_kernel_cpu_list(bad)
    assert format_id_list([5, 1, 2]) == "1,2,5"
    assert format_id_list(range(20)) == ",".join(map(str, range(16))) + ",..."
    assert format_id_list(range(20), at_most=None) == ",".join(map(str, range(20)))
    assert format_id_list([]) == ""


def test_units():
    from agent.units import SMALL_PAGE_KB, mib_from_kib, page_label, pages_for, scale_to_kib

    assert SMALL_PAGE_KB == 4
    assert [mib_from_kib(k) for k in (0, 1, 1024, 1025)] == [0, 1, 1, 2]
    assert [pages_for(k, 4) for k in (0, 4, 4097)] == [0, 1, 1025]
    assert [page_label(s) for s in (4, 2048, 1048576)] == ["4K", "2M", "1G"]
    assert scale_to_kib(1, "GiB") == 1 << 20 and scale_to_kib(1, "MB") == 977 and scale_to_kib(5, None) == 5
    with pytest.raises(ValueError):
        scale_to_kib(1, "parsecs")


def test_claim_ttl_over_its_maximum_is_refused():
    with pytest.raises(ConfigError, match=r"\[claims\] claim_ttl_s = 9000: over claim_ttl_max_s \(7200\)"):
        load_config(text="[claims]\nclaim_ttl_s = 9000\n")
    cfg = load_config(text="[claims]\nclaim_ttl_s = 9000\nclaim_ttl_max_s = 10000\n")
    assert (cfg.claims.claim_ttl_s, cfg.claims.claim_ttl_max_s) == (9000, 10000)
