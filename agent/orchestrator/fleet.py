"""The fleet as the orchestrator sees it: every agent's last capabilities (from `capabilities.<host>`
events and a broadcast `describe_host`) with the time it was heard. Thread-safe: the event
subscriber's thread writes while commands read. Holds nothing the agents do not also hold.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable

import msgspec

from agent.bus import schemas as s
from agent.bus.errors import RemoteError
from agent.orchestrator.model import DescribedHost, HostInfo, Version


class FleetView:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._hosts: dict[str, HostInfo] = {}
        self._lock = threading.Lock()
        self.events_seen = 0

    def on_capabilities(self, _routing_key: str, caps: s.Capabilities) -> None:
        """An EventSubscriber handler for `capabilities.*` (body_type=Capabilities). A lower `seq`
        than the one held is an old event overtaken by a newer one and is ignored, unless the
        agent restarted (its seq begins again: the event is newer than what we hold)."""
        with self._lock:
            self.events_seen += 1
            held = self._hosts.get(caps.host)
            if held is not None and caps.seq < held.caps.seq and caps.ts <= held.caps.ts:
                return
            instances = held.instances if held is not None else ()
            self._hosts[caps.host] = HostInfo(caps, self.clock(), "event", instances)

    def merge_described(self, replies: dict[str, DescribedHost | RemoteError]) -> dict[str, RemoteError]:
        """Take a broadcast describe_host's answers; the errors, by host, are returned."""
        now, errors = self.clock(), {}
        with self._lock:
            for host, reply in replies.items():
                if isinstance(reply, RemoteError):
                    errors[host] = reply
                    continue
                caps = msgspec.convert(msgspec.to_builtins(reply), s.Capabilities)
                self._hosts[caps.host] = HostInfo(caps, now, "describe", reply.instance_ids())
        return errors

    def put(self, info: HostInfo) -> None:
        with self._lock:
            self._hosts[info.name] = info

    def get(self, host: str) -> HostInfo | None:
        with self._lock:
            return self._hosts.get(host)

    def all(self) -> list[HostInfo]:
        with self._lock:
            return sorted(self._hosts.values(), key=lambda h: h.name)

    def live(self, max_age_s: float) -> list[HostInfo]:
        """The hosts heard of within `max_age_s` (older information: the agent may be gone)."""
        now = self.clock()
        return [h for h in self.all() if h.age(now) <= max_age_s]

    def peer_versions(self, host: str) -> Version | None:
        """For AgentAPI: the highest version `host` advertises (None: never heard of)."""
        info = self.get(host)
        return info.rpc_max if info is not None else None


def lowest_max(hosts: Iterable[HostInfo]) -> Version | None:
    versions = [h.rpc_max for h in hosts]
    return min(versions) if versions else None
