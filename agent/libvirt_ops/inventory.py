"""What the domains on this host hold: the libvirt edge of host state.

`read_domains(conn)` parses every running and defined domain's XML into DomainPlacement (the
typed view the claim ledger's host state counts). A domain that vanishes while we list is skipped;
a domain whose XML cannot be read or parsed is reported in `unreadable`, never silently dropped:
its usage is unknown, so callers that promise resources (claims) must refuse to do so on such a
host until an operator looks (see `DomainInventory.require_complete`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from agent.errors import AgentError, DomainXMLError
from agent.libvirt_ops.connection import _libvirt
from agent.libvirt_ops.domain_model import DomainPlacement
from agent.libvirt_ops.domain_read import parse_domain
from agent.libvirt_ops.errors import LibvirtOpError

log = logging.getLogger("compute_agent.inventory")


class IncompleteInventory(AgentError):
    """Some domains' placement could not be read, so this host's free resources are unknown."""

    code = "incomplete_inventory"


@dataclass(frozen=True, slots=True)
class DomainInventory:
    domains: tuple[DomainPlacement, ...]
    active_uuids: frozenset[str]  # lower-case UUIDs of running (or paused) domains
    unreadable: tuple[str, ...] = ()  # "name: why" for each domain we could not parse

    def require_complete(self) -> "DomainInventory":
        if self.unreadable:
            raise IncompleteInventory("cannot account for every domain on this host: " + "; ".join(self.unreadable))
        return self


def _label(dom: Any) -> str:
    """The domain's name, else its UUID, else "?": for messages only, so it never raises."""
    for getter in ("name", "UUIDString"):
        try:
            value = getattr(dom, getter)()
        except Exception:  # libvirtError or a broken binding: try the next one
            continue
        if isinstance(value, str) and value:
            return value
    return "?"


def read_domains(conn: Any) -> DomainInventory:
    """Parse every domain on `conn` (running: live XML; defined only: inactive XML)."""
    libvirt = _libvirt()
    try:
        doms = conn.listAllDomains(0)
    except libvirt.libvirtError as exc:
        raise LibvirtOpError.from_libvirt("cannot list domains", exc) from None
    placements: list[DomainPlacement] = []
    active: set[str] = set()
    unreadable: list[str] = []
    for dom in doms:
        try:
            name = dom.name()
            running = bool(dom.isActive())
            xml = dom.XMLDesc(0 if running else libvirt.VIR_DOMAIN_XML_INACTIVE)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                continue  # undefined while we listed: it holds nothing any more
            label = _label(dom)
            log.error("domain %s: cannot read its XML: %s", label, exc)
            unreadable.append(f"{label}: {exc.get_error_message()}")
            continue
        try:
            placement = parse_domain(xml)
        except (DomainXMLError, AgentError) as exc:
            log.error("domain %s: cannot read its placement: %s", name, exc)
            unreadable.append(f"{name}: {exc}")
            continue
        except Exception as exc:  # one domain must never break the host's inventory
            log.exception("domain %s: unexpected error reading its placement", name)
            unreadable.append(f"{name}: cannot read its placement ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        placements.append(placement)
        if running:
            active.add(placement.uuid.lower())
    return DomainInventory(tuple(placements), frozenset(active), tuple(unreadable))
