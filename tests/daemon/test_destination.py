"""The destination role through the real bus: the daemon serves in the test's loop on the machine's
RabbitMQ (a prefix of the test's own) and libvirt's test:///default driver; the test calls it with
the bus client exactly as an orchestrator or a source agent would."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

import msgspec
import pytest

from agent.bus.errors import RemoteBusy, RemoteConflict, RemoteInvalidRequest, RemoteNoFit, RemoteNotFound
from agent.bus.schemas import ClaimView, DescribeHostResult
from agent.claims.errors import IllegalTransition
from agent.claims.model import Claim, ClaimState
from agent.daemon.destination import retry_after_s, wire_error
from agent.daemon.destination_watch import Arrival, DomainSeen, arrival_of
from agent.numa.placement import Placement
from tests.daemon.agent_support import (
    REPO,
    AgentFiles,
    EventLog,
    NotifySocket,
    call,
    claim_json,
    instance_request,
    make_agent_files,
    serving,
    spawn_daemon,
)
from tests.daemon.logging_support import journal_entries, journald_session

pytest_plugins = ["tests.daemon.agent_fixtures"]  # broker, agent_files, running_daemon, client, ...

HOST = "hv-a"


def claim_body(request: dict, migration_id: str | None = None, **kw) -> dict:
    return {
        "migration_id": migration_id or f"mig-{uuid.uuid4().hex[:8]}",
        "instance": request,
        "source_host": "hv-src",
        **kw,
    }


# --- describe_host and fit ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_describe_host_is_the_capabilities_plus_state_load_and_ledger(running_daemon, client):
    result = await call(client, HOST, "describe_host", {})
    typed = msgspec.convert(result, DescribeHostResult)  # the protocol's own schema accepts it
    assert typed.host == HOST and typed.rpc_versions.max == "1.1"
    assert [c.id for c in typed.cells] == [0, 1]
    assert typed.cells[0].free_pages["2048"] == 1000 and typed.cells[1].free_pages["2048"] == 17
    assert typed.migration_uri == "tcp://127.0.0.1" and typed.libvirt_uri == "test+tcp://127.0.0.1/default"
    assert result["host_state"]["cells"][0]["cpus"] == [0, 1, 2, 3]
    assert result["host_load"]["cpus_online"] >= 1 and result["host_load"]["memory_total_bytes"] > 0
    assert result["ledger"]["corrupt_files"] == [] and result["ledger"]["schema_version"] >= 1


@pytest.mark.asyncio
async def test_fit_is_a_dry_run_and_no_fit_names_each_cell(running_daemon, client):
    request = instance_request(vcpus=2, memory_mb=1024)
    placement = await call(client, HOST, "fit", {"instance": request})
    assert placement["fits"] is True and len(placement["cells"]) == 1
    again = await call(client, HOST, "fit", {"instance": request})
    assert again == placement  # nothing was held
    with pytest.raises(RemoteNoFit) as caught:
        await call(client, HOST, "fit", {"instance": instance_request(vcpus=4, memory_mb=64 * 1024)})
    assert set(caught.value.details["cells"]) == {"0", "1"}


@pytest.mark.asyncio
async def test_a_contradictory_request_is_invalid_and_names_the_field(running_daemon, client):
    bad = instance_request(**{"hw:cpu_policy": "dedicated", "hw:cpu_thread_policy": "bogus"})
    with pytest.raises(RemoteInvalidRequest) as caught:
        await call(client, HOST, "fit", {"instance": bad})
    assert caught.value.details["field"] == "body.instance"
    with pytest.raises(RemoteInvalidRequest) as caught:
        await call(client, HOST, "claim", {"instance": instance_request(), "source_host": "hv-src"})
    assert caught.value.details["field"] == "body.migration_id"


# --- claims --------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_claim_is_idempotent_conflicts_are_refused_and_events_go_out(running_daemon, client, event_log):
    body = claim_body(instance_request())
    first = await call(client, HOST, "claim", body)
    again = await call(client, HOST, "claim", body)
    assert again == first and first["expires_at"] > time.time()
    key, event = await event_log.wait(key_prefix="claim.")
    assert key == f"claim.{HOST}" and event["state"] == "held" and event["migration_id"] == body["migration_id"]
    _, caps = await event_log.wait(key_prefix="capabilities.")
    assert caps["seq"] >= 2  # republished after the claim
    other = dict(body, instance={**body["instance"], "memory_mb": 2048})
    with pytest.raises(RemoteConflict):
        await call(client, HOST, "claim", other)
    assert [c["state"] for c in claim_json_live(running_daemon)] == ["held"]


def claim_json_live(daemon) -> list[dict]:
    return [c.to_json() for c in daemon.ledger.live_claims()]


@pytest.mark.asyncio
async def test_claimed_pages_and_cpus_are_no_longer_offered(running_daemon, client):
    before = await call(client, HOST, "describe_host", {})
    await call(client, HOST, "claim", claim_body(instance_request(vcpus=2, memory_mb=1024)))
    after = await call(client, HOST, "describe_host", {})
    free = lambda r: sum(c["free_pcpus"] for c in r["cells"])  # noqa: E731
    used = lambda r: sum(c["used_pages"].get("2048", 0) for c in r["host_state"]["cells"])  # noqa: E731
    assert free(before) - free(after) == 2 and used(after) - used(before) == 512


@pytest.mark.asyncio
async def test_extend_confirm_release_and_not_found(running_daemon, client):
    a, b = claim_body(instance_request(vcpus=1)), claim_body(instance_request(vcpus=1))
    await call(client, HOST, "claim", a)
    await call(client, HOST, "claim", b)
    extended = await call(client, HOST, "extend_claim", {"migration_id": a["migration_id"]})
    assert msgspec.convert(extended, ClaimView).state == "migrating"
    confirmed = await call(client, HOST, "confirm_claim", {"migration_id": a["migration_id"]})
    assert confirmed["state"] == "confirmed"
    assert (await call(client, HOST, "confirm_claim", {"migration_id": a["migration_id"]}))["state"] == "confirmed"
    released = await call(client, HOST, "release_claim", {"migration_id": b["migration_id"], "reason": "aborted"})
    assert released["state"] == "released" and released["reason"] == "aborted"
    with pytest.raises(RemoteConflict):  # an ended claim cannot be extended
        await call(client, HOST, "extend_claim", {"migration_id": b["migration_id"]})
    with pytest.raises(RemoteNotFound):
        await call(client, HOST, "release_claim", {"migration_id": "no-such-migration"})


@pytest.mark.asyncio
async def test_extend_claim_with_ttl_s_keeps_the_claim_that_long_within_the_longest_ttl(running_daemon, client):
    a = claim_body(instance_request(vcpus=1))
    await call(client, HOST, "claim", a)
    mid = a["migration_id"]
    timeout_s, longest_s = running_daemon.ledger.migrating_timeout_s, running_daemon.ledger.max_ttl_s
    asked = before = time.time()
    extended = await call(client, HOST, "extend_claim", {"migration_id": mid, "ttl_s": longest_s})
    assert extended["state"] == "migrating" and extended["expires_at"] >= asked + max(longest_s, timeout_s) - 1
    plain = await call(client, HOST, "extend_claim", {"migration_id": mid})  # progress: migrating_timeout_s
    assert plain["expires_at"] <= time.time() + timeout_s and plain["expires_at"] >= before + timeout_s - 1
    with pytest.raises(RemoteInvalidRequest):  # beyond [claims] claim_ttl_max_s
        await call(client, HOST, "extend_claim", {"migration_id": mid, "ttl_s": longest_s + 1})


@pytest.mark.asyncio
async def test_the_inbound_limit_answers_busy_but_never_refuses_a_repeat(broker, tmp_path, client_factory):
    files = make_agent_files(tmp_path, extra={"DEFAULT": {"max_concurrent_incoming_migrations": "1"}})
    async with serving(files):
        with client_factory(files) as c:
            first = claim_body(instance_request(), ttl_s=30)
            await call(c, HOST, "claim", first)
            with pytest.raises(RemoteBusy) as caught:
                await call(c, HOST, "claim", claim_body(instance_request()))
            assert 1 <= caught.value.retry_after <= 30
            assert (await call(c, HOST, "claim", first))["placement"]
            await call(c, HOST, "release_claim", {"migration_id": first["migration_id"]})
            await call(c, HOST, "claim", claim_body(instance_request()))  # room again


@pytest.fixture
def client_factory():
    from agent.bus.keys import Keyring
    from agent.bus.rpc import RpcClient

    def make(files: AgentFiles) -> RpcClient:
        return RpcClient(files.config().bus, Keyring.from_file(files.key_file), sender="orchestrator@test")

    return make


# --- the watcher: expiry, incoming domains, self-confirmation -------------------------------------------


@pytest.mark.asyncio
async def test_a_claim_whose_migration_never_starts_expires(running_daemon, client, event_log):
    body = claim_body(instance_request(), ttl_s=1)
    await call(client, HOST, "claim", body)
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        key, event = await event_log.wait(timeout=6, key_prefix="claim.")
        if event["state"] == "expired":
            break
    assert event["state"] == "expired" and event["migration_id"] == body["migration_id"]
    assert running_daemon.ledger.live_claims() == []


@pytest.mark.asyncio
async def test_the_destination_confirms_on_its_own_when_the_domain_arrives(
    running_daemon, client, event_log, test_domains
):
    request = instance_request()
    body = claim_body(request)
    result = await call(client, HOST, "claim", body)
    placement = Placement.from_json(result["placement"])
    test_domains.start("incoming", request["uuid"], placement, paused=True)  # the incoming copy
    assert await wait_for_state(running_daemon, body["migration_id"], ClaimState.MIGRATING)
    test_domains.created[-1].resume()  # the migration completed: the guest runs here
    assert await wait_for_state(running_daemon, body["migration_id"], ClaimState.CONFIRMED)
    states = [e["state"] for _, e in await asyncio.to_thread(drain_claim_events, event_log)]
    assert states[-2:] == ["migrating", "confirmed"]


@pytest.mark.asyncio
async def test_a_domain_without_the_claims_placement_is_not_confirmed(running_daemon, client, test_domains):
    request = instance_request()
    body = claim_body(request)
    await call(client, HOST, "claim", body)
    test_domains.start("other", request["uuid"], None)
    await asyncio.sleep(2.5)
    assert running_daemon.ledger.get(body["migration_id"]).state is ClaimState.HELD


async def wait_for_state(daemon, migration_id: str, state: ClaimState, timeout: float = 8.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await asyncio.to_thread(daemon.ledger.get, migration_id)).state is state:
            return True
        await asyncio.sleep(0.1)
    return False


def drain_claim_events(log: EventLog) -> list[tuple[str, dict]]:
    out = []
    while True:
        try:
            out.append(log.next(timeout=0.5, key_prefix="claim."))
        except (AssertionError, Exception):
            return out


# --- SIGKILL while holding a claim -----------------------------------------------------------------------


def start_process(files: AgentFiles, tmp_path) -> tuple:
    notify = NotifySocket(tmp_path / f"notify-{uuid.uuid4().hex[:6]}")
    proc = spawn_daemon(files, notify)
    notify.wait_for("READY", 30)
    return proc, notify


@pytest.mark.asyncio
async def test_sigkill_while_holding_a_claim_keeps_it_once(broker, tmp_path, client_factory):
    files = make_agent_files(tmp_path)
    proc, notify = start_process(files, tmp_path)
    with client_factory(files) as c:
        body = claim_body(instance_request(), ttl_s=600)
        held = await call(c, HOST, "claim", body)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        notify.close()
        (kept,) = claim_json(files)
        assert kept["state"] == "held" and kept["expires_at"] == held["expires_at"]
        proc, notify = start_process(files, tmp_path)
        try:
            again = await call(c, HOST, "claim", body)  # the source retries: the same claim, not a second
            assert again == held
            (still,) = claim_json(files)
            assert still["state"] == "held"
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
            notify.close()


@pytest.mark.asyncio
async def test_sigkill_then_restart_after_the_ttl_expires_the_claim_on_time(broker, tmp_path, client_factory):
    files = make_agent_files(tmp_path)
    proc, notify = start_process(files, tmp_path)
    with client_factory(files) as c:
        body = claim_body(instance_request(), ttl_s=2)
        held = await call(c, HOST, "claim", body)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        notify.close()
        await asyncio.sleep(max(0.0, held["expires_at"] - time.time()) + 0.5)
        proc, notify = start_process(files, tmp_path)
        try:
            (ended,) = claim_json(files)
            assert ended["state"] == "expired"  # expired at start, before READY
            with pytest.raises(RemoteConflict):  # an ended claim is never handed out again
                await call(c, HOST, "claim", body)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
            notify.close()


# --- pure parts --------------------------------------------------------------------------------------------


def _claim(state: ClaimState = ClaimState.HELD, expires_at: float = 100.0) -> Claim:
    placement = Placement.from_json(
        {
            "fits": True,
            "cells": [
                {
                    "guest_cell": 0,
                    "host_cell": 0,
                    "vcpus": [0],
                    "cpu_pins": {"0": [1]},
                    "memory_mb": 512,
                    "pagesize_kb": 4,
                    "dedicated_vcpus": [0],
                }
            ],
        }
    )
    return Claim("m-1", "u-1", "hv-src", "{}", placement, state, 0.0, expires_at, 0.0)


def test_arrival_rules():
    import libvirt

    claim = _claim()
    running = libvirt.VIR_DOMAIN_RUNNING
    assert arrival_of(None, claim) is Arrival.ABSENT
    assert arrival_of(DomainSeen(False, 5, 0, None), claim) is Arrival.ABSENT
    assert arrival_of(DomainSeen(True, libvirt.VIR_DOMAIN_PAUSED, 2, None), claim) is Arrival.INCOMING
    postcopy = DomainSeen(True, running, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY, claim.placement)
    assert arrival_of(postcopy, claim) is Arrival.INCOMING
    assert arrival_of(DomainSeen(True, running, 1, claim.placement), claim) is Arrival.ARRIVED
    assert arrival_of(DomainSeen(True, running, 1, None), claim) is Arrival.FOREIGN


def test_retry_after_is_bounded():
    assert retry_after_s([], 50.0) == 1.0
    assert retry_after_s([_claim(expires_at=70.0)], 50.0) == 20.0
    assert retry_after_s([_claim(expires_at=5000.0)], 50.0) == 60.0


def test_ledger_errors_map_to_wire_errors():
    assert isinstance(wire_error(IllegalTransition("m", "expired", "migrating")), RemoteConflict)
    assert wire_error(RuntimeError("bug")) is None


@pytest.mark.asyncio
async def test_claim_records_carry_the_migration_fields_for_the_journal(running_daemon, client):
    import io

    from agent.log import setup_logging

    out = io.StringIO()
    setup_logging("INFO", stream=out, journal=False)
    body = claim_body(instance_request(), migration_id="mig-journal")
    await call(client, HOST, "claim", body)
    held = next(line for line in out.getvalue().splitlines() if "held until" in line)
    assert "migration_id=mig-journal" in held and "claim_id=mig-journal" in held
    assert "source_host=hv-src" in held and f"dest_host={HOST}" in held


journald = pytest.fixture(scope="session")(journald_session)


def test_journalctl_migration_id_shows_the_destinations_part_of_the_story(agent_files, journald, client):
    """A daemon under systemd (its stderr is the journal stream JOURNAL_STREAM names) writes its
    records to a real journald natively, each claim record with the migration's fields."""
    read_end, write_end = os.pipe()
    stream = os.fstat(write_end)
    env = {**os.environ, "JOURNAL_STREAM": f"{stream.st_dev}:{stream.st_ino}"}
    argv = [sys.executable, "-m", "agent.cli", "daemon", "--config", str(agent_files.config_path)]
    argv += ["--sysfs-root", str(agent_files.sysfs_root)]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=write_end)
    os.close(write_end)
    mid = f"mig-journal-{uuid.uuid4().hex[:8]}"
    try:
        deadline = time.monotonic() + 30
        while True:  # READY is not asked for here: the first answer says it serves
            try:
                client.call(HOST, "describe_host", {}, timeout=1.0)
                break
            except Exception:
                assert time.monotonic() < deadline, "the daemon did not come up"
        client.call(HOST, "claim", claim_body(instance_request(), migration_id=mid))
        client.call(HOST, "release_claim", {"migration_id": mid, "reason": "journal test"})
        entries = journal_entries(f"MIGRATION_ID={mid}", expect=2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        os.close(read_end)
    assert proc.returncode == 0
    messages = [e["MESSAGE"] for e in entries]
    assert any("held until" in m for m in messages) and any("released" in m for m in messages), messages
    for e in entries:
        assert e["CLAIM_ID"] == mid and e["SOURCE_HOST"] == "hv-src" and e["DEST_HOST"] == HOST
        assert e["INSTANCE_UUID"]
        assert e["SYSLOG_IDENTIFIER"] == "compute-agent"
