"""What a domain's XML says about where it runs: the values `domain_read` produces and the
rewriter and host state consume (see DESIGN.md, host state). Pure data, no parsing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, overload

from agent.units import SMALL_PAGE_KB

# Namespace of the metadata element the agent writes into domains it places, so that host state
# can count exactly what a domain holds (isolated siblings, emulator CPU) instead of guessing.
PLACEMENT_NS = "https://compute-agent.dev/xmlns/placement/1"


@dataclass(frozen=True, slots=True)
class GuestNumaCell:
    """`<cpu><numa><cell id= cpus= memory=>`: a guest-side NUMA cell."""

    id: int
    cpus: frozenset[int]
    memory_kib: int


@dataclass(frozen=True, slots=True)
class HugepageBacking:
    """One `<memoryBacking><hugepages><page size= nodeset=>`; size None = host default size,
    guest_nodeset None = every guest cell."""

    size_kib: int | None
    guest_nodeset: frozenset[int] | None


@dataclass(frozen=True, slots=True)
class DomainPlacement:
    """What a domain's XML says about where it runs (see DESIGN.md, host state)."""

    name: str
    uuid: str
    vcpus: int
    memory_kib: int
    vcpu_cpuset: frozenset[int] | None = None  # <vcpu cpuset=...>
    vcpu_pins: Mapping[int, frozenset[int]] = field(default_factory=dict)  # cputune/vcpupin
    emulator_pins: frozenset[int] | None = None  # cputune/emulatorpin
    iothread_pins: Mapping[int, frozenset[int]] = field(default_factory=dict)  # cputune/iothreadpin
    guest_cells: tuple[GuestNumaCell, ...] = ()
    numatune_mode: str | None = None  # numatune/memory@mode
    numatune_nodeset: frozenset[int] | None = None  # numatune/memory@nodeset
    memnodes: Mapping[int, frozenset[int]] = field(default_factory=dict)  # guest cell -> host nodes
    hugepages: tuple[HugepageBacking, ...] = ()  # empty = small pages
    # Placement JSON the agent recorded in <metadata> when it placed this domain (None if absent).
    agent_placement: Mapping[str, object] | None = None


@overload
def guest_cell_page_kib(dom: DomainPlacement, guest_cell: int, *, default_hugepage_kb: int) -> int: ...


@overload
def guest_cell_page_kib(dom: DomainPlacement, guest_cell: int, *, default_hugepage_kb: None = None) -> int | None: ...


def guest_cell_page_kib(dom: DomainPlacement, guest_cell: int, *, default_hugepage_kb: int | None = None) -> int | None:
    """The page size (KiB) backing guest cell `guest_cell` (0 for a domain without guest NUMA cells):
    4 without <hugepages>; else the size of the <page> whose nodeset holds the cell, else of the
    <page> without nodeset, else 4 (libvirt's choice). A bare <hugepages/> or a <page> without size
    means the host's default hugepage size: `default_hugepage_kb` (None when the caller does not
    know it, e.g. the rewriter, which only checks that some hugepage size was chosen).

    Example: <page size='1' unit='G' nodeset='1'/><page size='2048'/> -> cell 1: 1048576, cell 0: 2048.
    """
    if not dom.hugepages:
        return SMALL_PAGE_KB
    chosen = next((h for h in dom.hugepages if h.guest_nodeset is not None and guest_cell in h.guest_nodeset), None)
    if chosen is None:
        chosen = next((h for h in dom.hugepages if h.guest_nodeset is None), None)
    if chosen is None:
        return SMALL_PAGE_KB
    return chosen.size_kib if chosen.size_kib is not None else default_hugepage_kb
