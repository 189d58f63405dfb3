"""The operator's commands over the bus: `hosts`, `migrate`, `migration list|show|abort|force-complete`
and `drain`. Wired into `agent/cli.py` with `add_orchestrator_parsers(subparsers)`; each command
returns its exit code.

`migrate` exit codes: 0 migrated (or started, with --no-wait; every candidate would fit, with
--dry-run), 2 bad input (unknown host or instance, a policy conflict), 3 no destination could take
it (each host's reason shown), 4 the migration failed or was aborted (the VM is still on the
source). Killing the command never stops the migration: the agents run it, `migration show ID`
re-attaches.
"""

from __future__ import annotations

import argparse
import enum
import json
import sys
from typing import Any, Callable, Iterator, Sequence, TextIO

import msgspec

from agent.bus import schemas as s
from agent.bus.errors import BusError, RemoteError, RemoteNoSuchMethod, RemoteNotFound
from agent.cli_output import console, print_error, print_json, print_warning, table
from agent.config import load_config
from agent.errors import AgentError, InvalidInput
from agent.orchestrator.drain import Drainer, DrainItem
from agent.orchestrator.errors import MigrationFailed, NoDestination, NumaMigrationRefused
from agent.orchestrator.migrate import Plan, Started
from agent.orchestrator.model import HostInfo
from agent.orchestrator.session import Session
from agent.orchestrator.versions import fmt
from agent.orchestrator.view import JsonView, LiveView, MigrateView, rejections_doc

PROG = "compute-agent"
WAIT_S = 24 * 3600.0  # a migration's own completion timeout ends it long before this


class MigrateExit(enum.IntEnum):
    OK = 0
    INVALID_INPUT = 2
    NO_DESTINATION = 3
    FAILED = 4


# --- parsers --------------------------------------------------------------------------------------


def add_orchestrator_parsers(subparsers: Any) -> None:
    """Add `hosts`, `migrate`, `migration` and `drain` to the `compute-agent` subparsers."""
    p = subparsers.add_parser("hosts", help="the live agents: versions, traits, free resources, age")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_hosts)
    _add_migrate(subparsers)
    _add_migration(subparsers)
    p = subparsers.add_parser("drain", help="live-migrate every instance off a host")
    p.add_argument("host")
    p.add_argument("--instance", action="append", default=[], metavar="NAME", help="only these (repeatable)")
    p.add_argument("--parallel", type=int, default=1, help="migrations out of the host at once (default 1)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_drain)


def _add_migrate(subparsers: Any) -> None:
    p = subparsers.add_parser("migrate", help="live-migrate an instance, NUMA-aware, with alternates")
    p.add_argument("instance", help="UUID or domain name")
    p.add_argument("--from", dest="source", required=True, metavar="HOST", help="the host it runs on")
    p.add_argument("--to", dest="targets", action="append", default=[], metavar="HOST", help="try these, in order")
    p.add_argument("--dry-run", action="store_true", help="ask each candidate whether it fits; hold nothing")
    p.add_argument("--no-wait", action="store_true", help="return once the source accepted the migration")
    p.add_argument("--json", action="store_true", help="events as JSON lines, then a final object")
    p.set_defaults(func=cmd_migrate)


def _add_migration(subparsers: Any) -> None:
    p = subparsers.add_parser("migration", help="migrations as the agents record them")
    sub = p.add_subparsers(dest="migration_command", metavar="{list,show,abort,force-complete}", required=True)
    q = sub.add_parser("list", help="every agent's migration history")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_migration_list)
    for name, func in (("show", cmd_migration_show), ("abort", cmd_migration_abort)):
        q = sub.add_parser(name)
        q.add_argument("migration_id", metavar="ID")
        q.add_argument("--from", dest="source", metavar="HOST", help="the source host (default: ask every agent)")
        q.add_argument("--json", action="store_true")
        q.set_defaults(func=func)
    q = sub.add_parser("force-complete")
    q.add_argument("migration_id", metavar="ID")
    q.add_argument("--from", dest="source", metavar="HOST")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_migration_force_complete)


# --- plumbing -------------------------------------------------------------------------------------


def _session(args: argparse.Namespace) -> Session:
    return Session.open(load_config(getattr(args, "config", None)))


