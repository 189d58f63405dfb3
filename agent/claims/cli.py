"""`compute-agent claims list|show ID|release ID|accept-damage`: the operator's view of the ledger.

Wired into `agent/cli.py` with `add_claims_parser(subparsers)`; `run_claims(args)` returns the exit
code: 0 ok, 2 bad input, 4 no such claim, 1 the ledger cannot be used (corrupt, too new, busy,
permission denied, I/O). `--state-dir DIR` (default: [claims] state_dir of the config file) and
`--json` are accepted before or after the sub-command. `list` and `show` open the ledger read-only:
they never create, upgrade or move aside a ledger (a damaged one is reported and left for the agent),
and work for a user who may only read it, also on a read-only mount. `list` says first when the ledger
was found damaged and whether new claims are refused, and names rows it could not read. Every
command answers within about a second: a write that waits longer for the agent's claim in progress
stops and says so (nothing changed, retry).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from agent.claims.errors import LedgerAccessDenied, LedgerError, UnknownClaim
from agent.claims.ledger import Ledger
from agent.claims.model import Claim, ClaimState, Transition
from agent.claims.opening import corrupt_files
from agent.claims.store import LEDGER_FILE
from agent.cli_output import (
    CLAIMS_TABLE_WIDTH,
    ExitCode,
    console,
    exit_code_for,
    print_error,
    print_json,
    table,
)
from agent.config import load_config
from agent.cpuset import format_cpu_set
from agent.errors import AgentError, InvalidInput

PROG = "compute-agent claims"
LIST_ENDED_DEFAULT = 100  # ended claims `list` shows by default: the answer stays instant at any history
OPERATOR_WAIT_S = 1.0  # an operator command waits this long for the agent's transaction, then says so


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
    sub = p.add_subparsers(dest="claims_command", metavar="{list,show,release,accept-damage}")
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
    p_list.add_argument(
        "--limit",
        type=int,
        default=LIST_ENDED_DEFAULT,
        metavar="N",
        help=f"show the N ended claims changed last, with every live one (default {LIST_ENDED_DEFAULT})",
    )
    p_list.add_argument("--all", action="store_true", help="show every ended claim too (slow with a long history)")
    p_show = sub.add_parser("show", help="show one claim and its transitions")
    _common(p_show, suppress=True)
    p_show.add_argument("migration_id", metavar="ID")
    p_rel = sub.add_parser("release", help="release a held or migrating claim")
    _common(p_rel, suppress=True)
    p_rel.add_argument("migration_id", metavar="ID")
    p_rel.add_argument("--reason", default="released by the operator", help="why (recorded in the ledger)")
    p_acc = sub.add_parser(
        "accept-damage",
        help="allow new claims again after the ledger was found damaged",
        description="Record that an operator checked the host after ledger damage (lost claims may still "
        "hold CPUs): new claims are allowed again before the hold ends.",
    )
    _common(p_acc, suppress=True)
    p_acc.add_argument("--reason", required=True, help="what was checked (recorded in the ledger)")
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
    now = time.time()
    columns = ("migration", "instance", "source", "state", "cells", "pinned CPUs", "memory", "expires", "reason")
    rows = [
        (
            c.migration_id,
            c.instance_uuid,
            c.source_host,
            c.state.value,
            ",".join(map(str, c.placement.host_nodeset)),
            format_cpu_set(c.placement.pinned_cpus) or "-",
            _memory(c),
            _when(c.expires_at, now) if c.is_live else "-",
            c.reason or "",
        )
        for c in claims
    ]
    console(out, width=CLAIMS_TABLE_WIDTH).print(table(f"{len(claims)} claim(s)", columns, rows))


def _claim_rows(claim: Claim, now: float) -> list[tuple[str, str]]:
    emulator = format_cpu_set(claim.placement.emulator_pins)
    return [
        ("instance", claim.instance_uuid),
        ("source host", claim.source_host),
        ("state", claim.state.value),
        ("created", _when(claim.created_at, now)),
        ("updated", _when(claim.updated_at, now)),
        ("expires", _when(claim.expires_at, now) if claim.is_live else "-"),
        ("ttl", f"{claim.ttl_s:g}s"),
        ("reason", claim.reason or ""),
        ("pinned CPUs", format_cpu_set(claim.placement.pinned_cpus) or "-"),
        ("emulator", emulator + (" (isolated)" if claim.placement.emulator_isolated else "")),
    ]


def _print_show(claim: Claim, transitions: list[Transition], out: TextIO) -> None:
    now = time.time()
    screen = console(out, width=CLAIMS_TABLE_WIDTH)
    screen.print(table(f"claim {claim.migration_id}", ("key", "value"), _claim_rows(claim, now), show_header=False))
    cells = [
        (
            str(c.guest_cell),
            str(c.host_cell),
            " ".join(f"{v}:{format_cpu_set(c.cpu_pins[v])}" for v in c.vcpus),
            f"{c.memory_mb} MiB",
            f"{c.pagesize_kb} KiB",
        )
        for c in claim.placement.cells
    ]
    screen.print(table("placement", ("guest cell", "host cell", "vCPU -> pCPU", "memory", "page size"), cells))
    history = [
        (_when(t.at, now), t.from_state.value if t.from_state else "-", t.to_state.value, t.reason or "")
        for t in transitions
    ]
    screen.print(table("transitions", ("at", "from", "to", "reason"), history))


# --- the commands: each runs on an open ledger ------------------------------------------------------


def _warnings(ledger: Ledger) -> list[str]:
    """What `list` says before the claims: damage found, and rows it could not read."""
    lines = []
    damage = ledger.damage
    if damage is not None:
        lines.append(damage.summary)
    bad = ledger.unreadable_rows
    if bad:
        shown = "; ".join(str(b) for b in bad[:5])
        lines.append(f"{len(bad)} damaged row(s) not shown (not used by the agent): {shown}")
    return lines


def _list(ledger: Ledger, args: argparse.Namespace, as_json: bool, out: TextIO) -> None:
    states = getattr(args, "states", None) or None
    limit = None if getattr(args, "all", False) else max(0, getattr(args, "limit", LIST_ENDED_DEFAULT))
    claims = ledger.list_claims(states, ended_limit=limit)
    warnings = _warnings(ledger)
    if limit is not None:
        left_out = ledger.count_claims(states) - len(claims) - len(ledger.unreadable_rows)
        if left_out > 0:
            warnings.append(f"{left_out} older ended claim(s) not shown (--all, or --limit N)")
    if as_json:
        print_json([c.to_json() for c in claims], out)
        for line in warnings:  # stdout stays a JSON list of claims
            print_error(PROG, f"warning: {line}")
        return
    for line in warnings:
        out.write(f"!! {line}\n")
    _print_list(claims, out)


def _show(ledger: Ledger, args: argparse.Namespace, as_json: bool, out: TextIO) -> None:
    claim = ledger.get(args.migration_id)
    transitions = ledger.transitions(args.migration_id)
    if not as_json:
        _print_show(claim, transitions, out)
        return
    doc = claim.to_json()
    doc["transitions"] = [t.to_json() for t in transitions]
    print_json(doc, out)


def _release(ledger: Ledger, args: argparse.Namespace, as_json: bool, out: TextIO) -> None:
    claim = ledger.release(args.migration_id, f"operator: {args.reason}")
    if as_json:
        print_json(claim.to_json(), out)
    else:
        out.write(f"claim {claim.migration_id}: {claim.state.value} ({claim.reason})\n")


def _accept_damage(ledger: Ledger, args: argparse.Namespace, as_json: bool, out: TextIO) -> None:
    who = f"operator (uid {os.getuid()}): {args.reason}"
    damage = ledger.accept_damage(who)
    if as_json:
        print_json(None if damage is None else damage.to_json(), out)
    else:
        out.write(("no damage recorded" if damage is None else damage.summary) + "\n")


_Command = Callable[[Ledger, argparse.Namespace, bool, TextIO], None]
_COMMANDS: dict[str, _Command] = {"list": _list, "show": _show, "release": _release, "accept-damage": _accept_damage}
_READ_ONLY = frozenset({"list", "show"})  # these never create, upgrade or move aside a ledger


def _ledger_present(state_dir: Path) -> bool:
    """A ledger, or what is left of a damaged one, is in `state_dir` (PermissionError: typed)."""
    path = state_dir / LEDGER_FILE
    try:
        return path.exists() or bool(corrupt_files(state_dir, quiet=True))
    except PermissionError:
        raise LedgerAccessDenied(state_dir, "cannot look into the state directory") from None
    except OSError as exc:
        raise LedgerError(f"{state_dir}: cannot look into the state directory: {exc}") from None


def _run(args: argparse.Namespace, out: TextIO) -> ExitCode:
    command = getattr(args, "claims_command", None)
    run = _COMMANDS.get(command) if isinstance(command, str) else None
    if run is None:
        raise InvalidInput(f"unknown claims command {command!r} (list, show, release)")
    as_json = bool(getattr(args, "json", False))
    state_dir = _state_dir(args)
    if not _ledger_present(state_dir):
        if command in ("show", "release"):
            raise UnknownClaim(args.migration_id)
        out.write("[]\n" if as_json else f"no claim ledger in {state_dir}\n")
        return ExitCode.OK
    readonly = command in _READ_ONLY
    # a write salvages a damaged ledger as the agent would (loudly, new claims then refused)
    with Ledger.open(
        state_dir, readonly=readonly, busy_timeout_s=OPERATOR_WAIT_S, create=False, on_corrupt="salvage"
    ) as ledger:
        run(ledger, args, as_json, out)
    return ExitCode.OK


def run_claims(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    try:
        return _run(args, out or sys.stdout)
    except AgentError as exc:
        print_error(PROG, exc, err)
        return exit_code_for(exc)
    except PermissionError as exc:  # anything not mapped where it happened: a message, not a traceback
        print_error(PROG, LedgerAccessDenied(Path(exc.filename or "?"), exc.strerror or "permission denied"), err)
        return ExitCode.ERROR
