"""An orchestrator's connection to the fleet: one RpcClient, one EventSubscriber feeding the fleet
view (`capabilities.*`) and the migration tracker (`migration.*.progress|done`), and a broadcast
`describe_host` so the view is complete without waiting for the next capabilities round."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from agent.bus.errors import RemoteError
from agent.bus.events import EventSubscriber
from agent.bus.keys import Keyring
from agent.bus.rpc import RpcClient
from agent.bus.schemas import Capabilities
from agent.config import AgentConfig
from agent.orchestrator.agent_api import AgentAPI
from agent.orchestrator.fleet import FleetView
from agent.orchestrator.migrate import Orchestrator
from agent.orchestrator.settings import Settings
from agent.orchestrator.tracker import MigrationTracker
from agent.orchestrator.versions import fmt

log = logging.getLogger("compute_agent.orchestrator")


@dataclass
class Session:
    client: RpcClient
    events: EventSubscriber
    fleet: FleetView
    tracker: MigrationTracker
    api: AgentAPI
    orchestrator: Orchestrator

    @classmethod
    def open(cls, cfg: AgentConfig, *, sender: str | None = None, discover: bool = True) -> Session:
        settings = Settings.from_config(cfg)
        keyring = Keyring.from_file(cfg.bus.key_file)
        name = sender or f"orchestrator@{socket.gethostname()}"
        client = RpcClient(cfg.bus, keyring, sender=name, version_cap="1.1")
        fleet, tracker = FleetView(), MigrationTracker()
        events = EventSubscriber(cfg.bus, keyring, name=name)
        events.subscribe("capabilities.*", fleet.on_capabilities, body_type=Capabilities)
        for pattern, handler, body_type in tracker.handlers():
            events.subscribe(pattern, handler, body_type=body_type)
        try:
            events.start()
        except Exception:
            client.close()
            raise
        api = AgentAPI(client, peer_versions=fleet.peer_versions)
        session = cls(client, events, fleet, tracker, api, Orchestrator(api, fleet, settings))
        if discover:
            try:
                session.discover()
            except BaseException:
                session.close()
                raise
        return session

    def discover(self) -> dict[str, RemoteError]:
        """A broadcast describe_host into the fleet view; the agents that answered with an error."""
        timeout = self.orchestrator.settings.discovery_timeout_s
        errors = self.fleet.merge_described(self.api.describe_all_hosts(timeout))
        for host, exc in errors.items():
            log.warning("describe_host on %s: %s", host, exc)
        live = self.orchestrator.live_hosts()
        log.info("%d live agents; version cap %s", len(live), fmt(self.orchestrator.cap(live)))
        return errors

    def close(self) -> None:
        self.events.stop()
        self.client.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
