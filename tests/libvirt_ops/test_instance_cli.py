"""`compute-agent instance set-metadata|show-metadata` against test:///default."""

from __future__ import annotations

import argparse
import io
import json
import uuid as uuidlib
from typing import Iterator

import libvirt
import pytest

from agent.libvirt_ops.instance_cli import add_instance_parser, run_instance
from agent.libvirt_ops.instance_metadata import InstanceMetadata, load_instance_metadata

URI = "test:///default"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compute-agent")
    p.add_argument("--config")
    add_instance_parser(p.add_subparsers(dest="command", required=True))
    return p


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_instance(parser().parse_args(list(argv)), out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def domain() -> Iterator[str]:
    conn = libvirt.open(URI)
    name = f"cli-{uuidlib.uuid4().hex[:8]}"
    dom = conn.defineXML(
        f"<domain type='test'><name>{name}</name><memory unit='MiB'>1024</memory><vcpu>2</vcpu>"
        "<os><type>hvm</type></os></domain>"
    )
    dom.create()
    try:
        yield name
    finally:
        dom.destroy()
        dom.undefine()
        conn.close()


def stored(name: str) -> InstanceMetadata:
    conn = libvirt.open(URI)
    try:
        return load_instance_metadata(conn.lookupByName(name))
    finally:
        conn.close()


def test_set_then_show_json(domain: str) -> None:
    code, out, err = run(
        "instance",
        "set-metadata",
        domain,
        "--extra-spec",
        "hw:cpu_policy=dedicated",
        "--image-property",
        "hw_cpu_thread_policy=isolate",
        "--connection",
        URI,
        "--json",
    )
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert doc["extra_specs"] == {"hw:cpu_policy": "dedicated"}
    assert doc["image_properties"] == {"hw_cpu_thread_policy": "isolate"}
    code, out, _ = run("instance", "show-metadata", domain, "--connection", URI, "--json")
    assert code == 0 and json.loads(out) == doc


def test_set_adds_to_the_recorded_keys_and_replace_starts_over(domain: str) -> None:
    assert run("instance", "set-metadata", domain, "--extra-spec", "a=1", "--connection", URI)[0] == 0
    assert run("instance", "set-metadata", domain, "--extra-spec", "b=2", "--connection", URI)[0] == 0
    assert dict(stored(domain).extra_specs) == {"a": "1", "b": "2"}
    assert run("instance", "set-metadata", domain, "--extra-spec", "c=3", "--replace", "--connection", URI)[0] == 0
    assert dict(stored(domain).extra_specs) == {"c": "3"}


def test_a_conflict_is_refused_before_anything_is_written(domain: str) -> None:
    run("instance", "set-metadata", domain, "--extra-spec", "a=1", "--connection", URI)
    code, out, err = run(
        "instance",
        "set-metadata",
        domain,
        "--extra-spec",
        "compute:live_migration_post_copy=true",
        "--image-property",
        "compute_live_migration_auto_converge=true",
        "--connection",
        URI,
    )
    assert code == 2 and out == ""
    assert "compute:live_migration_post_copy" in err
    assert stored(domain) == InstanceMetadata({"a": "1"})


def test_a_request_the_domain_cannot_hold_is_refused(domain: str) -> None:
    code, _, err = run("instance", "set-metadata", domain, "--extra-spec", "hw:numa_nodes=4", "--connection", URI)
    assert code == 2 and "hw:numa_nodes" in err  # 2 vCPUs cannot make 4 guest cells
    assert stored(domain) == InstanceMetadata()


def test_the_same_key_twice_with_different_values_is_refused(domain: str) -> None:
    code, _, err = run(
        "instance", "set-metadata", domain, "--extra-spec", "a=1", "--extra-spec", "a=2", "--connection", URI
    )
    assert code == 2 and "twice" in err


def test_unknown_domain_exits_4() -> None:
    code, _, err = run("instance", "show-metadata", "no-such-domain", "--connection", URI)
    assert code == 4 and "not found" in err


def test_bad_key_value_is_an_argparse_error() -> None:
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(["instance", "set-metadata", "d", "--extra-spec", "novalue"])
    assert exc.value.code == 2


def test_table_output(domain: str) -> None:
    code, out, _ = run(
        "instance", "set-metadata", domain, "--extra-spec", "hw:cpu_policy=dedicated", "--connection", URI
    )
    assert code == 0 and "hw:cpu_policy" in out and "dedicated" in out
