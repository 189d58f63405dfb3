"""psutil's view of the host, checked against the kernel's own files."""

import os

import pytest

from agent.daemon.host_load import HostLoad, read_host_load


def meminfo_kib(key: str) -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name == key:
                return int(rest.split()[0])
    raise KeyError(key)


def test_host_load_matches_the_kernel():
    load = read_host_load()
    assert load.memory_total_bytes == meminfo_kib("MemTotal") * 1024
    assert abs(load.memory_available_bytes - meminfo_kib("MemAvailable") * 1024) < 256 << 20
    assert load.cpus_online == os.cpu_count()
    assert load.load_1m == pytest.approx(os.getloadavg()[0], abs=1.0)
    assert 0.0 < load.memory_used_percent < 100.0
    assert load.swap_used_bytes >= 0


def test_host_load_is_a_frozen_value():
    load = read_host_load()
    with pytest.raises(AttributeError):
        load.load_1m = 0.0  # type: ignore[misc]
    assert HostLoad(0.0, 0.0, 0.0, 1, 0, 0, 0).memory_used_percent == 0.0
