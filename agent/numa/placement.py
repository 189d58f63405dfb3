"""Placements: where an instance's vCPUs, emulator threads and memory go on a host
(see shared/formats.md, Placement). Produced by the fitter, held by claims, applied by the XML
rewriter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import msgspec

from agent.errors import InvalidInput
from agent.numa.topology import decode_schema


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
        doc = decode_schema(data, PlacementDoc, InvalidInput)
        if not doc.fits:
            raise InvalidInput("placement document says fits=false: there is no placement to read")
        cells = []
        for c in doc.cells:
            try:
                pins = {int(k): tuple(sorted(v)) for k, v in c.cpu_pins.items()}
            except ValueError:
                raise InvalidInput(f"placement cell {c.guest_cell}: cpu_pins keys must be vCPU ids") from None
            if set(pins) != set(c.vcpus):
                raise InvalidInput(f"placement cell {c.guest_cell}: cpu_pins must map exactly its vcpus")
            dedicated = (
                frozenset(c.dedicated_vcpus)
                if c.dedicated_vcpus is not None
                else frozenset(v for v, p in pins.items() if len(p) == 1)
            )
            cells.append(
                CellPlacement(
                    guest_cell=c.guest_cell,
                    host_cell=c.host_cell,
                    vcpus=tuple(sorted(c.vcpus)),
                    cpu_pins=pins,
                    memory_mb=c.memory_mb,
                    pagesize_kb=c.pagesize_kb,
                    dedicated_vcpus=dedicated,
                    reserved_cpus=frozenset(c.reserved_cpus),
                )
            )
        return cls(
            cells=tuple(sorted(cells, key=lambda c: c.guest_cell)),
            emulator_pins=tuple(sorted(doc.emulator_pins)),
            emulator_isolated=doc.emulator_isolated,
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
