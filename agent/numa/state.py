"""Host state: topology minus usage minus reservations (see shared/formats.md, Host state).

This module fixes the resource semantics once, so the fitter, the claim ledger, the capability
report and the CLI all count the same way:

* Pages. A cell's `pages[].free` is what is free now (the kernel's count, or the ledger's view).
  `used_pages` is what domains and claims hold by our own accounting. What may be promised is
  ``min(free, total - used_pages) - reserved_pages``: a running domain shows up in both numbers
  and is counted once; a claim not yet backed by a running QEMU lowers only the second one.
* Small-page memory. The 4 KiB pool when the cell reports it (free = ``min(free, total -
  used_pages[4]) - reserved_pages[4]``, like any pool). Otherwise, by our own accounting only:
  total = MemTotal minus the memory of every hugepage pool; used = ``used_memory_mb`` minus the
  hugepage memory domains and claims hold (``sum(used_pages[size] * size)`` over hugepage sizes),
  i.e. what they use beyond hugepages. (`used_memory_mb` counts memory of every page size, like
  Nova's memory_usage.) The kernel's hugepage free counts play no part in that branch: hugepages
  taken by something other than a domain are already outside the total, and a claim's hugepages
  not yet backed by QEMU are not small-page memory. Pinned guests never overcommit: they get the
  free small-page MiB. Floating guests may use ``small_total * ram_allocation_ratio - used``.
* `reserved_memory_mb` is per host and taken from small-page memory: an instance's small-page
  memory must leave that much free across the host. `unbound_memory_mb` (small-page memory of
  domains bound to no single cell, e.g. no numatune) is counted on no cell and taken from the same
  host-wide sum: the two together must stay free.
* CPUs. Dedicated vCPUs use `cpu_dedicated_set` (default: every online CPU) minus pinned CPUs.
  Floating vCPUs use the cell's `cpu_shared_set` CPUs (default: every online CPU not pinned),
  at most ``len(shared) * cpu_allocation_ratio`` floating vCPUs per cell.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from agent.errors import InvalidHostState
from agent.limits import MAX_DOC_MEMORY_MB, MAX_DOC_PAGE_COUNT, MAX_ID
from agent.numa.topology import (
    SMALL_PAGE_KB,
    CellDoc,
    HostTopology,
    NumaCell,
    TopologyDoc,
    decode_schema,
    topology_from_doc,
)
from agent.numbers import uint_or_none

DEFAULT_CPU_ALLOCATION_RATIO = 4.0
DEFAULT_RAM_ALLOCATION_RATIO = 1.0


@dataclass(frozen=True, slots=True)
class CellUsage:
    """What domains and live claims already hold on one cell."""

    pinned_cpus: frozenset[int] = frozenset()
    used_memory_mb: int = 0
    used_pages: Mapping[int, int] = field(default_factory=dict)  # page size KiB -> pages
    floating_vcpus: int = 0


EMPTY_USAGE = CellUsage()


@dataclass(frozen=True, slots=True)
class CellResources:
    """What one cell can still give, derived from a HostState (see module doc)."""

    cell: NumaCell
    dedicated_cpus: frozenset[int]  # free CPUs a dedicated vCPU may take
    shared_cpus: frozenset[int]  # CPUs a floating vCPU floats over
    floating_capacity: int  # how many more floating vCPUs the cell accepts
    free_pages: Mapping[int, int]  # hugepage size KiB -> pages that may be promised
    small_free_mb: int  # small-page MiB a pinned (no-overcommit) guest may take
    small_floating_mb: int  # small-page MiB a floating guest may take (ram ratio applied)
    small_total_mb: int  # small-page MiB of the cell in all: no guest cell may have more (fit.py)


@dataclass(frozen=True, slots=True)
class HostState:
    topology: HostTopology
    usage: Mapping[int, CellUsage] = field(default_factory=dict)  # cell id -> usage
    cpu_dedicated_set: frozenset[int] | None = None
    cpu_shared_set: frozenset[int] | None = None
    reserved_memory_mb: int = 0
    reserved_pages: Mapping[int, Mapping[int, int]] = field(default_factory=dict)  # cell -> size -> n
    cpu_allocation_ratio: float = DEFAULT_CPU_ALLOCATION_RATIO
    ram_allocation_ratio: float = DEFAULT_RAM_ALLOCATION_RATIO
    # Host-level small-page MiB used by domains but bound to no single cell (no numatune):
    # counted on no cell, taken from the host-wide small-page budget like reserved_memory_mb.
    unbound_memory_mb: int = 0

    def cell_usage(self, cell_id: int) -> CellUsage:
        return self.usage.get(cell_id, EMPTY_USAGE)

    def resources(self, cell_id: int) -> CellResources:
        return cell_resources(self, self.topology.cell(cell_id))

    def all_resources(self) -> tuple[CellResources, ...]:
        return tuple(cell_resources(self, c) for c in self.topology.cells)

    def to_json(self) -> dict[str, Any]:
        doc = self.topology.to_json()
        for cell in doc["cells"]:
            u = self.cell_usage(cell["id"])
            cell["pinned_cpus"] = sorted(u.pinned_cpus)
            cell["used_memory_mb"] = u.used_memory_mb
            cell["used_pages"] = {str(k): v for k, v in sorted(u.used_pages.items())}
            cell["floating_vcpus"] = u.floating_vcpus
        if self.cpu_dedicated_set is not None:
            doc["cpu_dedicated_set"] = sorted(self.cpu_dedicated_set)
        if self.cpu_shared_set is not None:
            doc["cpu_shared_set"] = sorted(self.cpu_shared_set)
        doc["reserved_memory_mb"] = self.reserved_memory_mb
        doc["unbound_memory_mb"] = self.unbound_memory_mb
        doc["reserved_pages"] = {
            str(c): {str(s): n for s, n in sorted(sizes.items())} for c, sizes in sorted(self.reserved_pages.items())
        }
        doc["cpu_allocation_ratio"] = self.cpu_allocation_ratio
        doc["ram_allocation_ratio"] = self.ram_allocation_ratio
        return doc

    @classmethod
    def from_json(cls, data: Any) -> "HostState":
        doc = decode_schema(data, HostStateDoc, InvalidHostState)
        return host_state_from_doc(doc)


def cell_resources(state: HostState, cell: NumaCell) -> CellResources:
    usage = state.cell_usage(cell.id)
    online_here = cell.cpus & state.topology.online_cpus
    dedicated_pool = online_here if state.cpu_dedicated_set is None else online_here & state.cpu_dedicated_set
    dedicated = dedicated_pool - usage.pinned_cpus
    if state.cpu_shared_set is None:
        shared = online_here - usage.pinned_cpus
    else:
        shared = (online_here & state.cpu_shared_set) - usage.pinned_cpus
    floating_capacity = max(0, int(len(shared) * state.cpu_allocation_ratio) - usage.floating_vcpus)

    reserved = state.reserved_pages.get(cell.id, {})
    free_pages: dict[int, int] = {}
    huge_total_kb = 0
    for pool in cell.pages:
        if pool.size_kb == SMALL_PAGE_KB:
            continue
        huge_total_kb += pool.total * pool.size_kb
        promisable = min(pool.free, pool.total - usage.used_pages.get(pool.size_kb, 0))
        free_pages[pool.size_kb] = max(0, promisable - reserved.get(pool.size_kb, 0))

    small = cell.page_pool(SMALL_PAGE_KB)
    if small is not None:
        small_total_mb = small.total_mb
        accounted_used = usage.used_pages.get(SMALL_PAGE_KB, 0)
        small_free = min(small.free, small.total - accounted_used) - reserved.get(SMALL_PAGE_KB, 0)
        small_free_mb = max(0, small_free) * SMALL_PAGE_KB // 1024
    else:
        # No 4 KiB pool: small-page memory is what hugepage pools leave of MemTotal, and what domains
        # and claims use of it is our own accounting only: used_memory_mb (every page size) minus the
        # hugepages they hold (used_pages). The kernel's hugepage usage is not mixed in: it also
        # counts hugepages of non-domains (already outside small_total_mb) and misses claims.
        our_huge_used_kb = sum(n * size for size, n in usage.used_pages.items() if size != SMALL_PAGE_KB)
        small_used_mb = max(0, usage.used_memory_mb - our_huge_used_kb // 1024)
        small_total_mb = max(0, (cell.memory_kb - huge_total_kb) // 1024)
        small_free_mb = max(0, small_total_mb - small_used_mb)
    small_used_mb_now = small_total_mb - small_free_mb
    small_floating_mb = max(0, int(small_total_mb * state.ram_allocation_ratio) - small_used_mb_now)
    return CellResources(
        cell=cell,
        dedicated_cpus=frozenset(dedicated),
        shared_cpus=frozenset(shared),
        floating_capacity=floating_capacity,
        free_pages=free_pages,
        small_free_mb=small_free_mb,
        small_floating_mb=small_floating_mb,
        small_total_mb=small_total_mb,
    )


# --- wire schema --------------------------------------------------------------------------------


class StateCellDoc(CellDoc, frozen=True):
    pinned_cpus: list[int] = []
    used_memory_mb: int = 0
    used_pages: dict[str, int] = {}
    floating_vcpus: int = 0


class HostStateDoc(TopologyDoc, frozen=True):
    cells: list[StateCellDoc]  # type: ignore[assignment]
    cpu_dedicated_set: list[int] | None = None
    cpu_shared_set: list[int] | None = None
    reserved_memory_mb: int = 0
    unbound_memory_mb: int = 0
    reserved_pages: dict[str, dict[str, int]] = {}
    cpu_allocation_ratio: float = DEFAULT_CPU_ALLOCATION_RATIO
    ram_allocation_ratio: float = DEFAULT_RAM_ALLOCATION_RATIO


def _size_map(raw: Mapping[str, int], where: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for k, v in raw.items():
        size = uint_or_none(k)
        if size is None:
            raise InvalidHostState(f"{where}: page size key {k[:40]!r} is not a number of KiB")
        if size <= 0 or v < 0 or v > MAX_DOC_PAGE_COUNT:
            raise InvalidHostState(f"{where}[{k}]: {v} out of range")
        out[size] = v
    return out


def host_state_from_doc(doc: HostStateDoc) -> HostState:
    topology = topology_from_doc(doc)
    usage: dict[int, CellUsage] = {}
    for c in doc.cells:
        where = f"cell {c.id}"
        pinned = frozenset(c.pinned_cpus)
        if not pinned <= frozenset(c.cpus):
            raise InvalidHostState(f"{where}.pinned_cpus: {sorted(pinned - set(c.cpus))} not in the cell")
        if not (0 <= c.used_memory_mb <= MAX_DOC_MEMORY_MB) or not (0 <= c.floating_vcpus <= MAX_ID):
            raise InvalidHostState(f"{where}: used_memory_mb / floating_vcpus out of range")
        usage[c.id] = CellUsage(
            pinned_cpus=pinned,
            used_memory_mb=c.used_memory_mb,
            used_pages=_size_map(c.used_pages, f"{where}.used_pages"),
            floating_vcpus=c.floating_vcpus,
        )
    reserved_pages: dict[int, dict[int, int]] = {}
    for cell_key, sizes in doc.reserved_pages.items():
        cell_id = uint_or_none(cell_key)
        if cell_id is None:
            raise InvalidHostState(f"reserved_pages: cell key {cell_key[:40]!r} is not a cell id")
        reserved_pages[cell_id] = _size_map(sizes, f"reserved_pages[{cell_key}]")
    for ratio_name in ("cpu_allocation_ratio", "ram_allocation_ratio"):
        ratio = getattr(doc, ratio_name)
        if not (0 < ratio <= 1000):
            raise InvalidHostState(f"{ratio_name}: {ratio} must be > 0 and <= 1000")
    if not (0 <= doc.reserved_memory_mb <= MAX_DOC_MEMORY_MB):
        raise InvalidHostState(f"reserved_memory_mb: {doc.reserved_memory_mb} out of range")
    if not (0 <= doc.unbound_memory_mb <= MAX_DOC_MEMORY_MB):
        raise InvalidHostState(f"unbound_memory_mb: {doc.unbound_memory_mb} out of range")
    return HostState(
        topology=topology,
        usage=usage,
        cpu_dedicated_set=frozenset(doc.cpu_dedicated_set) if doc.cpu_dedicated_set is not None else None,
        cpu_shared_set=frozenset(doc.cpu_shared_set) if doc.cpu_shared_set is not None else None,
        reserved_memory_mb=doc.reserved_memory_mb,
        unbound_memory_mb=doc.unbound_memory_mb,
        reserved_pages=reserved_pages,
        cpu_allocation_ratio=doc.cpu_allocation_ratio,
        ram_allocation_ratio=doc.ram_allocation_ratio,
    )
