"""Helpers for the daemon's process and destination tests: the machine's RabbitMQ with a prefix of the
test's own, libvirt's `test:///default` driver, a copy of a sysfs fixture tree the test may change,
a claim ledger in the test's directory, and a daemon run in the test's event loop or as a process.

The fixtures built on them are in tests.daemon.agent_fixtures.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from agent.bus.events import EventSubscriber
from agent.bus.keys import Keyring
from agent.bus.rpc import RpcClient
from agent.config import AgentConfig, load_config
from agent.daemon.process import Daemon, DaemonOptions
from agent.libvirt_ops.domain_model import PLACEMENT_NS
from agent.libvirt_ops.domain_rewrite import placement_json_text
from agent.numa.placement import Placement
from tests.bus.conftest import SECRET_A

REPO = Path(__file__).resolve().parents[2]
SYSFS_FIXTURE = REPO / "tests" / "fixtures" / "sysfs" / "hugepages_mixed"


@dataclass(frozen=True)
class AgentFiles:
    """One agent's files in the test's directory."""

    host: str
    prefix: str
    config_path: Path
    sysfs_root: Path
    state_dir: Path
    key_file: Path

    def config(self) -> AgentConfig:
        return load_config(self.config_path)

    def options(self, **kw: Any) -> DaemonOptions:
        kw.setdefault("environ", {})
        kw.setdefault("hotplug", False)
        kw.setdefault("install_signals", False)
        return DaemonOptions(config_path=self.config_path, sysfs_root=self.sysfs_root, **kw)

    def rewrite(self, sections: dict[str, dict[str, str]]) -> None:
        write_config(self, sections)


def write_config(files: AgentFiles, extra: dict[str, dict[str, str]] | None = None) -> None:
    sections: dict[str, dict[str, str]] = {
        "DEFAULT": {"host": files.host, "log_level": "INFO", "my_ip": "127.0.0.1"},
        "libvirt": {"connection_uri": "test:///default"},
        "claims": {"state_dir": str(files.state_dir)},
        "bus": {"exchange_prefix": files.prefix, "key_file": str(files.key_file), "call_timeout_s": "5"},
    }
    for name, options in (extra or {}).items():
        sections.setdefault(name, {}).update(options)
    text = "".join(f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in opts.items()) for name, opts in sections.items())
    files.config_path.write_text(text)


def make_agent_files(
    tmp_path: Path,
    host: str = "hv-a",
    prefix: str | None = None,
    extra: dict[str, dict[str, str]] | None = None,
    sysfs_root: Path | None = None,
) -> AgentFiles:
    """An agent's files; its sysfs is a copy of SYSFS_FIXTURE unless `sysfs_root` (e.g. /sys) is given."""
    base = tmp_path / host
    base.mkdir(parents=True)
    if sysfs_root is None:
        shutil.copytree(SYSFS_FIXTURE, base / "sysfs")
    key_file = base / "bus.keys"
    key_file.write_text(f"k1 {SECRET_A.hex()}\n")
    files = AgentFiles(
        host=host,
        prefix=prefix or f"test-{uuid.uuid4().hex[:12]}",
        config_path=base / "agent.conf",
        sysfs_root=sysfs_root or base / "sysfs",
        state_dir=base / "state",
        key_file=key_file,
    )
    write_config(files, extra)
    return files


class serving:
    """`async with serving(files) as daemon:` starts a daemon in this loop and stops it after."""

    def __init__(self, files: AgentFiles, *, roles: list[Any] | None = None, **options: Any) -> None:
        self.daemon = Daemon(files.config(), files.options(**options), roles=roles or [])
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Daemon:
        await self.daemon.start()
        self._task = asyncio.create_task(self.daemon.serve())
        return self.daemon

    async def __aexit__(self, *exc: object) -> None:
        self.daemon.request_stop("test over")
        assert self._task is not None
        await asyncio.wait_for(self._task, 15)


