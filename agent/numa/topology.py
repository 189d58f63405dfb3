"""Host NUMA topology: the immutable facts discovery found (see shared/formats.md, Host topology).

JSON goes through a msgspec schema first, so shape and type errors come back with a path
(`$.cells[0].cpus[2]`) instead of a KeyError; semantic checks (siblings within the cell, sorted
ids, ...) follow in `HostTopology.from_json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import msgspec

from agent.cpuset import format_id_list
from agent.errors import AgentError, InvalidHostState
from agent.json_input import check_json_depth
from agent.limits import (
    MAX_DOC_MEMORY_KB,
    MAX_DOC_PAGE_COUNT,
    MAX_DOC_PAGESIZE_KB,
    MAX_HOST_CELLS,
    MAX_HOST_CPU_ID,
    MAX_HOST_CPUS,
    MAX_ID,
    MAX_PAGE_SIZES,
    MAX_SMT_SIBLINGS,
)
from agent.numbers import uint_or_none
from agent.units import SMALL_PAGE_KB as SMALL_PAGE_KB  # re-exported: the page size host documents name
from agent.units import is_page_size


@dataclass(frozen=True, slots=True)
class PagePool:
    """Pages of one size on one cell: `total` configured, `free` available right now."""

    size_kb: int
    total: int
    free: int

    @property
    def total_mb(self) -> int:
        return self.total * self.size_kb // 1024


@dataclass(frozen=True, slots=True)
class NumaCell:
    """One NUMA node. `cpus` are its online CPUs; a memory-only node has none."""

    id: int
    cpus: frozenset[int]
    siblings: tuple[tuple[int, ...], ...]
    memory_kb: int
    pages: tuple[PagePool, ...] = ()
    distances: Mapping[int, int] = field(default_factory=dict)

    def page_pool(self, size_kb: int) -> PagePool | None:
        for pool in self.pages:
            if pool.size_kb == size_kb:
                return pool
        return None

    def sibling_group(self, cpu: int) -> tuple[int, ...]:
        for group in self.siblings:
            if cpu in group:
                return group
        return (cpu,)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "cpus": sorted(self.cpus),
            "siblings": [list(g) for g in self.siblings],
            "memory_kb": self.memory_kb,
            "pages": [{"size_kb": p.size_kb, "total": p.total, "free": p.free} for p in self.pages],
            "distances": {str(k): v for k, v in sorted(self.distances.items())},
        }


def numa_cell(
    cell_id: int,
    cpus: frozenset[int],
    siblings: tuple[tuple[int, ...], ...],
    memory_kb: int,
    pages: Iterable[PagePool],
    distances: Mapping[int, int],
) -> NumaCell:
    """A NumaCell as the host readers (sysfs, capabilities) build it: pools in page-size order."""
    ordered = tuple(sorted(pages, key=lambda p: p.size_kb))
    return NumaCell(id=cell_id, cpus=cpus, siblings=siblings, memory_kb=memory_kb, pages=ordered, distances=distances)


# --- bounds: the one set every host reader applies (documents, sysfs, capabilities) ----------------


def host_size_problem(cell_count: int, cpu_count: int) -> str | None:
    """Why a host of this size must be refused (None: it is plausible). Checked before per-cell work."""
    if cell_count > MAX_HOST_CELLS:
        return f"{cell_count} NUMA cells, more than {MAX_HOST_CELLS} (Linux MAX_NUMNODES)"
    if cpu_count > MAX_HOST_CPUS:
        return f"{cpu_count} CPUs, more than {MAX_HOST_CPUS} (the largest NR_CPUS)"
    return None


def cell_problem(cell: NumaCell) -> str | None:
    """Why a host reader must refuse this cell (None: fine): ids, SMT width, page pools, distances."""
    if not 0 <= cell.id <= MAX_HOST_CPU_ID:
        return f"cell id {cell.id} out of range 0..{MAX_HOST_CPU_ID}"
    if not 0 <= cell.memory_kb <= MAX_DOC_MEMORY_KB:
        return f"memory_kb {cell.memory_kb} out of range"
    wide = next((g for g in cell.siblings if len(g) > MAX_SMT_SIBLINGS), None)
    if wide is not None:
        return f"an SMT sibling group of {len(wide)} CPUs, more than {MAX_SMT_SIBLINGS}"
    return _pages_problem(cell.pages) or _distances_problem(cell.distances)


def _pages_problem(pages: Iterable[PagePool]) -> str | None:
    sizes: set[int] = set()
    for p in pages:
        if not is_page_size(p.size_kb) or p.size_kb > MAX_DOC_PAGESIZE_KB or p.size_kb in sizes:
            return f"page size {p.size_kb} KiB is not a power of two >= 4 KiB, too large, or listed twice"
        if not 0 <= p.free <= p.total <= MAX_DOC_PAGE_COUNT:
            return f"{p.size_kb} KiB pages: need 0 <= free ({p.free}) <= total ({p.total}) <= {MAX_DOC_PAGE_COUNT}"
        sizes.add(p.size_kb)
    if len(sizes) > MAX_PAGE_SIZES:
        return f"{len(sizes)} page sizes, more than {MAX_PAGE_SIZES}"
    return None


def _distances_problem(distances: Mapping[int, int]) -> str | None:
    if len(distances) > MAX_HOST_CELLS:
        return f"{len(distances)} distances, more than {MAX_HOST_CELLS} cells"
    for other, value in distances.items():
        if not 0 <= other <= MAX_HOST_CPU_ID or not 0 < value <= 255:
            return f"distance to cell {other}: {value} (SLIT distances are 1..255)"
    return None


@dataclass(frozen=True, slots=True)
class HostTopology:
    hostname: str
    cells: tuple[NumaCell, ...]
    online_cpus: frozenset[int]
    offline_cpus: frozenset[int] = frozenset()
    isolated_cpus: frozenset[int] = frozenset()
    # cell id -> cell, so that cell() is O(1) (callers look every cell up: O(n^2) otherwise)
    _by_id: Mapping[int, NumaCell] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {c.id: c for c in self.cells})

    def cell(self, cell_id: int) -> NumaCell:
        return self._by_id[cell_id]

    @property
    def cell_ids(self) -> tuple[int, ...]:
        return tuple(c.id for c in self.cells)

    def cell_of_cpu(self, cpu: int) -> NumaCell | None:
        for c in self.cells:
            if cpu in c.cpus:
                return c
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "hostname": self.hostname,
            "cells": [c.to_json() for c in self.cells],
            "online_cpus": sorted(self.online_cpus),
            "offline_cpus": sorted(self.offline_cpus),
            "isolated_cpus": sorted(self.isolated_cpus),
        }

    @classmethod
    def from_json(cls, data: Any) -> "HostTopology":
        doc = decode_schema(data, TopologyDoc, InvalidHostState)
        return topology_from_doc(doc)


# --- wire schema (shared/formats.md); extra keys are ignored by msgspec by default ---------------

_NonNeg = msgspec.Meta(ge=0)
_Count = msgspec.Meta(ge=0, le=MAX_DOC_PAGE_COUNT)  # absurd sizes are refused, not overflowed later


class PageDoc(msgspec.Struct, frozen=True):
    size_kb: int
    total: int
    free: int


class CellDoc(msgspec.Struct, frozen=True):
    id: int
    cpus: list[int]
    memory_kb: int
    siblings: list[list[int]] | None = None
    pages: list[PageDoc] = []
    distances: dict[str, int] = {}


class TopologyDoc(msgspec.Struct, frozen=True):
    cells: list[CellDoc]
    hostname: str = ""
    online_cpus: list[int] | None = None
    offline_cpus: list[int] = []
    isolated_cpus: list[int] = []


def decode_schema(data: Any, schema: type, error: type[AgentError]) -> Any:
    """Convert already-parsed JSON (or bytes/str) into a schema struct, mapping errors to `error`."""
    try:
        if isinstance(data, (bytes, str)):
            check_json_depth(data, what=f"{schema.__name__.removesuffix('Doc').lower()} document", error=error)
            return msgspec.json.decode(data, type=schema)
        return msgspec.convert(data, type=schema)
    except msgspec.ValidationError as exc:
        raise error(f"invalid {schema.__name__.removesuffix('Doc').lower()} document: {exc}") from None
    except msgspec.DecodeError as exc:
        raise error(f"not valid JSON: {exc}") from None


def _check_ids(values: Iterable[int], what: str) -> frozenset[int]:
    out = frozenset(values)
    for v in out:
        if v < 0 or v > MAX_ID:
            raise InvalidHostState(f"{what}: id {v} out of range")
    return out


def _siblings_from_doc(c: CellDoc, cpus: frozenset[int], where: str) -> tuple[tuple[int, ...], ...]:
    """SMT sibling groups: a partition of the cell's CPUs (each CPU alone when not given)."""
    if c.siblings is None:
        return tuple((cpu,) for cpu in sorted(cpus))
    groups: list[tuple[int, ...]] = [tuple(sorted(g)) for g in c.siblings if g]
    flat = [cpu for g in groups for cpu in g]
    if len(flat) != len(set(flat)):
        raise InvalidHostState(f"{where}.siblings: a CPU appears in two groups")
    if set(flat) != set(cpus):
        raise InvalidHostState(f"{where}.siblings: groups cover {sorted(set(flat))}, cell has {sorted(cpus)}")
    return tuple(sorted(groups))


