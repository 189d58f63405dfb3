"""The daemon process: systemd's notify protocol on a real datagram socket the test owns, a bad config,
SIGHUP, SIGTERM, a real kernel uevent, the metrics endpoint, two agents in one process.

The daemon runs either as `compute-agent daemon` (a child process: signals, exit codes, NOTIFY_SOCKET)
or in the test's own event loop (pytest-asyncio), always on the machine's RabbitMQ with a prefix of
the test's own and libvirt's test:///default driver.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from agent.config import AgentConfig, LibvirtConfig, load_config
from agent.daemon.process import Daemon
from agent.daemon.reload import apply_reload
from tests.daemon.agent_support import (
    AgentFiles,
    EventLog,
    NotifySocket,
    call,
    instance_request,
    make_agent_files,
    serving,
    spawn_daemon,
)

pytest_plugins = ["tests.daemon.agent_fixtures"]

WATCHDOG_USEC = 1_000_000  # WATCHDOG=1 expected every 0.5 s
CPU0_UEVENT = Path("/sys/devices/system/cpu/cpu0/uevent")


@pytest.fixture
def notify(tmp_path):
    sock = NotifySocket(tmp_path / "notify")
    yield sock
    sock.close()


def stop(proc, timeout: float = 10.0) -> tuple[int, float, str]:
    """SIGTERM; (exit code, seconds it took, stderr)."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, time.monotonic() - started, err.decode()


# --- systemd notify, as a process --------------------------------------------------------------------


def test_ready_status_watchdog_at_half_the_timeout_and_stopping_on_sigterm(agent_files, notify):
    proc = spawn_daemon(agent_files, notify, WATCHDOG_USEC=str(WATCHDOG_USEC))
    try:
        _, ready = notify.wait_for("READY", 30)
        assert ready["READY"] == "1" and ready["STATUS"].startswith("serving")
        seen = notify.drain(2.6)
    finally:
        code, took, err = stop(proc)
    beats = [at for at, fields in seen if fields.get("WATCHDOG") == "1"]
    gaps = [b - a for a, b in zip(beats, beats[1:], strict=False)]
    assert 4 <= len(beats) <= 7, beats
    assert all(0.3 <= g <= 0.8 for g in gaps), gaps  # half of WATCHDOG_USEC, not the whole
    assert any(f.get("STOPPING") == "1" for _, f in notify.drain(0.2) + notify.messages), notify.messages
    assert code == 0 and took < 10.0, err
    assert "ready in" in err


def test_sigterm_while_serving_exits_0_quickly_and_stops_taking_calls(agent_files, notify, client):
    proc = spawn_daemon(agent_files, notify)
    notify.wait_for("READY", 30)
    assert client.call(agent_files.host, "describe_host", {})["host"] == agent_files.host
    code, took, err = stop(proc)
    assert code == 0 and took < 10.0, err
    from agent.bus.errors import CallTimeout

    with pytest.raises(CallTimeout):  # nobody serves the queue any more
        client.call(agent_files.host, "describe_host", {}, timeout=1.0)


@pytest.mark.parametrize(
    "section, option, value",
    [
        ("DEFAULT", "max_concurrent_incoming_migrations", "0"),
        ("DEFAULT", "my_ip", "not-an-address"),
        ("libvirt", "live_migration_downtime_ms", "fast"),
        ("compute", "no_such_option", "1"),
    ],
)
def test_a_bad_config_exits_2_naming_the_option_and_starts_nothing(agent_files, notify, section, option, value):
    agent_files.rewrite({section: {option: value}})
    proc = spawn_daemon(agent_files, notify)
    out, err = proc.communicate(timeout=30)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2
    assert len(lines) == 1 and f"[{section}] {option}" in lines[0], lines
    assert not agent_files.state_dir.exists()  # no ledger opened
    assert notify.drain(0.2) == []  # systemd was told nothing


def test_an_unreadable_key_file_is_a_config_error(agent_files, notify):
    agent_files.key_file.unlink()
    proc = spawn_daemon(agent_files, notify)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "[bus] key_file" in err.decode()


