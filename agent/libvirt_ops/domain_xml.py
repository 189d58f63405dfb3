"""Domain XML: read a domain's placement, rewrite it for a new Placement (the public names, one
import away; each lives in its own module).

- `parse_domain(xml) -> DomainPlacement` (agent.libvirt_ops.domain_read): name, uuid, vCPUs,
  memory, pinning, guest NUMA cells, numatune, hugepages and the agent's own `<metadata>` record.
- `rewrite_for_placement(xml, placement, *, floating_cpuset=None) -> str`
  (agent.libvirt_ops.domain_rewrite): the destination XML of a live migration.
- the values (agent.libvirt_ops.domain_model) and the hardened, span-preserving parser
  (agent.xmlsafe) both share.
"""

from __future__ import annotations

from agent.libvirt_ops.domain_model import (
    PLACEMENT_NS,
    DomainPlacement,
    GuestNumaCell,
    HugepageBacking,
    guest_cell_page_kib,
)
from agent.libvirt_ops.domain_read import parse_domain
from agent.libvirt_ops.domain_rewrite import floating_vcpus, placement_json_text, rewrite_for_placement
from agent.limits import MAX_METADATA_CHARS, MAX_XML_BYTES

__all__ = [
    "MAX_METADATA_CHARS",
    "MAX_XML_BYTES",
    "PLACEMENT_NS",
    "DomainPlacement",
    "GuestNumaCell",
    "HugepageBacking",
    "floating_vcpus",
    "guest_cell_page_kib",
    "parse_domain",
    "placement_json_text",
    "rewrite_for_placement",
]
