"""`compute-agent claims list|show|release` (agent/claims/cli.py)."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from agent.claims.cli import add_claims_parser, run_claims
from agent.claims.ledger import Ledger
from tests.claims.helpers import request, state_fn, topology

FN = state_fn(topology())


def run(
    argv,
) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="compute-agent")
    sub = parser.add_subparsers(dest="command")
    add_claims_parser(sub)
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    code = args.func(args, out, err)
    assert args.func is run_claims
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def state_dir(tmp_path):
    with Ledger.open(tmp_path) as led:
        led.claim("mig-1", request(2, 512), "src-a", 300, FN)
        led.claim("mig-2", request(2, 512), "src-b", 300, FN)
        led.start("mig-2")
    return tmp_path


def test_list_table_and_json(state_dir):
    code, out, _ = run(["claims", "--state-dir", str(state_dir), "list"])
    assert code == 0 and "mig-1" in out and "mig-2" in out and "migrating" in out
    code, out, _ = run(["claims", "list", "--state-dir", str(state_dir), "--json"])
    docs = json.loads(out)
    assert code == 0 and [d["migration_id"] for d in docs] == ["mig-1", "mig-2"]
    assert docs[0]["placement"]["fits"] is True and docs[0]["state"] == "held"
    code, out, _ = run(["claims", "--json", "--state-dir", str(state_dir), "list", "--state", "migrating"])
    assert [d["migration_id"] for d in json.loads(out)] == ["mig-2"]


def test_show(state_dir):
    code, out, _ = run(["claims", "--state-dir", str(state_dir), "show", "mig-2"])
    assert code == 0 and "transitions" in out and "src-b" in out
    code, out, _ = run(["claims", "--state-dir", str(state_dir), "--json", "show", "mig-2"])
    doc = json.loads(out)
    assert [t["to"] for t in doc["transitions"]] == ["held", "migrating"]


def test_release_and_exit_codes(state_dir):
    code, out, _ = run(["claims", "--state-dir", str(state_dir), "release", "mig-1", "--reason", "stuck"])
    assert code == 0 and "released" in out
    with Ledger.open(state_dir) as led:
        c = led.get("mig-1")
        assert c.state.value == "released" and c.reason == "operator: stuck"
    code, _, err = run(["claims", "--state-dir", str(state_dir), "show", "nope"])
    assert code == 4 and "nope" in err
    code, _, err = run(["claims", "--state-dir", str(state_dir), "release", "bad id!"])
    assert code == 2
    with Ledger.open(state_dir) as led:
        led.confirm("mig-2")
    code, _, err = run(["claims", "--state-dir", str(state_dir), "release", "mig-2"])
    assert code == 2 and "confirmed" in err  # illegal transition


def test_missing_ledger_is_not_created(tmp_path):
    empty = tmp_path / "none"
    code, out, _ = run(["claims", "--state-dir", str(empty), "--json", "list"])
    assert code == 0 and json.loads(out) == []
    code, _, _ = run(["claims", "--state-dir", str(empty), "show", "x"])
    assert code == 4
    assert not empty.exists()


def test_corrupt_ledger_is_reported_and_left_in_place(tmp_path):
    """Read-only commands never move a ledger aside: that is the agent's decision, not a CLI's."""
    (tmp_path / "ledger.db").write_bytes(b"garbage" * 500)
    for cmd in (["list"], ["show", "m1"]):
        code, _, err = run(["claims", "--state-dir", str(tmp_path), *cmd])
        assert code == 1 and "corrupt" in err
        assert not list(tmp_path.glob("ledger.db.corrupt-*"))
        assert (tmp_path / "ledger.db").read_bytes() == b"garbage" * 500


def test_list_and_show_open_the_ledger_read_only(state_dir, monkeypatch):
    import sqlite3

    seen = []
    real_open = Ledger.open.__func__

    def spy(cls, *a, **kw):
        seen.append(kw.get("readonly", False))
        return real_open(cls, *a, **kw)

    monkeypatch.setattr(Ledger, "open", classmethod(spy))
    assert run(["claims", "--state-dir", str(state_dir), "list"])[0] == 0
    assert run(["claims", "--state-dir", str(state_dir), "show", "mig-1"])[0] == 0
    assert seen == [True, True]
    # an old-schema ledger is not upgraded by a look at it
    conn = sqlite3.connect(state_dir / "ledger.db")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    code, _, err = run(["claims", "--state-dir", str(state_dir), "list"])
    assert code == 1 and "older" in err
    conn = sqlite3.connect(state_dir / "ledger.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()


def test_remote_fields_are_not_read_as_markup(tmp_path):
    """source_host comes from a remote caller: "[/oops]" crashed rich before."""
    with Ledger.open(tmp_path) as led:
        led.claim("m1", request(1, 512), "[/oops]", 60, FN)
        led.claim("m2", request(1, 512), "[bold red]src", 60, FN)
        led.release("m2", "[/] [link=x]")
    code, out, err = run(["claims", "--state-dir", str(tmp_path), "list"])
    assert code == 0, err
    assert "[/oops]" in out and "[bold red]src" in out and "[/] [link=x]" in out
    for mid, text in (("m1", "[/oops]"), ("m2", "[bold red]src")):
        code, out, err = run(["claims", "--state-dir", str(tmp_path), "show", mid])
        assert code == 0 and text in out, err


def test_host_state_command_opens_the_ledger_read_only(tmp_path, capsys):
    """`compute-agent host-state` only looks: a damaged ledger is reported, never moved aside."""
    from pathlib import Path

    from agent.cli import main

    root = Path(__file__).resolve().parents[1] / "fixtures" / "sysfs" / "single_no_smt"
    (tmp_path / "ledger.db").write_bytes(b"garbage" * 500)
    rc = main(
        [
            "host-state",
            "--connection",
            "test:///default",
            "--state-dir",
            str(tmp_path),
            "--sysfs-root",
            str(root),
            "--json",
        ]
    )
    assert rc == 1 and "corrupt" in capsys.readouterr().err
    assert not list(tmp_path.glob("ledger.db.corrupt-*"))
    assert (tmp_path / "ledger.db").read_bytes() == b"garbage" * 500
    # a missing ledger is not created either
    rc = main(
        [
            "host-state",
            "--connection",
            "test:///default",
            "--state-dir",
            str(tmp_path / "none"),
            "--sysfs-root",
            str(root),
            "--json",
        ]
    )
    assert rc == 0 and not (tmp_path / "none").exists()


def test_reasons_are_shown_verbatim_not_as_markup(tmp_path):
    """A release reason like "[libvirt] ..." or "[bold]x" is printed as typed."""
    import io

    from agent.claims.cli import _print_show
    from tests.claims.helpers import open_ledger, request, state_fn, topology

    with open_ledger(tmp_path) as ledger:
        ledger.claim("m-esc", request(), "src", 300, state_fn(topology()))
        ledger.release("m-esc", "[libvirt] live_migration_permit_post_copy=false [bold]x")
        out = io.StringIO()
        _print_show(ledger.get("m-esc"), ledger.transitions("m-esc"), out)
    assert "[libvirt] live_migration_permit_post_copy=false [bold]x" in out.getvalue()


def test_list_shows_the_latest_ended_claims_and_says_how_many_are_left_out(tmp_path):
    with Ledger.open(tmp_path) as led:
        for i in range(4):
            led.claim(f"ended-{i}", request(1, 512), "src", 60, FN)
            led.release(f"ended-{i}", "done")
        led.claim("live", request(1, 512), "src", 60, FN)
    code, out, _ = run(["claims", "--state-dir", str(tmp_path), "list", "--limit", "2"])
    assert code == 0 and "live" in out and "ended-3" in out and "ended-2" in out and "ended-0" not in out
    assert "2 older ended claim(s) not shown" in out
    code, out, _ = run(["claims", "--state-dir", str(tmp_path), "--json", "list", "--all"])
    assert [d["migration_id"] for d in json.loads(out)] == ["ended-0", "ended-1", "ended-2", "ended-3", "live"]