def test_sighup_takes_the_run_time_options_and_says_which_changed(agent_files, notify):
    proc = spawn_daemon(agent_files, notify)
    try:
        notify.wait_for("READY", 30)
        agent_files.rewrite(
            {
                "DEFAULT": {"log_level": "DEBUG", "max_concurrent_incoming_migrations": "5"},
                "libvirt": {"live_migration_downtime_ms": "800"},
                "claims": {"retention_s": "60"},
            }
        )
        proc.send_signal(signal.SIGHUP)
        _, reloading = notify.wait_for("RELOADING", 10)
        assert "MONOTONIC_USEC" in reloading
        notify.wait_for("READY", 10)
    finally:
        code, _, err = stop(proc)
    assert code == 0
    reloaded = next(line for line in err.splitlines() if "reloaded:" in line)
    for name in ("[DEFAULT] log_level", "[DEFAULT] max_concurrent_incoming_migrations"):
        assert name in reloaded
    assert "[libvirt] live_migration_downtime_ms" in reloaded
    assert "[claims] retention_s" in next(line for line in err.splitlines() if "only taken at restart" in line)


def test_reload_rules():
    old = AgentConfig()
    new = AgentConfig(
        log_level="DEBUG",
        max_concurrent_live_migrations=3,
        libvirt=LibvirtConfig(connection_uri="qemu+tcp://x/system", live_migration_downtime_ms=900),
        host="renamed",
    )
    r = apply_reload(old, new)
    assert r.changed == (
        "[DEFAULT] log_level",
        "[DEFAULT] max_concurrent_live_migrations",
        "[libvirt] live_migration_downtime_ms",
    )
    assert r.needs_restart == ("[DEFAULT] host", "[libvirt] connection_uri")
    assert r.config.libvirt.live_migration_downtime_ms == 900 and r.config.libvirt.connection_uri == "qemu:///system"
    assert r.config.host is None and r.config.max_concurrent_live_migrations == 3
    assert apply_reload(old, old).changed == ()


def test_reload_names_an_option_of_every_section_by_its_section():
    old = load_config(text="[DEFAULT]\nlog_level = INFO\n")
    new = load_config(text="[upgrade_levels]\nagent = 1.0\n[workarounds]\nenable_numa_live_migration = true\n")
    r = apply_reload(old, new)
    assert r.needs_restart == ("[upgrade_levels] agent", "[workarounds] enable_numa_live_migration")


# --- in the test's loop ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_status_says_how_many_claims_are_held(agent_files, notify, client):
    async with serving(agent_files, environ={"NOTIFY_SOCKET": str(notify.path)}) as daemon:
        await asyncio.to_thread(notify.wait_for, "READY", 5)
        body = {"migration_id": "mig-status", "instance": instance_request(), "source_host": "hv-src"}
        await call(client, daemon.host, "claim", body)
        _, status = await asyncio.to_thread(notify.wait_for, "STATUS", 5)
        assert status["STATUS"] == "serving; 1 claim held"


@pytest.mark.asyncio
async def test_a_real_cpu_uevent_makes_the_daemon_rediscover_and_republish_within_2s(agent_files):
    if not _can_write(CPU0_UEVENT):
        pytest.skip(f"cannot write {CPU0_UEVENT} here")
    events = EventLog(agent_files, f"capabilities.{agent_files.host}")
    lines = _capture("compute_agent.daemon")
    try:
        async with serving(agent_files, hotplug=True, hotplug_source="kernel", hotplug_debounce_s=0.05):
            _, first = await events.wait(key_prefix="capabilities.")
            while not any("the watch started" in r.getMessage() for r in lines.records):
                await asyncio.sleep(0.01)  # the watch starts (and reads the topology once) right after READY=1
            assert first["cells"][1]["free_pages"]["2048"] == 17
            _grow_hugepages(agent_files, node=1, total=2048, free=1017)  # the test's sysfs tree changes
            started = time.monotonic()
            CPU0_UEVENT.write_text("change")  # a real kernel uevent
            _, after = await events.wait(timeout=2.0, key_prefix="capabilities.")
            took = time.monotonic() - started
    finally:
        events.close()
        logging.getLogger("compute_agent.daemon").removeHandler(lines)
    assert after["seq"] == first["seq"] + 1 and after["cells"][1]["free_pages"]["2048"] == 1017
    assert took < 2.0
    changed = [r.getMessage() for r in lines.records if "uevents" in r.getMessage()]
    assert any("cell 1: hugepage totals" in m and "cpu0 change" in m for m in changed), changed
    print(f"uevent -> capabilities republished: {took * 1000:.0f} ms")


