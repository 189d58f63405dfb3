"""`compute-agent claims list|show ID|release ID [--reason TEXT]`: the operator's view of the ledger.

Wired into `agent/cli.py` with `add_claims_parser(subparsers)`; `run_claims(args)` returns the exit
code: 0 ok, 2 bad input, 4 no such claim, 1 the ledger cannot be used (corrupt, too new, I/O).
`--state-dir DIR` (default: [claims] state_dir of the config file) and `--json` are accepted before
or after the sub-command. `list` and `show` open the ledger read-only: they never create, upgrade
or move aside a ledger (a damaged one is reported and left for the agent).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

# Everything printed through rich that is not ours is escaped: reasons are free text (operators,
# libvirt messages like "[libvirt] ..."), source hosts and instance ids come from remote callers.
from rich.markup import escape

from agent.claims.errors import UnknownClaim
from agent.claims.ledger import LEDGER_FILE, Claim, ClaimState, Ledger, Transition
from agent.config import load_config
from agent.cpuset import format_cpu_set
from agent.errors import AgentError, InvalidInput

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_FOUND = 4


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        default=default,
        help="the agent's state directory (default: [claims] state_dir from the config)",
    )
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS if suppress else False, help="machine-readable output"
    )


def add_claims_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `claims` command (with list/show/release) to an argparse subparsers object."""
    p = subparsers.add_parser(
        "claims",
        help="inspect or release destination claims",
        description="Inspect or release the destination claims this host holds.",
    )
    _common(p, suppress=False)
    sub = p.add_subparsers(dest="claims_command", metavar="{list,show,release}")
    sub.required = True
    p_list = sub.add_parser("list", help="list claims")
    _common(p_list, suppress=True)
    p_list.add_argument(
        "--state",
        action="append",
        choices=[s.value for s in ClaimState],
        dest="states",
        help="only claims in this state (repeatable)",
    )
    p_show = sub.add_parser("show", help="show one claim and its transitions")
    _common(p_show, suppress=True)
    p_show.add_argument("migration_id", metavar="ID")
    p_rel = sub.add_parser("release", help="release a held or migrating claim")
    _common(p_rel, suppress=True)
    p_rel.add_argument("migration_id", metavar="ID")
    p_rel.add_argument("--reason", default="released by the operator", help="why (recorded in the ledger)")
    p.set_defaults(func=run_claims)
    return p


def _state_dir(args: argparse.Namespace) -> Path:
    if getattr(args, "state_dir", None):
        return Path(args.state_dir)
    cfg_path = getattr(args, "config", None)
    return load_config(cfg_path).claims.state_dir


def _when(ts: float, now: float) -> str:
    delta = ts - now
    stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))
    rel = f"in {delta:.0f}s" if delta >= 0 else f"{-delta:.0f}s ago"
    return f"{stamp} ({rel})"


def _memory(claim: Claim) -> str:
    parts = []
    for c in claim.placement.cells:
        parts.append(f"{c.memory_mb} MiB@{c.host_cell} ({c.pagesize_kb} KiB pages)")
    return ", ".join(parts)


def _print_list(claims: list[Claim], out: TextIO) -> None:
    from rich.console import Console
    from rich.table import Table

    now = time.time()
    table = Table(title=f"{len(claims)} claim(s)")
    for col in ("migration", "instance", "source", "state", "cells", "pinned CPUs", "memory", "expires", "reason"):
        table.add_column(col)
    for c in claims:
        table.add_row(
            escape(c.migration_id),
            escape(c.instance_uuid),
            escape(c.source_host),
            c.state.value,
            ",".join(map(str, c.placement.host_nodeset)),
            format_cpu_set(c.placement.pinned_cpus) or "-",
            _memory(c),
            _when(c.expires_at, now) if c.is_live else "-",
            escape(c.reason or ""),
        )
    Console(file=out, width=200).print(table)