def _pages_from_doc(c: CellDoc, where: str) -> list[PagePool]:
    """Page pools: sizes unique and in range, 0 <= free <= total."""
    pages: dict[int, PagePool] = {}
    for p in c.pages:
        if p.size_kb <= 0 or p.size_kb > MAX_DOC_PAGESIZE_KB or p.size_kb in pages:
            raise InvalidHostState(f"{where}.pages: bad or duplicate size_kb {p.size_kb}")
        if not (0 <= p.free <= p.total <= MAX_DOC_PAGE_COUNT):
            raise InvalidHostState(f"{where}.pages[{p.size_kb}]: need 0 <= free ({p.free}) <= total ({p.total})")
        pages[p.size_kb] = PagePool(p.size_kb, p.total, p.free)
    return list(pages.values())


def _distances_from_doc(c: CellDoc, where: str) -> dict[int, int]:
    out = {uint_or_none(k): v for k, v in c.distances.items()}
    if None in out:
        raise InvalidHostState(f"{where}.distances: keys must be cell ids (ASCII digits)")
    return {k: v for k, v in out.items() if k is not None}


def topology_from_doc(doc: TopologyDoc) -> HostTopology:
    problem = host_size_problem(len(doc.cells), sum(len(c.cpus) for c in doc.cells))
    if problem:
        raise InvalidHostState(f"host: {problem}")
    cells: list[NumaCell] = []
    seen_cpus: set[int] = set()
    cell_ids: set[int] = set()
    for i, c in enumerate(doc.cells):
        where = f"cells[{i}] (id {c.id})"
        if c.id in cell_ids:
            raise InvalidHostState(f"{where}: duplicate cell id")
        cell_ids.add(c.id)
        cpus = _check_ids(c.cpus, f"{where}.cpus")
        if cpus & seen_cpus:
            raise InvalidHostState(f"{where}: CPUs {sorted(cpus & seen_cpus)} belong to two cells")
        seen_cpus |= cpus
        if c.memory_kb < 0 or c.memory_kb > MAX_DOC_MEMORY_KB:
            raise InvalidHostState(f"{where}.memory_kb: {c.memory_kb} out of range")
        siblings = _siblings_from_doc(c, cpus, where)
        pages = _pages_from_doc(c, where)
        distances = _distances_from_doc(c, where)
        cell = numa_cell(c.id, cpus, siblings, c.memory_kb, pages, distances)
        problem = cell_problem(cell)
        if problem:
            raise InvalidHostState(f"{where}: {problem}")
        cells.append(cell)
    return HostTopology(
        hostname=doc.hostname,
        cells=tuple(sorted(cells, key=lambda c: c.id)),
        online_cpus=_online_from_doc(doc, frozenset(seen_cpus)),
        offline_cpus=_check_ids(doc.offline_cpus, "offline_cpus"),
        isolated_cpus=_check_ids(doc.isolated_cpus, "isolated_cpus"),
    )


def _online_from_doc(doc: TopologyDoc, cell_cpus: frozenset[int]) -> frozenset[int]:
    """The online CPUs: as listed (never also offline), else the cells' CPUs minus the offline ones
    (an offline CPU must never be offered, whatever a cell lists)."""
    offline = _check_ids(doc.offline_cpus, "offline_cpus")
    if doc.online_cpus is None:
        return cell_cpus - offline
    online = _check_ids(doc.online_cpus, "online_cpus")
    if online & offline:
        raise InvalidHostState(f"CPUs {format_id_list(online & offline)} are listed both online and offline")
    return online