def _can_write(path: Path) -> bool:
    try:
        with open(path, "w"):
            return True
    except OSError:
        return False


def _grow_hugepages(files: AgentFiles, node: int, total: int, free: int) -> None:
    pool = files.sysfs_root / f"devices/system/node/node{node}/hugepages/hugepages-2048kB"
    (pool / "nr_hugepages").write_text(f"{total}\n")
    (pool / "free_hugepages").write_text(f"{free}\n")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _capture(name: str) -> _Lines:
    handler = _Lines()
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


@pytest.mark.asyncio
async def test_the_metrics_endpoint_is_scraped(agent_files, client):
    port = _free_port()
    agent_files.rewrite({"DEFAULT": {"metrics_listen": f"127.0.0.1:{port}"}})
    async with serving(agent_files) as daemon:
        body = {"migration_id": "mig-metrics", "instance": instance_request(), "source_host": "hv-src"}
        await call(client, daemon.host, "claim", body)
        text = await asyncio.to_thread(_scrape, port)
    assert 'compute_agent_claims{state="held"} 1.0' in text
    assert "compute_agent_bus_reconnects_total" in text and "compute_agent_ledger_damage_found_total" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


@pytest.mark.asyncio
async def test_two_agents_in_one_process_share_nothing(broker, tmp_path):
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    a = make_agent_files(tmp_path, host="hv-a", prefix=prefix)
    b = make_agent_files(tmp_path, host="hv-b", prefix=prefix)
    from agent.bus.keys import Keyring
    from agent.bus.rpc import RpcClient

    async with serving(a) as da, serving(b) as db:
        assert isinstance(da, Daemon) and da.ledger is not db.ledger and da.metrics is not db.metrics
        with RpcClient(a.config().bus, Keyring.from_file(a.key_file), sender="orchestrator@test") as c:
            answers = await asyncio.to_thread(c.broadcast_call, "describe_host", {}, timeout=2.0)
            body = {"migration_id": "mig-one", "instance": instance_request(), "source_host": "hv-src"}
            await call(c, "hv-a", "claim", body)
        assert sorted(answers) == ["hv-a", "hv-b"]
        assert len(da.ledger.live_claims()) == 1 and db.ledger.live_claims() == []


@pytest.mark.asyncio
async def test_the_agent_pin_caps_what_it_serves_and_advertises(agent_files, client):
    from agent.bus.errors import RemoteUnsupportedVersion

    agent_files.rewrite({"upgrade_levels": {"agent": "1.0"}})
    async with serving(agent_files) as daemon:
        described = await call(client, daemon.host, "describe_host", {})
        assert described["rpc_versions"] == {"min": "1.0", "max": "1.0"}
        with pytest.raises(RemoteUnsupportedVersion) as refused:
            await call(client, daemon.host, "fit", {"instance": instance_request()})
    assert refused.value.details["max"] == "1.0"


@pytest.mark.asyncio
async def test_describe_host_lists_the_running_instances_for_a_drain(running_daemon, client, test_domains):
    import msgspec

    from agent.orchestrator.model import DescribedHost

    vm_uuid = str(uuid.uuid4())
    test_domains.start("drain-me", vm_uuid, None)
    described = await call(client, running_daemon.host, "describe_host", {})
    rows = {row["name"]: row for row in described["instances"]}
    assert rows["drain-me"] == {
        "uuid": vm_uuid,
        "name": "drain-me",
        "vcpus": 2,
        "memory_mb": 1024,
        "pinned": False,
        "numa": False,
    }
    assert vm_uuid in msgspec.convert(described, DescribedHost).instance_ids()  # what `drain HOST` moves


