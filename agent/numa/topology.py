"""Host NUMA topology: the immutable facts discovery found (see shared/formats.md, Host topology).

JSON goes through a msgspec schema first, so shape and type errors come back with a path
(`$.cells[0].cpus[2]`) instead of a KeyError; semantic checks (siblings within the cell, sorted
ids, ...) follow in `HostTopology.from_json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import msgspec

from agent.errors import AgentError, InvalidHostState
from agent.json_input import check_json_depth
from agent.limits import MAX_DOC_MEMORY_KB, MAX_DOC_PAGE_COUNT, MAX_DOC_PAGESIZE_KB, MAX_ID
from agent.numbers import uint_or_none
from agent.units import SMALL_PAGE_KB as SMALL_PAGE_KB  # re-exported: the page size host documents name


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


@dataclass(frozen=True, slots=True)
class HostTopology:
    hostname: str
    cells: tuple[NumaCell, ...]
    online_cpus: frozenset[int]
    offline_cpus: frozenset[int] = frozenset()
    isolated_cpus: frozenset[int] = frozenset()

    def cell(self, cell_id: int) -> NumaCell:
        for c in self.cells:
            if c.id == cell_id:
                return c
        raise KeyError(cell_id)

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
    cells: list[NumaCell] = []
    seen_cpus: set[int] = set()
    for i, c in enumerate(doc.cells):
        where = f"cells[{i}] (id {c.id})"
        if any(cell.id == c.id for cell in cells):
            raise InvalidHostState(f"{where}: duplicate cell id")
        cpus = _check_ids(c.cpus, f"{where}.cpus")
        if cpus & seen_cpus:
            raise InvalidHostState(f"{where}: CPUs {sorted(cpus & seen_cpus)} belong to two cells")
        seen_cpus |= cpus
        if c.memory_kb < 0 or c.memory_kb > MAX_DOC_MEMORY_KB:
            raise InvalidHostState(f"{where}.memory_kb: {c.memory_kb} out of range")
        siblings = _siblings_from_doc(c, cpus, where)
        pages = _pages_from_doc(c, where)
        distances = _distances_from_doc(c, where)
        cells.append(numa_cell(c.id, cpus, siblings, c.memory_kb, pages, distances))
    online = _check_ids(doc.online_cpus, "online_cpus") if doc.online_cpus is not None else frozenset(seen_cpus)
    return HostTopology(
        hostname=doc.hostname,
        cells=tuple(sorted(cells, key=lambda c: c.id)),
        online_cpus=online,
        offline_cpus=_check_ids(doc.offline_cpus, "offline_cpus"),
        isolated_cpus=_check_ids(doc.isolated_cpus, "isolated_cpus"),
    )