class EventLog:
    """Every event matching `patterns`, in arrival order, as (routing key, body)."""

    def __init__(self, files: AgentFiles, *patterns: str) -> None:
        cfg = files.config().bus
        self.events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.subscriber = EventSubscriber(cfg, Keyring.from_file(files.key_file), name="test")
        for pattern in patterns:
            self.subscriber.subscribe(pattern, lambda key, body: self.events.put((key, body)))
        self.subscriber.start()

    def next(self, timeout: float = 5.0, key_prefix: str = "") -> tuple[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no event {key_prefix}* within {timeout} s")
            key, body = self.events.get(timeout=left)
            if key.startswith(key_prefix):
                return key, body

    async def wait(self, timeout: float = 5.0, key_prefix: str = "") -> tuple[str, dict[str, Any]]:
        """`next` from a coroutine: the daemon's loop (the test's) keeps running meanwhile."""
        return await asyncio.to_thread(self.next, timeout, key_prefix)

    def close(self) -> None:
        self.subscriber.stop()


async def call(client: RpcClient, host: str, method: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """A blocking bus call from a test coroutine (the daemon serves in this loop)."""
    return await asyncio.to_thread(client.call, host, method, body, **kw)


# --- instances and their domains on test:///default --------------------------------------------------


def instance_request(vcpus: int = 2, memory_mb: int = 1024, **extra_specs: str) -> dict[str, Any]:
    specs = {"hw:cpu_policy": "dedicated", "hw:mem_page_size": "2048", **extra_specs}
    return {
        "uuid": str(uuid.uuid4()),
        "vcpus": vcpus,
        "memory_mb": memory_mb,
        "extra_specs": specs,
        "image_properties": {},
    }


def domain_xml(name: str, instance_uuid: str, placement: Placement | None, memory_mb: int = 1024) -> str:
    metadata = ""
    if placement is not None:
        text = placement_json_text(placement).replace("&", "&amp;").replace("<", "&lt;")
        metadata = f"<metadata><ca:placement xmlns:ca='{PLACEMENT_NS}'>{text}</ca:placement></metadata>"
    return (
        f"<domain type='test'><name>{name}</name><uuid>{instance_uuid}</uuid>"
        f"<memory unit='MiB'>{memory_mb}</memory><vcpu placement='static'>2</vcpu>"
        f"<os><type>hvm</type></os>{metadata}</domain>"
    )


class TestDomains:
    """Domains the test creates on the process's shared test:///default driver; removed after."""

    __test__ = False  # not a test class

    def __init__(self) -> None:
        self.conn = libvirt.open("test:///default")
        self.created: list[Any] = []

    def start(self, name: str, instance_uuid: str, placement: Placement | None, *, paused: bool = False) -> Any:
        """A running domain, or (paused) one that looks like an incoming copy carrying `placement`."""
        if not paused:
            dom = self.conn.createXML(domain_xml(name, instance_uuid, placement), 0)
            self.created.append(dom)
            return dom
        # the test driver cannot start paused: start without the placement (not the claim's copy
        # yet, whatever a watcher sees meanwhile), pause, then record the placement
        dom = self.conn.createXML(domain_xml(name, instance_uuid, None), 0)
        self.created.append(dom)
        dom.suspend()
        if placement is not None:
            text = placement_json_text(placement).replace("&", "&amp;").replace("<", "&lt;")
            dom.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                f"<placement>{text}</placement>",
                "ca",
                PLACEMENT_NS,
                libvirt.VIR_DOMAIN_AFFECT_LIVE,
            )
        return dom

    def remove_all(self) -> None:
        for dom in self.created:
            try:
                dom.destroy()
            except libvirt.libvirtError:
                pass
        self.conn.close()


# --- the daemon as a process ---------------------------------------------------------------------------


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET: every message with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, dict[str, str]]] = []

    def receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append((time.monotonic(), fields))
        return fields

    def wait_for(self, key: str, timeout: float) -> tuple[float, dict[str, str]]:
        """The first message (from now) carrying `key`."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            fields = self.receive(left)
            if fields is not None and key in fields:
                return self.messages[-1]
        raise AssertionError(f"no {key} within {timeout} s; got {[m for _, m in self.messages]}")

    def drain(self, seconds: float) -> list[tuple[float, dict[str, str]]]:
        start = len(self.messages)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.receive(left)
        return self.messages[start:]

    def close(self) -> None:
        self.sock.close()


def spawn_daemon(files: AgentFiles, notify: NotifySocket | None, **env: str) -> subprocess.Popen[bytes]:
    environ = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    if notify is not None:
        environ["NOTIFY_SOCKET"] = str(notify.path)
    environ.update(env)
    argv = [sys.executable, "-m", "agent.cli", "daemon", "--config", str(files.config_path)]
    argv += ["--sysfs-root", str(files.sysfs_root)]
    return subprocess.Popen(argv, cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def claim_json(files: AgentFiles) -> list[dict[str, Any]]:
    """Every claim in the agent's ledger, read-only (as the CLI reads it)."""
    from agent.claims.ledger import Ledger

    with Ledger.open(files.state_dir, readonly=True) as ledger:
        return [json.loads(json.dumps(c.to_json())) for c in ledger.list_claims()]