def test_a_pin_the_agent_cannot_serve_exits_2_naming_the_option(agent_files, notify):
    agent_files.rewrite({"upgrade_levels": {"agent": "0.9"}})
    proc = spawn_daemon(agent_files, notify)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "[upgrade_levels] agent" in err.decode()
    assert not agent_files.state_dir.exists()


def test_sighup_with_a_broken_config_keeps_the_running_one(agent_files, notify, client):
    proc = spawn_daemon(agent_files, notify)
    try:
        notify.wait_for("READY", 30)
        agent_files.rewrite({"DEFAULT": {"log_level": "LOUD"}})
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING", 10)
        notify.wait_for("READY", 10)
        assert client.call(agent_files.host, "describe_host", {})["host"] == agent_files.host
    finally:
        code, _, err = stop(proc)
    assert code == 0 and "reload refused" in err and "[DEFAULT] log_level" in err


@pytest.mark.asyncio
async def test_capabilities_are_published_every_interval(agent_files):
    agent_files.rewrite({"bus": {"capabilities_interval_s": "1"}})
    events = EventLog(agent_files, f"capabilities.{agent_files.host}")
    try:
        async with serving(agent_files):
            seqs = [(await events.wait(timeout=3))[1]["seq"] for _ in range(3)]
    finally:
        events.close()
    assert seqs == [1, 2, 3]  # at start, then every second; no gap


@pytest.mark.asyncio
async def test_a_domain_starting_or_stopping_republishes_capabilities(agent_files, test_domains):
    events = EventLog(agent_files, f"capabilities.{agent_files.host}")
    try:
        async with serving(agent_files):
            _, first = await events.wait()
            dom = test_domains.start(f"lc-{uuid.uuid4().hex[:6]}", str(uuid.uuid4()), None)
            _, started = await events.wait(timeout=3)  # the lifecycle event, not the 60 s timer
            dom.destroy()
            _, stopped = await events.wait(timeout=3)
    finally:
        events.close()
    assert (first["seq"], started["seq"], stopped["seq"]) == (1, 2, 3)


def test_an_unreachable_libvirtd_is_exit_1_with_one_clear_line(agent_files, notify):
    agent_files.rewrite({"libvirt": {"connection_uri": "test+tcp://127.0.0.1:1/default"}})
    proc = spawn_daemon(agent_files, notify)
    _, err = proc.communicate(timeout=30)
    last = err.decode().strip().splitlines()[-1]
    assert proc.returncode == 1
    assert last.startswith("compute-agent: could not start:") and "127.0.0.1:1" in last
    assert not any("READY" in fields for _, fields in notify.drain(0.2))


@pytest.mark.asyncio
async def test_bus_drops_are_counted_in_the_metrics(running_daemon, agent_files, tmp_path):
    from agent.bus.errors import CallTimeout
    from agent.bus.keys import Keyring
    from agent.bus.rpc import RpcClient

    stranger_keys = tmp_path / "stranger.keys"
    stranger_keys.write_text(f"kx {bytes(range(40, 72)).hex()}\n")
    with RpcClient(agent_files.config().bus, Keyring.from_file(stranger_keys), sender="stranger") as stranger:
        with pytest.raises(CallTimeout):  # dropped unanswered: its key is unknown here
            await call(stranger, running_daemon.host, "describe_host", {}, timeout=1.0)
    running_daemon.sync_bus_metrics()  # what the housekeeping timer does every few seconds
    running_daemon.sync_bus_metrics()  # counted once, however often it looks
    text = running_daemon.metrics.render().decode()
    assert 'compute_agent_bus_messages_dropped_total{reason="unknown_kid"} 1.0' in text
