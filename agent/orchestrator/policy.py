"""The instance's migration policy as the orchestrator sees it: validated, turned into required
traits, and explained (which part came from the flavor, the image or the host config).

Validation is the one parser of instance metadata (agent.numa.request.parse_request): a flavor /
image conflict or both features `true` raises InvalidRequest naming the keys, before any host is
asked for anything. `true` for a feature = its trait is required of the destination; `false` or
nothing = nothing required (the feature is just not used, or the host config decides).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from agent.bus import schemas as s
from agent.libvirt_ops.policy import TRAIT_AUTO_CONVERGE, TRAIT_POST_COPY
from agent.numa.request import InstanceRequest, MigrationWishes, PageSizeKind, parse_request
from agent.orchestrator.model import CellNeed, Need

_FEATURE_TRAITS = (("auto_converge", TRAIT_AUTO_CONVERGE), ("post_copy", TRAIT_POST_COPY))


@dataclass(frozen=True, slots=True)
class PolicyPart:
    feature: str  # auto_converge, post_copy
    value: bool | None  # None: the metadata says nothing
    source: str  # "flavor <key>", "image <key>" or "host config"


@dataclass(frozen=True, slots=True)
class InstancePlan:
    """An instance ready to be placed: its request document, parsed request and what it requires."""

    info: s.DescribeInstanceResult
    doc: dict[str, Any]  # the formats.md instance request sent with fit and claim
    request: InstanceRequest
    required_traits: frozenset[str]
    parts: tuple[PolicyPart, ...]
    numa: bool  # has a NUMA topology (pinning, cells, page size, or pins in its placement)

    @property
    def uuid(self) -> str:
        return self.info.uuid


def request_doc(info: s.DescribeInstanceResult) -> dict[str, Any]:
    return {
        "uuid": info.uuid,
        "vcpus": info.vcpus,
        "memory_mb": info.memory_mb,
        "extra_specs": dict(info.extra_specs),
        "image_properties": dict(info.image_properties),
    }


def required_traits(wishes: MigrationWishes) -> frozenset[str]:
    """`true` = the feature's trait; `false` or unsaid = nothing required."""
    return frozenset(trait for name, trait in _FEATURE_TRAITS if getattr(wishes, name) is True)


def policy_parts(wishes: MigrationWishes) -> tuple[PolicyPart, ...]:
    def part(name: str) -> PolicyPart:
        key = getattr(wishes, f"{name}_key")
        if key is None:
            return PolicyPart(name, None, "host config")
        return PolicyPart(name, getattr(wishes, name), f"{'flavor' if ':' in key else 'image'} {key}")

    return tuple(part(name) for name, _ in _FEATURE_TRAITS)


def has_numa_topology(request: InstanceRequest, placement: s.PlacementDoc | None) -> bool:
    """Nova's "instance has a NUMA topology": pinning, guest cells, a page size, or pins now."""
    asked = request.is_pinned or not request.numa_implicit or request.page_size is not None
    return asked or (placement is not None and any(c.cpu_pins for c in placement.cells))


def plan_instance(info: s.DescribeInstanceResult) -> InstancePlan:
    """Validate and explain; agent.errors.InvalidRequest (naming the keys) on any conflict."""
    doc = request_doc(info)
    request = parse_request(doc)
    return InstancePlan(
        info=info,
        doc=doc,
        request=request,
        required_traits=required_traits(request.migration),
        parts=policy_parts(request.migration),
        numa=has_numa_topology(request, info.placement),
    )


def instance_need(request: InstanceRequest) -> Need:
    """What each guest cell takes, in the units the capabilities publish."""
    page_kb = None
    if request.page_size is not None and request.page_size.kind is PageSizeKind.EXPLICIT:
        page_kb = request.page_size.size_kb
    cells = tuple(
        CellNeed(
            pcpus=len(c.dedicated_vcpus),
            shared_vcpus=len(c.floating_vcpus),
            memory_mb=c.memory_mb,
        )
        for c in request.cells
    )
    kind = request.page_size.kind if request.page_size is not None else PageSizeKind.SMALL
    return Need(
        cells=cells,
        pinned=request.is_pinned,
        page_kb=page_kb if page_kb and page_kb > 4 else None,
        huge_any=kind in (PageSizeKind.LARGE, PageSizeKind.ANY),
    )


def placement_summary(placement: s.PlacementDoc | dict[str, Any] | None) -> str:
    """ "cell 0 -> host cell 1: vCPU 0->21 1->22" (for the live view and the final report)."""
    if placement is None:
        return "not pinned"
    doc = placement if isinstance(placement, s.PlacementDoc) else msgspec.convert(placement, s.PlacementDoc)
    parts = []
    for c in doc.cells:
        pins = " ".join(f"{v}->{','.join(map(str, cpus))}" for v, cpus in sorted(c.cpu_pins.items(), key=_vcpu))
        parts.append(f"guest cell {c.guest_cell} -> host cell {c.host_cell}" + (f": vCPU {pins}" if pins else ""))
    if doc.emulator_pins:
        parts.append("emulator -> " + ",".join(map(str, doc.emulator_pins)))
    return "; ".join(parts) or "not pinned"


def _vcpu(item: tuple[str, list[int]]) -> int:
    return int(item[0]) if item[0].isdigit() else 0
