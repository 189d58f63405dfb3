"""The commands against simulated agents on the machine's RabbitMQ: exit codes, JSON lines, the
live view's end, drain's table, and a `migrate` killed mid-flight leaving the migration running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.orchestrator.cli import main
from agent.testing.builders import topology
from tests.orchestrator.conftest import instance

pytestmark = pytest.mark.timeout(120)

BIG = dict(cells=2, cores_per_cell=4, threads=2)
SMALL = dict(cells=2, cores_per_cell=1, threads=2)


@pytest.fixture
def conf(bus_cfg, tmp_path: Path) -> Path:
    path = tmp_path / "orchestrator.conf"
    path.write_text(
        f"[bus]\nexchange_prefix = {bus_cfg.exchange_prefix}\nkey_file = {bus_cfg.key_file}\ncall_timeout_s = 5\n"
        "[orchestrator]\ndiscovery_timeout_s = 0.5\n"
    )
    return path


def fleet(world, b=SMALL) -> None:
    world.add("hv-a", topology(**BIG, hostname="hv-a"))
    world.add("hv-b", topology(**b, hostname="hv-b"))
    world.add("hv-c", topology(**BIG, hostname="hv-c"))
    world.start()


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_migrate_json_alternate(world, conf, capsys) -> None:
    fleet(world)
    vm = world.agents["hv-a"].boot(instance("vm1"))
    code = main(["--config", str(conf), "migrate", "vm1", "--from", "hv-a", "--to", "hv-b", "--to", "hv-c", "--json"])
    lines = json_lines(capsys.readouterr().out)
    assert code == 0
    assert [x["event"] for x in lines][:2] == ["planned", "started"]
    assert lines[1]["rejections"][0]["host"] == "hv-b" and lines[1]["rejections"][0]["kind"] == "NoFit"
    result = lines[-1]
    assert (result["event"], result["status"], result["host_now"]) == ("result", "completed", "hv-c")
    assert result["pinning_after"] != result["pinning_before"] or result["pinning_after"]["cells"]
    assert world.where(vm.uuid) == ["hv-c"]
    percents = [x["percent"] for x in lines if x["event"] == "progress"]
    assert percents == sorted(percents)


def test_migrate_live_view_prints_the_end(world, conf, capsys) -> None:
    fleet(world)
    world.agents["hv-a"].boot(instance("vm1"))
    assert main(["--config", str(conf), "migrate", "vm1", "--from", "hv-a"]) == 0
    out = capsys.readouterr().out
    for text in ("completed", "runs on", "pinning before", "pinning after", "downtime", "total time", "policy:"):
        assert text in out


def test_exit_codes(world, conf, capsys) -> None:
    fleet(world)
    world.agents["hv-a"].boot(instance("vm1"))
    base = ["--config", str(conf), "migrate"]
    assert main([*base, "nope", "--from", "hv-a"]) == 2  # unknown instance
    assert main([*base, "vm1", "--from", "hv-zz"]) == 2  # unknown host
    assert main([*base, "vm1", "--from", "hv-a", "--to", "hv-b"]) == 3  # B has no room
    out = capsys.readouterr().out
    assert "hv-b" in out and "NoFit" in out
    assert main([*base, "vm1", "--from", "hv-a", "--to", "hv-b", "--json"]) == 3
    result = json_lines(capsys.readouterr().out)[-1]
    assert result["status"] == "no_destination"
    assert [(r["host"], r["kind"]) for r in result["rejections"]] == [("hv-b", "NoFit")]
    world.agents["hv-a"].fail_migrations = True
    assert main([*base, "vm1", "--from", "hv-a", "--to", "hv-c", "--json"]) == 4
    assert json_lines(capsys.readouterr().out)[-1]["status"] == "failed"
    assert world.agents["hv-a"].instances  # still on the source
    assert all(c.state.value == "released" for c in world.agents["hv-c"].ledger.list_claims())


def test_dry_run_holds_nothing(world, conf, capsys) -> None:
    fleet(world)
    world.agents["hv-a"].boot(instance("vm1"))
    assert main(["--config", str(conf), "migrate", "vm1", "--from", "hv-a", "--to", "hv-b", "--dry-run"]) == 3
    assert main(["--config", str(conf), "migrate", "vm1", "--from", "hv-a", "--dry-run", "--json"]) == 0
    [result] = json_lines(capsys.readouterr().out)[-1:]
    assert [r["host"] for r in result["dry_run"] if r["fits"]] == ["hv-c"]
    assert all(a.ledger.list_claims() == [] for a in world.agents.values())


def test_hosts(world, conf, capsys) -> None:
    fleet(world)
    assert main(["--config", str(conf), "hosts", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [h["host"] for h in doc["hosts"]] == ["hv-a", "hv-b", "hv-c"] and doc["cap"] == "1.1"
    assert all(h["age_s"] >= 0 and h["cells"] for h in doc["hosts"])
    assert main(["--config", str(conf), "hosts"]) == 0
    assert "hv-b" in capsys.readouterr().out


def test_drain_table(world, conf, capsys) -> None:
    fleet(world, b=BIG)
    for i in range(3):
        world.agents["hv-a"].boot(instance(f"vm{i}", vcpus=4, memory_mb=1024))
    assert main(["--config", str(conf), "drain", "hv-a", "--parallel", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 of 3 migrated" in out
    assert world.agents["hv-a"].instances == {}


def test_migration_list_show_abort(world, conf, capsys) -> None:
    fleet(world, b=BIG)
    world.migration_s = 4.0
    world.agents["hv-a"].boot(instance("vm1"))
    assert main(["--config", str(conf), "migrate", "vm1", "--from", "hv-a", "--no-wait", "--json"]) == 0
    mid = json_lines(capsys.readouterr().out)[1]["migration_id"]
    assert main(["--config", str(conf), "migration", "abort", mid, "--json"]) == 0
    capsys.readouterr()
    assert main(["--config", str(conf), "migration", "show", mid, "--json"]) == 4  # re-attached; aborted
    assert json_lines(capsys.readouterr().out)[-1]["status"] == "aborted"
    assert main(["--config", str(conf), "migration", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["migrations"]
    assert [(r["migration_id"], r["status"]) for r in rows] == [(mid, "aborted")]
    assert main(["--config", str(conf), "migration", "show", "no-such", "--json"]) == 2


def test_killing_migrate_leaves_the_migration_running(world, conf, capsys) -> None:
    fleet(world, b=BIG)
    world.migration_s = 3.0
    vm = world.agents["hv-a"].boot(instance("vm1"))
    cmd = [sys.executable, "-m", "agent.orchestrator.cli", "--config", str(conf), "migrate", "vm1", "--from", "hv-a"]
    proc = subprocess.Popen([*cmd, "--json"], stdout=subprocess.PIPE, text=True, env={**os.environ})
    assert proc.stdout is not None
    started = None
    for line in proc.stdout:
        if '"started"' in line:
            started = json.loads(line)
            break
    assert started is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    mid, dest = started["migration_id"], started["destination"]
    assert world.agents["hv-a"].migrations[mid].status == "running"  # the agents carry on
    assert main(["--config", str(conf), "migration", "show", mid, "--json"]) == 0  # re-attached until the end
    assert json_lines(capsys.readouterr().out)[-1]["host_now"] == dest
    assert world.where(vm.uuid) == [dest]
    assert [c.state.value for c in world.agents[dest].ledger.list_claims()] == ["confirmed"]
    assert all(a.ledger.live_claims() == [] for a in world.agents.values())
    time.sleep(0)
