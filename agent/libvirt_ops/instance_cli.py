"""`compute-agent instance set-metadata|show-metadata DOMAIN`: the instance's flavor extra specs and
image properties, recorded with the domain (agent.libvirt_ops.instance_metadata).

    compute-agent instance set-metadata vm1 --extra-spec hw:cpu_policy=dedicated \\
        --image-property hw_mem_page_size=2048 [--replace] [--connection URI] [--json]

`set-metadata` sets the given keys on top of the recorded ones (`--replace`: instead of them). The
result is checked by the request parser (agent.numa.request.parse_request) with the domain's vCPUs
and memory before anything is written: a contradiction (e.g. both live-migration features true)
exits 2 and leaves the domain as it was. Exit codes: 0 ok, 2 invalid input, 4 no such domain, 1
libvirt failed. Wired into `agent/cli.py` with `add_instance_parser(subparsers)`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from agent.cli_output import ExitCode, console, exit_code_for, print_error, print_json, table
from agent.config import load_config
from agent.errors import AgentError, InvalidInput
from agent.libvirt_ops.connection import connection, lookup_domain
from agent.libvirt_ops.domain_read import parse_domain
from agent.libvirt_ops.errors import DomainNotFound
from agent.libvirt_ops.instance_metadata import (
    InstanceMetadata,
    load_instance_metadata,
    store_instance_metadata,
)
from agent.numa.request import parse_request
from agent.units import mib_from_kib

PROG = "compute-agent instance"


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text[:60]!r} is not KEY=VALUE")
    return key, value


def add_instance_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `instance` command (set-metadata, show-metadata) to an argparse subparsers object."""
    p = subparsers.add_parser("instance", help="the instance metadata recorded with a domain")
    sub = p.add_subparsers(dest="instance_command", metavar="{set-metadata,show-metadata}")
    sub.required = True
    p_set = sub.add_parser("set-metadata", help="record flavor extra specs and image properties with a domain")
    p_set.add_argument("domain", metavar="DOMAIN", help="libvirt domain name or UUID")
    p_set.add_argument("--extra-spec", action="append", type=_key_value, default=[], metavar="K=V", dest="specs")
    p_set.add_argument("--image-property", action="append", type=_key_value, default=[], metavar="K=V", dest="props")
    p_set.add_argument("--replace", action="store_true", help="replace every recorded key instead of adding to them")
    p_show = sub.add_parser("show-metadata", help="print the metadata recorded with a domain")
    p_show.add_argument("domain", metavar="DOMAIN", help="libvirt domain name or UUID")
    for q in (p_set, p_show):
        q.add_argument("--connection", metavar="URI", help="libvirt URI (default: [libvirt] connection_uri)")
        q.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_instance)
    return p


def _uri(args: argparse.Namespace) -> str:
    return args.connection or load_config(getattr(args, "config", None)).libvirt.connection_uri


def _unique(pairs: list[tuple[str, str]], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in pairs:
        if key in out and out[key] != value:
            raise InvalidInput(f"{option} {key} is given twice with different values")
        out[key] = value
    return out


def _wanted(current: InstanceMetadata, args: argparse.Namespace) -> InstanceMetadata:
    specs, props = _unique(args.specs, "--extra-spec"), _unique(args.props, "--image-property")
    base = InstanceMetadata(uuid=current.uuid) if args.replace else current
    return base.merged(specs, props)


def _validate(dom: Any, meta: InstanceMetadata) -> None:
    """parse_request with the domain's own size: InvalidRequest (exit 2) before anything is written."""
    placement = parse_domain(dom.XMLDesc(0))
    doc = meta.request_doc(uuid=placement.uuid, vcpus=placement.vcpus, memory_mb=mib_from_kib(placement.memory_kib))
    parse_request(doc)


def _set(args: argparse.Namespace, out: TextIO) -> None:
    with connection(_uri(args)) as conn:
        dom = lookup_domain(conn, args.domain)
        meta = _wanted(load_instance_metadata(dom), args)
        _validate(dom, meta)
        stored = store_instance_metadata(conn, args.domain, meta)
    _print(args, stored, out)


def _show(args: argparse.Namespace, out: TextIO) -> None:
    with connection(_uri(args), readonly=True) as conn:
        stored = load_instance_metadata(lookup_domain(conn, args.domain))
    _print(args, stored, out)


def _print(args: argparse.Namespace, meta: InstanceMetadata, out: TextIO) -> None:
    if args.json:
        print_json({"domain": args.domain, **meta.to_json()}, out)
        return
    rows = [("flavor", k, v) for k, v in meta.extra_specs.items()]
    rows += [("image", k, v) for k, v in meta.image_properties.items()]
    console(out).print(table(f"instance metadata of {args.domain}", ("from", "key", "value"), rows))


def run_instance(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    command = {"set-metadata": _set, "show-metadata": _show}.get(getattr(args, "instance_command", ""))
    try:
        if command is None:
            raise InvalidInput(f"unknown instance command {args.instance_command!r} (set-metadata, show-metadata)")
        command(args, out or sys.stdout)
    except DomainNotFound as exc:
        print_error(PROG, exc, err)
        return ExitCode.NOT_FOUND
    except AgentError as exc:
        print_error(PROG, exc, err)
        return exit_code_for(exc)
    return ExitCode.OK
