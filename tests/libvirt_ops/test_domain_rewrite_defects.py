"""Regression tests for the rewriter's numatune defects of issue 11: the rewrite kept no mode but
`strict` (defect 6), and bound the memory of floating guests that overcommit RAM to one node
(defect 7)."""

from __future__ import annotations

from typing import Iterable

import pytest

from agent.errors import DomainXMLError
from agent.libvirt_ops import domain_rewrite
from agent.libvirt_ops.domain_xml import parse_domain, rewrite_for_placement
from agent.numa.placement import CellPlacement, Placement
from agent.xmlsafe import Node

MODES = ("strict", "interleave", "preferred", "restrictive")

TWO_CELLS = """<domain type='kvm'>
  <name>g</name>
  <uuid>6f1c3a52-1d0e-4b8e-9c3e-2a7b1f4d5e60</uuid>
  <memory unit='KiB'>2097152</memory>
  <vcpu placement='static'>4</vcpu>
  <numatune>{numatune}
  </numatune>
  <cpu>
    <numa>
      <cell id='0' cpus='0-1' memory='1048576' unit='KiB'/>
      <cell id='1' cpus='2-3' memory='1048576' unit='KiB'/>
    </numa>
  </cpu>
</domain>
"""


def two_cells(*lines: str) -> str:
    return TWO_CELLS.format(numatune="".join("\n    " + line for line in lines))


def swapped(pagesize_kb: int = 4) -> Placement:
    """Guest cell 0 on host cell 1 and guest cell 1 on host cell 0, every vCPU dedicated."""
    return Placement(
        cells=(
            CellPlacement(0, 1, (0, 1), {0: (10,), 1: (11,)}, 1024, pagesize_kb, dedicated_vcpus=frozenset({0, 1})),
            CellPlacement(1, 0, (2, 3), {2: (0,), 3: (1,)}, 1024, pagesize_kb, dedicated_vcpus=frozenset({2, 3})),
        ),
        emulator_pins=(5,),
    )


def numatune_text(out: str) -> str:
    return out[out.index("<numatune>") : out.index("</numatune>")]


# --- defect 6: the modes are kept, only the nodesets change ---------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_memory_and_memnode_modes_are_kept(mode: str) -> None:
    other = MODES[(MODES.index(mode) + 1) % len(MODES)]
    xml = two_cells(
        f"<memory mode='{mode}' nodeset='0-1'/>",
        f"<memnode cellid='0' mode='{mode}' nodeset='0'/>",
        f'<memnode mode="{other}" nodeset="1" cellid="1"/>',
    )
    out = rewrite_for_placement(xml, swapped())
    # every byte of numatune but the memnodes' nodesets is as it was (quotes and attribute order too)
    assert numatune_text(out) == numatune_text(
        two_cells(
            f"<memory mode='{mode}' nodeset='0-1'/>",
            f"<memnode cellid='0' mode='{mode}' nodeset='1'/>",
            f'<memnode mode="{other}" nodeset="0" cellid="1"/>',
        )
    )
    after = parse_domain(out)
    assert after.numatune_mode == mode
    assert dict(after.memnodes) == {0: {1}, 1: {0}}
    assert rewrite_for_placement(out, swapped()) == out


@pytest.mark.parametrize("mode", MODES)
def test_single_node_memory_mode_is_kept_and_missing_memnodes_are_strict(mode: str) -> None:
    out = rewrite_for_placement(two_cells(f"<memory mode='{mode}' nodeset='3'/>"), swapped())
    assert numatune_text(out) == numatune_text(
        two_cells(
            f"<memory mode='{mode}' nodeset='0-1'/>",
            "<memnode cellid='0' mode='strict' nodeset='1'/>",
            "<memnode cellid='1' mode='strict' nodeset='0'/>",
        )
    )
    assert parse_domain(out).numatune_mode == mode


@pytest.mark.parametrize("mode", MODES)
def test_memnode_modes_kept_when_memory_is_created(mode: str) -> None:
    xml = two_cells(f"<memnode cellid='1' mode='{mode}' nodeset='1'/>")
    out = rewrite_for_placement(xml, swapped())
    # <memory> goes before the memnodes (libvirt's order), the missing memnode after the last one
    assert numatune_text(out) == numatune_text(
        two_cells(
            "<memory mode='strict' nodeset='0-1'/>",
            f"<memnode cellid='1' mode='{mode}' nodeset='0'/>",
            "<memnode cellid='0' mode='strict' nodeset='1'/>",
        )
    )
    assert rewrite_for_placement(out, swapped()) == out


def test_memnode_of_no_guest_cell_goes_and_others_keep_their_mode() -> None:
    xml = two_cells(
        "<memnode cellid='7' mode='preferred' nodeset='0'/>",
        "<memnode cellid='0' mode='interleave' nodeset='0'/>",
    )
    out = rewrite_for_placement(xml, swapped())
    assert numatune_text(out) == numatune_text(
        two_cells(
            "<memory mode='strict' nodeset='0-1'/>",
            "<memnode cellid='0' mode='interleave' nodeset='1'/>",
            "<memnode cellid='1' mode='strict' nodeset='0'/>",
        )
    )


def test_auto_placed_memory_gets_the_nodeset_and_keeps_its_mode() -> None:
    out = rewrite_for_placement(two_cells("<memory mode='interleave' placement='auto'/>"), swapped())
    assert "<memory mode='interleave' placement='static' nodeset='0-1'/>" in out
    after = parse_domain(out)
    assert (after.numatune_mode, after.numatune_nodeset) == ("interleave", {0, 1})


def test_memory_without_mode_stays_without_mode() -> None:
    out = rewrite_for_placement(two_cells("<memory nodeset='0'/>"), swapped())
    assert "<memory nodeset='0-1'/>" in out  # libvirt's default (strict) stays implicit


