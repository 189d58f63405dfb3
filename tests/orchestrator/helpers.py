"""Builders of the orchestrator's pure inputs: host infos from a few numbers."""

from __future__ import annotations

from agent.bus import schemas as s
from agent.orchestrator.model import HostInfo
from agent.testing.fleet import ALL_TRAITS


def host(
    name: str,
    *,
    pcpus: tuple[int, ...] = (8, 8),
    shared: int = 16,
    memory_mb: int = 8192,
    pages_2m: int = 1024,
    rpc_max: str = "1.1",
    traits: tuple[str, ...] = ALL_TRAITS,
    seen_at: float = 0.0,
) -> HostInfo:
    cells = [
        s.CellFree(
            id=i, free_pcpus=p, free_shared_vcpus=shared, free_memory_mb=memory_mb, free_pages={"2048": pages_2m}
        )
        for i, p in enumerate(pcpus)
    ]
    caps = s.Capabilities(
        host=name,
        seq=1,
        agent_version="t",
        rpc_versions=s.RpcVersions(min="1.0", max=rpc_max),
        traits=list(traits),
        libvirt_version="9.0.0",
        qemu_version="7.2.0",
        migration_uri=f"tcp://{name}",
        libvirt_uri=f"qemu+tcp://{name}/system",
        cells=cells,
        ts=1.0,
    )
    return HostInfo(caps, seen_at, "event")
