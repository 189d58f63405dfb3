"""Host load and memory for `describe_host`, read through psutil rather than parsing /proc by hand."""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil  # type: ignore[import-untyped]  # psutil ships no type hints (stubs are a separate package)


@dataclass(frozen=True, slots=True)
class HostLoad:
    """What the host is doing now: load averages, CPUs online, memory and swap in bytes."""

    load_1m: float
    load_5m: float
    load_15m: float
    cpus_online: int
    memory_total_bytes: int
    memory_available_bytes: int
    swap_used_bytes: int

    @property
    def memory_used_percent(self) -> float:
        if not self.memory_total_bytes:
            return 0.0
        return 100.0 * (self.memory_total_bytes - self.memory_available_bytes) / self.memory_total_bytes


def read_host_load() -> HostLoad:
    load_1m, load_5m, load_15m = psutil.getloadavg()
    memory = psutil.virtual_memory()
    return HostLoad(
        load_1m=load_1m,
        load_5m=load_5m,
        load_15m=load_15m,
        cpus_online=psutil.cpu_count(logical=True) or os.cpu_count() or 0,
        memory_total_bytes=memory.total,
        memory_available_bytes=memory.available,
        swap_used_bytes=psutil.swap_memory().used,
    )