def _print_show(claim: Claim, transitions: list[Transition], out: TextIO) -> None:
    from rich.console import Console
    from rich.table import Table

    now = time.time()
    console = Console(file=out, width=200)
    info = Table(show_header=False, title=f"claim {escape(claim.migration_id)}")
    info.add_column("key")
    info.add_column("value")
    rows = [
        ("instance", escape(claim.instance_uuid)),
        ("source host", escape(claim.source_host)),
        ("state", claim.state.value),
        ("created", _when(claim.created_at, now)),
        ("updated", _when(claim.updated_at, now)),
        ("expires", _when(claim.expires_at, now) if claim.is_live else "-"),
        ("ttl", f"{claim.ttl_s:g}s"),
        ("reason", escape(claim.reason or "")),
        ("pinned CPUs", format_cpu_set(claim.placement.pinned_cpus) or "-"),
        (
            "emulator",
            format_cpu_set(claim.placement.emulator_pins)
            + (" (isolated)" if claim.placement.emulator_isolated else ""),
        ),
    ]
    for k, v in rows:
        info.add_row(k, v)
    console.print(info)
    cells = Table(title="placement")
    for col in ("guest cell", "host cell", "vCPU -> pCPU", "memory", "page size"):
        cells.add_column(col)
    for c in claim.placement.cells:
        pins = " ".join(f"{v}:{format_cpu_set(c.cpu_pins[v])}" for v in c.vcpus)
        cells.add_row(str(c.guest_cell), str(c.host_cell), pins, f"{c.memory_mb} MiB", f"{c.pagesize_kb} KiB")
    console.print(cells)
    hist = Table(title="transitions")
    for col in ("at", "from", "to", "reason"):
        hist.add_column(col)
    for t in transitions:
        hist.add_row(
            _when(t.at, now), t.from_state.value if t.from_state else "-", t.to_state.value, escape(t.reason or "")
        )
    console.print(hist)


def run_claims(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    as_json = bool(getattr(args, "json", False))
    command = getattr(args, "claims_command", None)
    try:
        state_dir = _state_dir(args)
        if not (state_dir / LEDGER_FILE).exists():
            if command == "list":
                out.write("[]\n" if as_json else f"no claim ledger in {state_dir}\n")
                return EXIT_OK
            if command in ("show", "release"):
                raise UnknownClaim(args.migration_id)
        read_only = command in ("list", "show")
        with Ledger.open(state_dir, readonly=read_only) as ledger:
            if command == "list":
                claims = ledger.list(args.states) if getattr(args, "states", None) else ledger.list()
                if as_json:
                    out.write(json.dumps([c.to_json() for c in claims], indent=2) + "\n")
                else:
                    _print_list(claims, out)
            elif command == "show":
                claim = ledger.get(args.migration_id)
                transitions = ledger.transitions(args.migration_id)
                if as_json:
                    doc = claim.to_json()
                    doc["transitions"] = [t.to_json() for t in transitions]
                    out.write(json.dumps(doc, indent=2) + "\n")
                else:
                    _print_show(claim, transitions, out)
            elif command == "release":
                reason = f"operator: {args.reason}"
                claim = ledger.release(args.migration_id, reason)
                if as_json:
                    out.write(json.dumps(claim.to_json(), indent=2) + "\n")
                else:
                    out.write(f"claim {claim.migration_id}: {claim.state.value} ({claim.reason})\n")
            else:
                raise InvalidInput(f"unknown claims command {command!r} (list, show, release)")
    except UnknownClaim as exc:
        err.write(f"compute-agent claims: {exc}\n")
        return EXIT_NOT_FOUND
    except InvalidInput as exc:
        err.write(f"compute-agent claims: {exc}\n")
        return EXIT_BAD_INPUT
    except AgentError as exc:
        err.write(f"compute-agent claims: {exc}\n")
        return EXIT_ERROR
    return EXIT_OK
