"""The `compute-agent` command line: output shapes and exit codes (0 ok, 2 bad input, 3 no fit)."""

import json
from pathlib import Path

import pytest

from agent.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
SCENARIOS = Path(__file__).resolve().parents[2] / "shared" / "bench" / "fit-scenarios.json"


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_discover_json_matches_fixture(capsys):
    root = FIXTURES / "sysfs" / "eight_nodes"
    rc, out, _ = run(capsys, "discover", "--sysfs-root", str(root), "--json", "--hostname", "hv-8")
    assert rc == 0
    doc = json.loads(out)
    expected = json.loads((FIXTURES / "sysfs" / "eight_nodes.expected.json").read_text())
    doc.pop("hostname"), expected.pop("hostname")
    assert doc == expected


def test_discover_table_and_broken_tree(capsys):
    rc, out, _ = run(capsys, "discover", "--sysfs-root", str(FIXTURES / "sysfs" / "cpuless_node"))
    assert rc == 0 and "cell" in out
    rc, _, err = run(capsys, "discover", "--sysfs-root", str(FIXTURES / "sysfs" / "missing_meminfo"))
    assert rc == 2 and "meminfo" in err and "Traceback" not in err


@pytest.mark.skipif(not SCENARIOS.exists(), reason="shared scenarios absent")
def test_fit_exit_codes(capsys, tmp_path):
    scenarios = json.loads(SCENARIOS.read_text())
    for wanted, code in (("fit", 0), ("nofit", 3)):
        sc = next(s for s in scenarios if s["expected"] == wanted)
        host, inst = tmp_path / "host.json", tmp_path / "inst.json"
        host.write_text(json.dumps(sc["host"]))
        inst.write_text(json.dumps(sc["instance"]))
        rc, out, _ = run(capsys, "fit", "--host", str(host), "--instance", str(inst), "--json")
        assert rc == code
        doc = json.loads(out)
        assert doc["fits"] is (wanted == "fit")
        if wanted == "nofit":
            assert doc["cells"] == [] and doc["reason"]
        rc, out, _ = run(capsys, "fit", "--host", str(host), "--instance", str(inst))
        assert rc == code and out


def test_fit_bad_input_exit_2(capsys, tmp_path):
    host = tmp_path / "host.json"
    host.write_text('{"cells": [{"id": 0, "cpus": [0], "memory_kb": 1024}]}')
    bad = tmp_path / "inst.json"
    bad.write_text(
        json.dumps(
            {
                "uuid": "8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a10",
                "vcpus": 1,
                "memory_mb": 64,
                "extra_specs": {"hw:cpu_policy": "dedicated"},
                "image_properties": {"hw_cpu_policy": "shared", "hw_cpu_thread_policy": "bogus"},
            }
        )
    )
    rc, _, err = run(capsys, "fit", "--host", str(host), "--instance", str(bad))
    assert rc == 2 and "hw_cpu_thread_policy" in err
    rc, _, err = run(capsys, "fit", "--host", str(tmp_path / "absent.json"), "--instance", str(bad))
    assert rc == 2 and "absent.json" in err
    (tmp_path / "garbage.json").write_text("{nope")
    rc, _, err = run(capsys, "fit", "--host", str(tmp_path / "garbage.json"), "--instance", str(bad))
    assert rc == 2 and "JSON" in err


def test_host_state_counts_domains_and_live_claims(capsys, tmp_path):
    from agent.claims.hoststate import host_state_fn
    from agent.claims.ledger import Ledger
    from agent.config import ComputeConfig
    from agent.numa.capabilities import discover
    from agent.numa.request import parse_request

    root = str(FIXTURES / "sysfs" / "single_no_smt")
    topo, _ = discover(sysfs_root=root)
    request = parse_request(
        {
            "uuid": "8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a10",
            "vcpus": 2,
            "memory_mb": 64,
            "extra_specs": {"hw:cpu_policy": "dedicated"},
            "image_properties": {},
        }
    )
    with Ledger.open(tmp_path) as ledger:
        claim = ledger.claim("m-1", request, "src", 300, host_state_fn(topo, list, ComputeConfig()))
    rc, out, _ = run(
        capsys,
        "host-state",
        "--connection",
        "test:///default",
        "--state-dir",
        str(tmp_path),
        "--sysfs-root",
        root,
        "--json",
    )
    assert rc == 0
    doc = json.loads(out)
    assert doc["live_claims"] == ["m-1"]
    assert set(doc["cells"][0]["pinned_cpus"]) == set(claim.placement.pinned_cpus)
    # the test driver's one domain is unpinned: it floats
    assert doc["cells"][0]["floating_vcpus"] >= 1
    rc, out, _ = run(
        capsys, "host-state", "--connection", "test:///default", "--state-dir", str(tmp_path), "--sysfs-root", root
    )
    assert rc == 0 and "1 live claims" in out


def test_host_state_unreachable_libvirt_is_a_clean_error(capsys, tmp_path):
    rc, _, err = run(
        capsys, "host-state", "--connection", "qemu+tcp://127.0.0.250/system", "--state-dir", str(tmp_path)
    )
    assert rc == 1 and "cannot connect" in err and "Traceback" not in err


def test_bad_config_is_a_clean_error(capsys, tmp_path):
    cfg = tmp_path / "bad.conf"
    cfg.write_text("[compute]\ncpu_allocation_ratio = lots\n")
    rc, _, err = run(capsys, "--config", str(cfg), "host-state", "--connection", "test:///default")
    assert rc == 2 and "[compute] cpu_allocation_ratio" in err


def test_bad_log_level_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--log-level", "bogus", "discover"])
    assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_hostname_with_markup_is_printed_verbatim(capsys):
    rc, out, _ = run(
        capsys, "discover", "--sysfs-root", str(FIXTURES / "sysfs" / "single_no_smt"), "--hostname", "[/oops]"
    )
    assert rc == 0 and "[/oops]" in out


def test_cli_output_exit_codes_and_escaping():
    import io

    from agent.claims.errors import LedgerError, UnknownClaim
    from agent.cli_output import ExitCode, console, exit_code_for, print_error, print_json, table
    from agent.errors import DiscoveryError, InvalidInput

    # the documented exit codes (README, agent/cli.py): a change here is a change of the interface
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4]
    assert exit_code_for(UnknownClaim("m")) is ExitCode.NOT_FOUND
    assert exit_code_for(InvalidInput("x")) is ExitCode.INVALID_INPUT
    assert exit_code_for(DiscoveryError("x")) is ExitCode.INVALID_INPUT
    assert exit_code_for(LedgerError("x")) is ExitCode.ERROR
    out, err = io.StringIO(), io.StringIO()
    print_json({"a": [1]}, out)
    print_error("compute-agent", "error: boom", err)
    assert json.loads(out.getvalue()) == {"a": [1]} and out.getvalue().endswith("}\n")
    assert err.getvalue() == "compute-agent: error: boom\n"
    # free text is shown as it is, never read as rich markup
    shown = io.StringIO()
    console(shown, width=120).print(table("[b]t[/b]", ["[i]c[/i]"], [["[libvirt] [red]x[/red]"]]))
    assert "[b]t[/b]" in shown.getvalue() and "[i]c[/i]" in shown.getvalue()
    assert "[libvirt] [red]x[/red]" in shown.getvalue()