def test_read_back_refuses_a_changed_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The read-back check guards the modes too: an edit that changed one is an internal error."""
    real = domain_rewrite._nodeset_change

    def also_mode(node: Node, nodes: Iterable[int]) -> dict[str, str | None]:
        return {**real(node, nodes), "mode": "strict"}

    monkeypatch.setattr(domain_rewrite, "_nodeset_change", also_mode)
    xml = two_cells("<memory mode='strict' nodeset='0-1'/>", "<memnode cellid='0' mode='preferred' nodeset='0'/>")
    with pytest.raises(DomainXMLError, match="numatune memnode mode"):
        rewrite_for_placement(xml, swapped())
    with pytest.raises(DomainXMLError, match="numatune memory"):
        rewrite_for_placement(two_cells("<memory mode='interleave' nodeset='0-1'/>"), swapped())


# --- defect 7: memory is bound only where the placement pins it -----------------------------------

PLAIN = """<domain type='kvm'>
  <name>p</name>
  <uuid>8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a12</uuid>
  <memory unit='KiB'>6291456</memory>{backing}
  <vcpu placement='static'>2</vcpu>{numatune}
  <os><type arch='x86_64'>hvm</type></os>
</domain>
"""


def plain(numatune: str = "", backing: str = "") -> str:
    """A guest without NUMA topology: 2 vCPUs, 6 GiB."""
    return PLAIN.format(numatune=numatune and "\n  " + numatune, backing=backing and "\n  " + backing)


def one_cell(*, dedicated: frozenset[int] = frozenset(), pagesize_kb: int = 4, isolated: bool = False) -> Placement:
    pins = {v: ((20 + v,) if v in dedicated else (2, 3)) for v in (0, 1)}
    cell = CellPlacement(0, 1, (0, 1), pins, 6144, pagesize_kb, dedicated_vcpus=dedicated)
    return Placement(cells=(cell,), emulator_pins=(9,) if isolated else (2, 3), emulator_isolated=isolated)


def test_floating_small_page_guest_without_numa_gets_no_binding() -> None:
    xml = plain()
    out = rewrite_for_placement(xml, one_cell())
    assert "numatune" not in out
    after = parse_domain(out)
    assert (after.numatune_mode, after.numatune_nodeset, dict(after.memnodes)) == (None, None, {})
    assert after.vcpu_pins == {0: {2, 3}, 1: {2, 3}}  # the CPUs are still placed
    assert rewrite_for_placement(out, one_cell()) == out


def test_floating_guest_keeps_an_unbound_numatune_as_it_is() -> None:
    xml = plain("<numatune><memory mode='interleave' placement='auto'/></numatune>")
    out = rewrite_for_placement(xml, one_cell())
    assert "<numatune><memory mode='interleave' placement='auto'/></numatune>" in out
    empty = rewrite_for_placement(plain("<numatune/>"), one_cell())
    assert "<numatune/>" in empty


@pytest.mark.parametrize("mode", MODES)
def test_floating_guest_that_had_a_binding_keeps_it_on_the_new_node(mode: str) -> None:
    out = rewrite_for_placement(plain(f"<numatune><memory mode='{mode}' nodeset='0'/></numatune>"), one_cell())
    assert f"<numatune><memory mode='{mode}' nodeset='1'/></numatune>" in out


@pytest.mark.parametrize(
    "why,xml,placement",
    [
        ("dedicated vCPU", plain(), one_cell(dedicated=frozenset({0}))),
        ("isolated emulator", plain(), one_cell(isolated=True)),
        ("hugepages", plain(backing="<memoryBacking><hugepages/></memoryBacking>"), one_cell(pagesize_kb=2048)),
    ],
)
def test_pinned_memory_is_bound_strict(why: str, xml: str, placement: Placement) -> None:
    out = rewrite_for_placement(xml, placement)
    assert "<numatune>\n    <memory mode='strict' nodeset='1'/>\n  </numatune>" in out, why


def test_floating_guest_with_numa_topology_is_bound() -> None:
    floating = Placement(
        cells=(
            CellPlacement(0, 1, (0, 1), {0: (10, 11), 1: (10, 11)}, 1024, 4),
            CellPlacement(1, 0, (2, 3), {2: (0, 1), 3: (0, 1)}, 1024, 4),
        ),
        emulator_pins=(0, 1, 10, 11),
    )
    out = rewrite_for_placement(two_cells("<memory mode='preferred' nodeset='0-1'/>"), floating)
    after = parse_domain(out)
    assert (after.numatune_mode, after.numatune_nodeset) == ("preferred", {0, 1})
    assert dict(after.memnodes) == {0: {1}, 1: {0}}


def test_fitter_placement_of_an_overcommitting_guest_is_not_bound() -> None:
    """End to end: the fitter puts a plain shared instance (no NUMA, no page size) with overcommitted
    RAM on one host cell; its destination XML binds no memory, so the node cannot run out."""
    from agent.numa.fit import fit
    from agent.numa.request import parse_request
    from agent.testing.builders import host_state, state_cell

    request = parse_request({"uuid": "8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a12", "vcpus": 2, "memory_mb": 6144})
    state = host_state(
        state_cell(0, [0, 1], small_mb=4096, small_free_mb=0),
        state_cell(1, [2, 3], small_mb=8192, small_free_mb=4096),
        ram_allocation_ratio=1.5,
    )
    placement = fit(request, state)
    assert isinstance(placement, Placement) and placement.cells[0].host_cell == 1
    assert placement.cells[0].memory_mb > state.resources(1).small_free_mb  # RAM overcommitted
    assert "numatune" not in rewrite_for_placement(plain(), placement)
