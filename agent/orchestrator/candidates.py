"""Which hosts may take an instance, best first (pure).

Named hosts are tried in the order given (only liveness, version and traits are checked: the
operator chose them, the claim tells the rest). Otherwise every live agent except the source that
has the required traits and whose published free resources could hold the instance is a
candidate, ordered by `[compute] placement_preference` across hosts as the fitter does within a
host: `spread` puts the host with the most room first, `pack` the host with the least room that
still fits. The published numbers are a filter, not a promise: the destination's claim decides.

Worked example (pinned 4-vCPU instance, spread): A is the source; B has 2 free pCPUs per cell
(filtered: "no host cell has 4 free pCPUs"), C has 6 and D has 12 -> [D, C]; with pack -> [C, D].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from agent.bus import schemas as s
from agent.orchestrator.model import CellNeed, HostInfo, Need, Rejection, Version

Preference = Literal["spread", "pack"]


@dataclass(frozen=True, slots=True)
class Candidates:
    hosts: tuple[HostInfo, ...]  # best first; the first is the destination, the rest alternates
    rejected: tuple[Rejection, ...]  # filtered out before anything was asked


def cell_holds(need: CellNeed, cell: s.CellFree, n: Need) -> bool:
    if n.pinned and cell.free_pcpus < need.pcpus:
        return False
    if cell.free_shared_vcpus < need.shared_vcpus:
        return False
    return memory_room(cell, n) >= need.memory_mb


def memory_room(cell: s.CellFree, n: Need) -> int:
    """MiB the instance's kind of memory can have in this cell."""
    if n.page_kb is not None:
        return cell.free_pages.get(str(n.page_kb), 0) * n.page_kb // 1024
    if n.huge_any:
        huge = [int(k) * v // 1024 for k, v in cell.free_pages.items() if k.isdigit() and int(k) > 4]
        return max([cell.free_memory_mb, *huge])
    return cell.free_memory_mb


def why_not_fits(need: Need, cells: Sequence[s.CellFree]) -> str | None:
    """None when each guest cell could go to its own host cell (largest guest cell first, first
    host cell that holds it); else the reason for the first guest cell that found none."""
    free = list(cells)
    for i, cell_need in sorted(enumerate(need.cells), key=lambda c: -(c[1].pcpus + c[1].shared_vcpus)):
        found = next((c for c in free if cell_holds(cell_need, c, need)), None)
        if found is None:
            return f"guest cell {i} ({_need_text(cell_need, need)}) fits in no free host cell"
        free.remove(found)
    return None


def _need_text(c: CellNeed, n: Need) -> str:
    cpus = f"{c.pcpus} pCPUs" if n.pinned else f"{c.shared_vcpus} shared vCPUs"
    page = f" in {n.page_kb} KiB pages" if n.page_kb else ""
    return f"{cpus}, {c.memory_mb} MiB{page}"


def room(host: HostInfo, need: Need) -> tuple[int, int]:
    """(CPUs, MiB) free of the kind the instance uses: the sort key of spread and pack."""
    cells = host.caps.cells
    cpus = sum(c.free_pcpus if need.pinned else c.free_shared_vcpus for c in cells)
    return cpus, sum(memory_room(c, need) for c in cells)


def why_not_host(host: HostInfo, required: frozenset[str], cap: Version) -> str | None:
    """Reasons that do not depend on resources: RPC major, traits."""
    if host.rpc_max[0] != cap[0]:
        return f"serves RPC {host.caps.rpc_versions.max}, major {cap[0]} needed"
    missing = sorted(required - host.traits)
    if missing:
        return f"lacks trait {', '.join(missing)} (required by the instance's metadata)"
    return None


def choose(
    need: Need,
    required: frozenset[str],
    hosts: Sequence[HostInfo],
    *,
    source: str,
    named: Sequence[str] = (),
    preference: Preference = "spread",
    cap: Version = (1, 1),
) -> Candidates:
    if named:
        return _named(required, hosts, source, named, cap)
    keep: list[HostInfo] = []
    rejected: list[Rejection] = []
    for host in hosts:
        if host.name == source:
            continue
        why = why_not_host(host, required, cap) or why_not_fits(need, host.caps.cells)
        if why is None:
            keep.append(host)
        else:
            rejected.append(Rejection(host.name, why))
    if preference == "spread":  # most room first; ties by name
        keep.sort(key=lambda h: (tuple(-x for x in room(h, need)), h.name))
    else:  # pack: least room that still fits first
        keep.sort(key=lambda h: (room(h, need), h.name))
    return Candidates(tuple(keep), tuple(rejected))


def _named(
    required: frozenset[str], hosts: Sequence[HostInfo], source: str, named: Sequence[str], cap: Version
) -> Candidates:
    by_name = {h.name: h for h in hosts}
    keep: list[HostInfo] = []
    rejected: list[Rejection] = []
    for name in dict.fromkeys(named):  # the order given, each once
        host = by_name.get(name)
        why = "is the source" if name == source else ("no live agent" if host is None else None)
        why = why or (why_not_host(host, required, cap) if host is not None else None)
        if why is None and host is not None:
            keep.append(host)
        else:
            rejected.append(Rejection(name, why or "unknown"))
    return Candidates(tuple(keep), tuple(rejected))


def attempts_allowed(max_retries: int, candidates: int) -> int:
    """Nova's migrate_max_retries: -1 = every candidate; N = the first try and N alternates."""
    return candidates if max_retries < 0 else min(candidates, max_retries + 1)
