"""The orchestrator's values: what it knows of a host, of an instance, and why a host said no."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import msgspec

from agent.bus import schemas as s
from agent.bus.schemas import parse_version

Version = tuple[int, int]
InfoSource = Literal["event", "describe"]


class HostInstance(msgspec.Struct, frozen=True):
    """One running domain of describe_host's `instances` (agent.daemon.capabilities.running_instances)."""

    uuid: s.Name
    name: s.Name
    pinned: bool = False
    numa: bool = False


class DescribedHost(s.DescribeHostResult, frozen=True):
    """describe_host's result, plus `instances` where the agent lists them (the daemon: objects with
    uuid and name; older or simulated agents: uuids or names): a drain needs the list; an agent that
    does not send it is drained of the instances named."""

    instances: Annotated[list[HostInstance | s.Name], msgspec.Meta(max_length=4096)] = []

    def instance_ids(self) -> tuple[str, ...]:
        """What `describe_instance` is asked with: each instance's UUID (or the name given)."""
        return tuple(i.uuid if isinstance(i, HostInstance) else i for i in self.instances)


@dataclass(frozen=True, slots=True)
class HostInfo:
    """One agent as last heard of: its capabilities and when (`seen_at`, the orchestrator's clock)."""

    caps: s.Capabilities
    seen_at: float
    source: InfoSource
    instances: tuple[str, ...] = ()  # from describe_host when the agent lists them

    @property
    def name(self) -> str:
        return self.caps.host

    @property
    def rpc_max(self) -> Version:
        return parse_version(self.caps.rpc_versions.max)

    @property
    def rpc_min(self) -> Version:
        return parse_version(self.caps.rpc_versions.min)

    @property
    def traits(self) -> frozenset[str]:
        return frozenset(self.caps.traits)

    def age(self, now: float) -> float:
        return max(now - self.seen_at, 0.0)

    def destination(self) -> s.Destination:
        return s.Destination(host=self.name, libvirt_uri=self.caps.libvirt_uri, migration_uri=self.caps.migration_uri)


@dataclass(frozen=True, slots=True)
class Need:
    """What an instance takes from a host, per guest cell, as the capabilities can tell it."""

    cells: tuple["CellNeed", ...]
    pinned: bool
    page_kb: int | None  # an explicit hugepage size; None: see `huge_any`, else small pages
    huge_any: bool = False  # hw:mem_page_size=large/any: any hugepage pool with room will do


@dataclass(frozen=True, slots=True)
class CellNeed:
    pcpus: int  # dedicated vCPUs (plus nothing for emulator threads: the claim is the truth)
    shared_vcpus: int
    memory_mb: int


@dataclass(frozen=True, slots=True)
class Rejection:
    """A host that did not take the instance, and why (a filter, or the agent's typed answer)."""

    host: str
    reason: str
    kind: str = "filtered"  # filtered, NoFit, Busy, UnsupportedVersion, CallTimeout, ...
    details: dict[str, object] = field(default_factory=dict)
    retry_after: float | None = None  # Busy: when to ask again

    def __str__(self) -> str:
        return f"{self.host}: {self.kind}: {'; '.join(self.reason.splitlines())}"  # one line per host
