"""Real `compute-agent daemon` processes on the testbed hosts (agent.testing.testbed), one per host,
each with its own config and state directory, all on the machine's RabbitMQ under one exchange
prefix and one key file: the orchestrator's testbed tests and `scripts/demo` start them this way.

    fleet = AgentFleet(hosts, base, prefix="demo-1a2b", extra={"tb-host2": {"compute": {...}}})
    with fleet:                       # start, wait until each answers describe_host; SIGTERM after
        conf = fleet.orchestrator_config({"compute": {"placement_preference": "pack"}})
        subprocess.run([..., "compute-agent", "--config", conf, "migrate", ...])
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from agent.bus.errors import BusError, RemoteError
from agent.bus.keys import Keyring
from agent.bus.rpc import RpcClient
from agent.bus.transport import Names, make_connection
from agent.config import load_config
from agent.testing.testbed import HOT_MIGRATION, REPO, TestbedHost

Sections = Mapping[str, Mapping[str, str]]
READY_S = 90.0  # three daemons starting at once on two shared cores answer within this
STOP_S = 20.0  # a daemon exits within 10 s of SIGTERM (issue 9); twice that before SIGKILL


def ini(sections: Sections) -> str:
    """An INI text of `sections` (empty sections left out)."""
    return "".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in o.items()) for s, o in sections.items() if o)


def merged(*layers: Sections) -> dict[str, dict[str, str]]:
    """Sections merged option by option, later layers winning."""
    out: dict[str, dict[str, str]] = {}
    for layer in layers:
        for section, options in layer.items():
            out.setdefault(section, {}).update(options)
    return out


def hot_migration() -> dict[str, str]:
    """[libvirt] options that let the testbed's non-converging guest show the policies (HOT_MIGRATION)."""
    return {k: str(v) for k, v in HOT_MIGRATION.items()}


@dataclass
class AgentProcess:
    """One daemon: its host, files and process."""

    host: TestbedHost
    config_path: Path
    log_path: Path
    state_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "agent.cli", "daemon", "--config", str(self.config_path)]
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL if it hangs); the exit status (None: it was not running)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class AgentFleet:
    """Daemons on `hosts` with their files under `base`; `extra` adds config per host name."""

    def __init__(
        self,
        hosts: Sequence[TestbedHost],
        base: Path,
        *,
        prefix: str,
        common: Sections | None = None,
        extra: Mapping[str, Sections] | None = None,
    ) -> None:
        self.base, self.prefix = base, prefix
        base.mkdir(parents=True, exist_ok=True)
        self.key_file = base / "bus.keys"
        self.key_file.write_text(f"k1 {secrets.token_hex(32)}\n")
        self.key_file.chmod(0o600)
        self.common = common or {}
        self.agents = [self._agent(h, (extra or {}).get(h.name, {})) for h in hosts]
        self.client: RpcClient | None = None

    def bus_options(self) -> dict[str, str]:
        return {"exchange_prefix": self.prefix, "key_file": str(self.key_file), "call_timeout_s": "15"}

    def _agent(self, host: TestbedHost, extra: Sections) -> AgentProcess:
        agent = AgentProcess(
            host, self.base / f"{host.name}.conf", self.base / f"{host.name}.log", self.base / host.name
        )
        self.write_config(agent, extra)
        return agent

    def write_config(self, agent: AgentProcess, extra: Sections) -> None:
        host = agent.host
        sections = merged(
            {
                "DEFAULT": {"host": host.name, "my_ip": host.address, "log_level": "INFO"},
                "libvirt": {"connection_uri": host.uri},
                "claims": {"state_dir": str(agent.state_dir)},
                "bus": {**self.bus_options(), "progress_interval_s": "0.5"},
            },
            self.common,
            extra,
        )
        agent.config_path.write_text(ini(sections))

    def orchestrator_config(self, extra: Sections | None = None, name: str = "orchestrator") -> Path:
        """An orchestrator's config on this fleet's bus (with `extra`, e.g. [upgrade_levels])."""
        path = self.base / f"{name}.conf"
        path.write_text(
            ini(merged({"bus": self.bus_options(), "orchestrator": {"discovery_timeout_s": "3"}}, extra or {}))
        )
        return path

    def agent(self, host_name: str) -> AgentProcess:
        return next(a for a in self.agents if a.host.name == host_name)

    # --- life ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Launch every daemon and wait until each serves."""
        self.launch()
        self.wait_all()

    def launch(self) -> None:
        """Start the processes and return (they start while the caller does something else)."""
        bus = load_config(self.agents[0].config_path).bus
        self.client = RpcClient(bus, Keyring.from_file(self.key_file), sender=f"orchestrator@{self.prefix}")
        for agent in self.agents:
            agent.start()

    def wait_all(self) -> None:
        for agent in self.agents:
            self.wait_ready(agent)

    def wait_ready(self, agent: AgentProcess, timeout: float = READY_S) -> None:
        """Until `agent` answers describe_host; RuntimeError (with its log) when it died or never did."""
        assert self.client is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if agent.proc is None or agent.proc.poll() is not None:
                raise RuntimeError(f"the daemon on {agent.host.name} exited:\n{agent.log_tail()}")
            try:
                self.client.call(agent.host.name, "describe_host", {}, timeout=3.0)
                return
            except (BusError, RemoteError):
                time.sleep(0.3)
        raise RuntimeError(f"the daemon on {agent.host.name} did not serve within {timeout:.0f} s:\n{agent.log_tail()}")

    def restart(self, agent: AgentProcess, extra: Sections) -> None:
        """Stop `agent`, give it the config with `extra`, start it and wait until it serves."""
        agent.stop()
        self.write_config(agent, extra)
        agent.start()
        self.wait_ready(agent)

    def stop(self) -> dict[str, int | None]:
        """Every daemon SIGTERMed; their exit statuses by host."""
        codes = {agent.host.name: agent.stop() for agent in self.agents}
        if self.client is not None:
            self.client.close()
            self.client = None
        return codes

    def forget_bus(self) -> None:
        """Delete what the daemons declared on the broker under this prefix (their durable queues and
        the three exchanges); the private queues went with their connections."""
        bus = load_config(self.agents[0].config_path).bus
        names = Names(bus.exchange_prefix)
        with make_connection(bus) as conn:
            channel = conn.channel()
            for agent in self.agents:
                channel.queue_delete(names.host_queue(agent.host.name))
            for exchange in names.exchanges():
                channel.exchange_delete(exchange.name)

    def __enter__(self) -> AgentFleet:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