def _guarded(run: Callable[[Session], int], args: argparse.Namespace) -> int:
    """Open a session, run, close; a typed error is one line and its exit code."""
    try:
        with _session(args) as session:
            return run(session)
    except InvalidInput as exc:
        print_error(PROG, f"error: {exc}")
        return MigrateExit.INVALID_INPUT
    except (AgentError, RemoteError, BusError) as exc:
        print_error(PROG, f"error: {exc}")
        return 1


def _age(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


# --- hosts ----------------------------------------------------------------------------------------


def host_doc(h: HostInfo, now: float) -> dict[str, Any]:
    return {**msgspec.to_builtins(h.caps), "age_s": round(h.age(now), 1), "heard_from": h.source}


def _cells_text(h: HostInfo) -> str:
    parts = []
    for c in h.caps.cells:
        pages = ",".join(f"{n}x{k}K" for k, n in sorted(c.free_pages.items()) if n)
        parts.append(f"{c.id}: {c.free_pcpus} pCPU {c.free_shared_vcpus} vCPU {c.free_memory_mb} MiB {pages}".strip())
    return "; ".join(parts)


def cmd_hosts(args: argparse.Namespace) -> int:
    def run(session: Session) -> int:
        now, hosts = session.fleet.clock(), session.fleet.all()
        if args.json:
            print_json({"hosts": [host_doc(h, now) for h in hosts], "cap": fmt(session.orchestrator.cap(hosts))})
            return 0
        rows = [
            (
                h.name,
                f"{h.caps.rpc_versions.min}-{h.caps.rpc_versions.max}",
                " ".join(t.removeprefix("COMPUTE_MIGRATE_") for t in h.caps.traits) or "-",
                f"{h.caps.libvirt_version}/{h.caps.qemu_version}",
                _cells_text(h),
                _age(h.age(now)),
            )
            for h in hosts
        ]
        cols = ("host", "RPC", "traits", "libvirt/QEMU", "free per cell", "age")
        console().print(table(f"{len(hosts)} agents (cap {fmt(session.orchestrator.cap(hosts))})", cols, rows))
        return 0

    return _guarded(run, args)


# --- migrate --------------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    view: MigrateView = JsonView() if args.json else LiveView(console())
    return _guarded(lambda session: migrate(session, args, view), args)


def migrate(session: Session, args: argparse.Namespace, view: MigrateView) -> int:
    orch = session.orchestrator
    try:
        plan = orch.plan(args.instance, args.source, args.targets)
    except NumaMigrationRefused as exc:
        view.refused(str(exc), ())
        return MigrateExit.NO_DESTINATION
    view.planned(plan)
    if args.dry_run:
        return _dry_run(session, plan, view)
    try:
        started = orch.start(plan)
    except NoDestination as exc:
        view.refused(exc.message, exc.rejections)
        return MigrateExit.NO_DESTINATION
    except MigrationFailed as exc:
        view.failed_to_start(exc.message)
        return MigrateExit.FAILED
    view.started(started)
    if args.no_wait:
        return MigrateExit.OK
    return follow(session, started.migration_id, started.plan.source.name, view, started)


def _dry_run(session: Session, plan: Plan, view: MigrateView) -> int:
    answers = session.orchestrator.dry_run(plan)
    view.dry_run(answers)
    return MigrateExit.OK if any(a.placement is not None for a in answers) else MigrateExit.NO_DESTINATION


def follow(session: Session, migration_id: str, source: str, view: MigrateView, started: Started | None) -> int:
    try:
        outcome = session.tracker.wait(
            migration_id,
            timeout=WAIT_S,
            on_progress=view.progress,
            poll=lambda: session.api.migration_status(source, migration_id),
        )
    except KeyboardInterrupt:
        view.detached(migration_id)
        return 130
    view.finished(outcome, started)
    return MigrateExit.OK if outcome.status == "completed" else MigrateExit.FAILED


# --- migration list|show|abort|force-complete -----------------------------------------------------


def _list_rows(session: Session) -> Iterator[dict[str, Any]]:
    for h in session.orchestrator.live_hosts():
        try:
            for row in session.api.list_migrations(h.name):
                yield {"source": h.name, **row}
        except RemoteNoSuchMethod:
            print_warning(console(sys.stderr), "note:", f"{h.name} does not serve list_migrations")
        except (RemoteError, BusError) as exc:
            print_warning(console(sys.stderr), "warning:", f"{h.name}: {exc}")


def cmd_migration_list(args: argparse.Namespace) -> int:
    def run(session: Session) -> int:
        rows = list(_list_rows(session))
        if args.json:
            print_json({"migrations": rows})
            return 0
        keys = ("migration_id", "instance", "source", "destination", "status", "phase", "percent", "reason")
        cells = [[str(r.get(k) if r.get(k) is not None else "") for k in keys] for r in rows]
        console().print(table(f"{len(rows)} migrations", ("id", *keys[1:]), cells))
        return 0

    return _guarded(run, args)


def find_migration(session: Session, migration_id: str, source: str | None) -> tuple[str, s.MigrationStateResult]:
    """(the source host, the state) of a migration; InvalidInput when no agent knows it."""
    hosts = [source] if source else [h.name for h in session.orchestrator.live_hosts()]
    for host in hosts:
        try:
            return host, session.api.migration_status(host, migration_id)
        except RemoteNotFound:
            continue
    raise InvalidInput(f"no agent knows migration {migration_id!r} (asked {', '.join(hosts) or 'nobody'})")


def cmd_migration_show(args: argparse.Namespace) -> int:
    def run(session: Session) -> int:
        host, state = find_migration(session, args.migration_id, args.source)
        view: MigrateView = JsonView() if args.json else LiveView(console())
        view.state(host, state)
        if state.status in ("completed", "failed", "aborted"):
            return MigrateExit.OK if state.status == "completed" else MigrateExit.FAILED
        return follow(session, args.migration_id, host, view, None)

    return _guarded(run, args)


def _control(args: argparse.Namespace, call: Callable[[Session, str, str], s.MigrationStateResult]) -> int:
    def run(session: Session) -> int:
        host, _ = find_migration(session, args.migration_id, args.source)
        state = call(session, host, args.migration_id)
        view: MigrateView = JsonView() if args.json else LiveView(console())
        view.state(host, state)
        return 0

    return _guarded(run, args)


def cmd_migration_abort(args: argparse.Namespace) -> int:
    return _control(args, lambda session, host, mid: session.api.abort_migration(host, mid))


def cmd_migration_force_complete(args: argparse.Namespace) -> int:
    return _control(args, lambda session, host, mid: session.api.force_complete(host, mid))


# --- drain ----------------------------------------------------------------------------------------


def cmd_drain(args: argparse.Namespace) -> int:
    def run(session: Session) -> int:
        info = session.orchestrator.source_host(args.host)
        instances = list(args.instance) or list(info.instances)
        if not instances:
            print_error(PROG, f"{args.host} lists no instances (give them with --instance NAME)")
            return MigrateExit.INVALID_INPUT
        items = Drainer(session.orchestrator, session.tracker).drain(args.host, instances, parallel=args.parallel)
        print_drain(args.host, items, args.json, sys.stdout)
        return MigrateExit.OK if all(i.result == "migrated" for i in items) else MigrateExit.NO_DESTINATION

    return _guarded(run, args)


def drain_doc(item: DrainItem) -> dict[str, Any]:
    return {
        "instance": item.instance,
        "result": item.result,
        "destination": item.destination,
        "migration_id": item.migration_id,
        "reason": item.reason,
        "rejections": rejections_doc(item.rejections),
    }


def print_drain(host: str, items: Sequence[DrainItem], as_json: bool, out: TextIO) -> None:
    if as_json:
        out.write(json.dumps({"host": host, "instances": [drain_doc(i) for i in items]}) + "\n")
        return
    rows = [
        (i.instance, i.result, i.destination or "-", i.migration_id or "-", _why(i))
        for i in sorted(items, key=lambda i: i.instance)
    ]
    moved = sum(i.result == "migrated" for i in items)
    title = f"drain {host}: {moved} of {len(items)} migrated"
    console(out).print(table(title, ("instance", "result", "now on", "migration", "reasons"), rows))


def _why(item: DrainItem) -> str:
    refusals = "; ".join(str(r) for r in item.rejections)
    return " | ".join(x for x in (item.reason or "", refusals) if x) or "-"


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (tests, before the lead wires the commands into agent/cli.py)."""
    parser = argparse.ArgumentParser(prog=PROG)
    parser.add_argument("--config", metavar="FILE")
    add_orchestrator_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
