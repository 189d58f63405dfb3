"""Placements: where an instance's vCPUs, emulator threads and memory go on a host
(see shared/formats.md, Placement). Produced by the fitter, held by claims, applied by the XML
rewriter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import msgspec

from agent.errors import InvalidInput
from agent.limits import MAX_DOC_MEMORY_MB, MAX_DOC_PAGESIZE_KB, MAX_ID
from agent.numa.topology import decode_schema
from agent.numbers import uint_or_none
from agent.units import is_page_size


def _ids_ok(ids: Any) -> bool:
    return all(0 <= i <= MAX_ID for i in ids)


@dataclass(frozen=True, slots=True)
class CellPlacement:
    guest_cell: int
    host_cell: int
    vcpus: tuple[int, ...]  # guest vCPU ids, sorted
    cpu_pins: Mapping[int, tuple[int, ...]]  # vCPU -> host CPUs (one for dedicated)
    memory_mb: int
    pagesize_kb: int
    dedicated_vcpus: frozenset[int] = frozenset()  # which vCPUs are pinned one-to-one
    # host CPUs kept idle for this instance (siblings under thread policy `isolate`); they count
    # as used by the instance but nothing runs on them.
    reserved_cpus: frozenset[int] = frozenset()

    @property
    def pinned_cpus(self) -> frozenset[int]:
        """Host CPUs this cell takes exclusively (dedicated pins + reserved siblings)."""
        out = set(self.reserved_cpus)
        for v in self.dedicated_vcpus:
            out.update(self.cpu_pins[v])
        return frozenset(out)

    @property
    def floating_vcpu_count(self) -> int:
        return len(self.vcpus) - len(self.dedicated_vcpus)


@dataclass(frozen=True, slots=True)
class Placement:
    cells: tuple[CellPlacement, ...]
    emulator_pins: tuple[int, ...] = ()
    emulator_isolated: bool = False  # emulator_pins are a dedicated CPU taken for this instance

    fits = True

    def cell_for_guest(self, guest_cell: int) -> CellPlacement:
        for c in self.cells:
            if c.guest_cell == guest_cell:
                return c
        raise KeyError(guest_cell)

    @property
    def pinned_cpus(self) -> frozenset[int]:
        out: set[int] = set()
        for c in self.cells:
            out |= c.pinned_cpus
        if self.emulator_isolated:
            out.update(self.emulator_pins)
        return frozenset(out)

    @property
    def host_nodeset(self) -> tuple[int, ...]:
        return tuple(sorted({c.host_cell for c in self.cells}))

    def to_json(self) -> dict[str, Any]:
        return {
            "fits": True,
            "cells": [
                {
                    "guest_cell": c.guest_cell,
                    "host_cell": c.host_cell,
                    "vcpus": list(c.vcpus),
                    "cpu_pins": {str(v): list(c.cpu_pins[v]) for v in c.vcpus},
                    "memory_mb": c.memory_mb,
                    "pagesize_kb": c.pagesize_kb,
                    "dedicated_vcpus": sorted(c.dedicated_vcpus),
                    "reserved_cpus": sorted(c.reserved_cpus),
                }
                for c in self.cells
            ],
            "emulator_pins": list(self.emulator_pins),
            "emulator_isolated": self.emulator_isolated,
            "reason": None,
        }

    @classmethod
    def from_json(cls, data: Any) -> "Placement":
        """Read a placement document (ours, e.g. from a domain's agent metadata). Anything a fitter
        placement could not contain raises InvalidInput naming the field, so a bad document is
        rejected here instead of breaking whoever counts its usage."""
        doc = decode_schema(data, PlacementDoc, InvalidInput)
        if not doc.fits:
            raise InvalidInput("placement document says fits=false: there is no placement to read")
        cells = []
        seen_guest: set[int] = set()
        seen_vcpus: set[int] = set()
        for c in doc.cells:
            where = f"placement cell {c.guest_cell}"
            _check_cell_numbers(c, where, seen_guest)
            seen_guest.add(c.guest_cell)
            vcpus = _check_cell_vcpus(c, where, seen_vcpus)
            seen_vcpus |= vcpus
            cells.append(_cell_from_doc(c, where, vcpus))
        if not _ids_ok(doc.emulator_pins):
            raise InvalidInput(f"placement emulator_pins: host CPU ids must be in 0..{MAX_ID}")
        return cls(
            cells=tuple(sorted(cells, key=lambda c: c.guest_cell)),
            emulator_pins=tuple(sorted(doc.emulator_pins)),
            emulator_isolated=doc.emulator_isolated,
        )


def cell_placement(
    guest_cell: int,
    host_cell: int,
    vcpus: Iterable[int],
    cpu_pins: Mapping[int, tuple[int, ...]],
    memory_mb: int,
    pagesize_kb: int,
    dedicated_vcpus: Iterable[int],
    reserved_cpus: Iterable[int],
) -> CellPlacement:
    """A CellPlacement in its normal form (vCPUs sorted, sets frozen), from the fitter or a document."""
    return CellPlacement(
        guest_cell=guest_cell,
        host_cell=host_cell,
        vcpus=tuple(sorted(vcpus)),
        cpu_pins=cpu_pins,
        memory_mb=memory_mb,
        pagesize_kb=pagesize_kb,
        dedicated_vcpus=frozenset(dedicated_vcpus),
        reserved_cpus=frozenset(reserved_cpus),
    )


def _check_cell_numbers(c: CellPlacementDoc, where: str, seen_guest: set[int]) -> None:
    if not (0 <= c.guest_cell <= MAX_ID):
        raise InvalidInput(f"{where}.guest_cell: {c.guest_cell} out of range")
    if c.guest_cell in seen_guest:
        raise InvalidInput(f"{where}.guest_cell: guest cell {c.guest_cell} placed twice")
    if not (0 <= c.host_cell <= MAX_ID):
        raise InvalidInput(f"{where}.host_cell: {c.host_cell} out of range")
    if not (0 <= c.memory_mb <= MAX_DOC_MEMORY_MB):
        raise InvalidInput(f"{where}.memory_mb: {c.memory_mb} out of range (0..{MAX_DOC_MEMORY_MB})")
    if not (is_page_size(c.pagesize_kb) and c.pagesize_kb <= MAX_DOC_PAGESIZE_KB):
        raise InvalidInput(f"{where}.pagesize_kb: {c.pagesize_kb} is not a power of two in 4..{MAX_DOC_PAGESIZE_KB}")


def _check_cell_vcpus(c: CellPlacementDoc, where: str, seen_vcpus: set[int]) -> set[int]:
    vcpus = set(c.vcpus)
    if len(vcpus) != len(c.vcpus):
        raise InvalidInput(f"{where}.vcpus: duplicate vCPU ids")
    if any(not (0 <= v <= MAX_ID) for v in vcpus):
        raise InvalidInput(f"{where}.vcpus: vCPU ids must be in 0..{MAX_ID}")
    if vcpus & seen_vcpus:
        raise InvalidInput(f"{where}.vcpus: vCPUs {sorted(vcpus & seen_vcpus)} are in two guest cells")
    return vcpus


def _pins_from_doc(c: CellPlacementDoc, where: str, vcpus: set[int]) -> dict[int, tuple[int, ...]]:
    keyed = {uint_or_none(k): tuple(sorted(v)) for k, v in c.cpu_pins.items()}
    if None in keyed:
        raise InvalidInput(f"{where}: cpu_pins keys must be vCPU ids (ASCII digits)")
    pins = {k: v for k, v in keyed.items() if k is not None}
    if set(pins) != vcpus:
        raise InvalidInput(f"{where}: cpu_pins must map exactly its vcpus")
    for v, pin in pins.items():
        if not pin:
            raise InvalidInput(f"{where}.cpu_pins[{v}]: empty list of host CPUs")
        if not _ids_ok(pin):
            raise InvalidInput(f"{where}.cpu_pins[{v}]: host CPU ids must be in 0..{MAX_ID}")
    return pins


def _cell_from_doc(c: CellPlacementDoc, where: str, vcpus: set[int]) -> CellPlacement:
    pins = _pins_from_doc(c, where, vcpus)
    if not _ids_ok(c.reserved_cpus):
        raise InvalidInput(f"{where}.reserved_cpus: host CPU ids must be in 0..{MAX_ID}")
    if c.dedicated_vcpus is not None and not set(c.dedicated_vcpus) <= vcpus:
        raise InvalidInput(f"{where}.dedicated_vcpus: {sorted(set(c.dedicated_vcpus) - vcpus)} not among its vcpus")
    # documents older than dedicated_vcpus: a vCPU pinned to one CPU is dedicated
    dedicated = c.dedicated_vcpus if c.dedicated_vcpus is not None else [v for v, p in pins.items() if len(p) == 1]
    return cell_placement(
        c.guest_cell, c.host_cell, c.vcpus, pins, c.memory_mb, c.pagesize_kb, dedicated, c.reserved_cpus
    )


@dataclass(frozen=True, slots=True)
class NoFit:
    """The instance does not fit: `reason` says why, `cell_reasons` per host cell when known."""

    reason: str
    cell_reasons: Mapping[int, str] = field(default_factory=dict)

    fits = False

    def to_json(self) -> dict[str, Any]:
        return {"fits": False, "cells": [], "emulator_pins": [], "reason": self.reason}


FitResult = Placement | NoFit


class CellPlacementDoc(msgspec.Struct, frozen=True):
    guest_cell: int
    host_cell: int
    vcpus: list[int]
    cpu_pins: dict[str, list[int]]
    memory_mb: int
    pagesize_kb: int
    dedicated_vcpus: list[int] | None = None
    reserved_cpus: list[int] = []


class PlacementDoc(msgspec.Struct, frozen=True):
    fits: bool
    cells: list[CellPlacementDoc] = []
    emulator_pins: list[int] = []
    emulator_isolated: bool = False
    reason: str | None = None
