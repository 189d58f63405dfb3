"""`compute-agent` command line.

Exit codes: 0 success, 2 invalid input (the error on stderr), 3 "does not fit" (fit), 4 not found,
1 the agent could not do it (libvirt unreachable, ledger unusable, ...; the typed error on stderr)
or an unexpected bug (logged with its traceback, never silent).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from agent import __version__
from agent.errors import AgentError, InvalidInput
from agent.log import setup_logging

log = logging.getLogger("compute_agent.cli")

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_INVALID = 2
EXIT_NOFIT = 3


def _read_json_file(path: str, what: str) -> Any:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{what} file {path}: {exc.strerror or exc}") from None
    if len(data) > 64 << 20:
        raise InvalidInput(f"{what} file {path}: larger than 64 MiB")
    return data


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


# --- discover -----------------------------------------------------------------------------------


def _cmd_discover(args: argparse.Namespace) -> int:
    from agent.numa.capabilities import discover

    caps_xml = None
    if args.capabilities:
        try:
            caps_xml = Path(args.capabilities).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"capabilities file {args.capabilities}: {exc}") from None
    topology, differences = discover(sysfs_root=args.sysfs_root, capabilities_xml=caps_xml, hostname=args.hostname)
    if args.json:
        _print_json(topology.to_json())
        return EXIT_OK
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from agent.cpuset import format_cpu_set

    console = Console()
    table = Table(title=escape(f"NUMA topology of {topology.hostname}"))
    for col in ("cell", "CPUs", "cores", "memory", "hugepages (free/total)", "distances"):
        table.add_column(col)
    for cell in topology.cells:
        pages = ", ".join(f"{_page_label(p.size_kb)}: {p.free}/{p.total}" for p in cell.pages if p.size_kb != 4)
        table.add_row(
            str(cell.id),
            format_cpu_set(cell.cpus) or "-",
            str(len(cell.siblings)) + (" (SMT)" if any(len(g) > 1 for g in cell.siblings) else ""),
            f"{cell.memory_kb / 1048576:.1f} GiB",
            pages or "-",
            " ".join(f"{k}:{v}" for k, v in sorted(cell.distances.items())),
        )
    console.print(table)
    console.print(
        f"online: {format_cpu_set(topology.online_cpus) or '-'}   "
        f"offline: {format_cpu_set(topology.offline_cpus) or '-'}   "
        f"isolated: {format_cpu_set(topology.isolated_cpus) or '-'}"
    )
    for line in differences:
        console.print(f"[yellow]sysfs and libvirt disagree:[/yellow] {escape(line)}")
    return EXIT_OK


def _page_label(size_kb: int) -> str:
    if size_kb >= 1048576:
        return f"{size_kb // 1048576}G"
    if size_kb >= 1024:
        return f"{size_kb // 1024}M"
    return f"{size_kb}K"


# --- fit ----------------------------------------------------------------------------------------


def _cmd_fit(args: argparse.Namespace) -> int:
    from agent.numa.fit import fit
    from agent.numa.request import parse_request
    from agent.numa.state import HostState

    state = HostState.from_json(_read_json_file(args.host, "host"))
    request = parse_request(_read_json_file(args.instance, "instance"))
    result = fit(request, state, preference=args.preference)
    if args.json:
        _print_json(result.to_json())
    elif result.fits:
        from rich.console import Console
        from rich.table import Table

        from agent.config import format_cpu_set

        table = Table(title=f"placement of {request.uuid}")
        for col in ("guest cell", "host cell", "vCPU -> host CPUs", "memory", "page size"):
            table.add_column(col)
        for cell in result.cells:
            pins = " ".join(f"{v}->{format_cpu_set(cell.cpu_pins[v])}" for v in cell.vcpus)
            table.add_row(
                str(cell.guest_cell),
                str(cell.host_cell),
                pins,
                f"{cell.memory_mb} MiB",
                _page_label(cell.pagesize_kb),
            )
        console = Console()
        console.print(table)
        console.print(f"emulator threads: {format_cpu_set(result.emulator_pins) or '-'}")
    else:
        sys.stdout.write(f"does not fit: {result.reason}\n")
    return EXIT_OK if result.fits else EXIT_NOFIT


# --- host-state ---------------------------------------------------------------------------------


def _cmd_host_state(args: argparse.Namespace) -> int:
    """This host's true state: topology - config reservations - domains - live claims."""
    from agent.claims.errors import LedgerError
    from agent.claims.hoststate import compute_host_state
    from agent.claims.ledger import Ledger
    from agent.config import load_config
    from agent.libvirt_ops.connection import connection
    from agent.libvirt_ops.inventory import read_domains
    from agent.numa.capabilities import discover

    cfg = load_config(args.config)
    uri = args.connection or cfg.libvirt.connection_uri
    with connection(uri, readonly=True) as conn:
        inventory = read_domains(conn)
        caps_xml = conn.getCapabilities() if args.cross_check else None
    topology, differences = discover(sysfs_root=args.sysfs_root, capabilities_xml=caps_xml)
    state_dir = Path(args.state_dir) if args.state_dir else cfg.claims.state_dir
    try:
        # read-only: a look at the host never creates, upgrades or moves aside the agent's ledger
        with Ledger.open(state_dir, readonly=True) as ledger:
            claims = ledger.live_claims()
    except LedgerError as exc:
        if (state_dir / "ledger.db").exists():
            raise
        log.info("no claim ledger in %s (%s): counting no claims", state_dir, exc)
        claims = []
    # the inventory says which domains are active (an incoming, not yet running copy of a claimed
    # instance is counted once, through its claim)
    report = compute_host_state(topology, inventory, claims, cfg.compute)
    problems = list(inventory.unreadable) + list(report.overlaps) + list(report.notes) + differences
    if args.json:
        doc = report.state.to_json()
        doc["live_claims"] = [c.migration_id for c in claims]
        # unbound_memory_mb is HostState's own (small pages bound to no cell: what the fitter
        # subtracts); unbound hugepage memory, if any, is among the problems (report notes)
        doc["problems"] = problems
        _print_json(doc)
        return EXIT_OK
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from agent.cpuset import format_cpu_set

    table = Table(
        title=f"free resources of {escape(topology.hostname)} "
        f"({len(inventory.domains)} domains, {len(claims)} live claims)"
    )
    for col in ("cell", "pinned", "free dedicated", "shared", "floating room", "small MiB free", "hugepages free"):
        table.add_column(col)
    for res in report.state.all_resources():
        usage = report.state.cell_usage(res.cell.id)
        table.add_row(
            str(res.cell.id),
            format_cpu_set(usage.pinned_cpus) or "-",
            format_cpu_set(res.dedicated_cpus) or "-",
            format_cpu_set(res.shared_cpus) or "-",
            str(res.floating_capacity),
            str(res.small_free_mb),
            ", ".join(f"{_page_label(s)}: {n}" for s, n in sorted(res.free_pages.items())) or "-",
        )
    console = Console()
    console.print(table)
    console.print(
        f"reserved host memory: {report.state.reserved_memory_mb} MiB; "
        f"memory not bound to a cell: {report.unbound_memory_mb} MiB"
    )
    for line in problems:
        console.print(f"[yellow]warning:[/yellow] {escape(line)}")
    return EXIT_OK


# --- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compute-agent",
        description="NUMA-aware live migration agent for KVM hypervisors.",
    )
    parser.add_argument("--version", action="version", version=f"compute-agent {__version__}")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="default WARNING",
    )
    parser.add_argument("--config", metavar="FILE", help="agent config (default /etc/compute-agent/compute-agent.conf)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("discover", help="print this host's NUMA topology")
    p.add_argument("--sysfs-root", default="/sys", metavar="DIR", help="read DIR/devices/system/... (default /sys)")
    p.add_argument("--capabilities", metavar="FILE", help="libvirt capabilities XML to cross-check with")
    p.add_argument("--hostname", help="hostname to report (default: this host's)")
    p.add_argument("--json", action="store_true", help="JSON as in formats.md (Host topology)")
    p.set_defaults(func=_cmd_discover)

    p = sub.add_parser("fit", help="place an instance request on a host state")
    p.add_argument("--host", required=True, metavar="FILE", help="host state JSON")
    p.add_argument("--instance", required=True, metavar="FILE", help="instance request JSON")
    p.add_argument("--preference", choices=("spread", "pack"), default="spread")
    p.add_argument("--json", action="store_true", help="Placement JSON as in formats.md")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("host-state", help="this host's free resources: topology - reservations - domains - claims")
    p.add_argument("--connection", metavar="URI", help="libvirt URI (default: [libvirt] connection_uri)")
    p.add_argument("--state-dir", metavar="DIR", help="claim ledger directory (default: [claims] state_dir)")
    p.add_argument("--sysfs-root", default="/sys", metavar="DIR")
    p.add_argument("--cross-check", action="store_true", help="compare sysfs with libvirt capabilities")
    p.add_argument("--json", action="store_true", help="Host state JSON as in formats.md, plus problems")
    p.set_defaults(func=_cmd_host_state)

    try:
        from agent.claims.cli import add_claims_parser
    except ImportError:  # pragma: no cover - the claims package is always shipped
        pass
    else:
        add_claims_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except InvalidInput as exc:
        log.debug("invalid input", exc_info=True)
        sys.stderr.write(f"compute-agent: error: {exc}\n")
        return EXIT_INVALID
    except AgentError as exc:
        sys.stderr.write(f"compute-agent: error: {exc}\n")
        return EXIT_INVALID if getattr(exc, "code", "") in {"discovery_error"} else EXIT_UNEXPECTED
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if type(exc).__name__ == "libvirtError":  # a libvirt call not yet wrapped at its edge
            log.debug("libvirt error", exc_info=True)
            sys.stderr.write(f"compute-agent: libvirt error: {exc}\n")
            return EXIT_UNEXPECTED
        # an unexpected bug: say so loudly, with the traceback in the log
        log.exception("unexpected error in %s", args.command)
        sys.stderr.write("compute-agent: unexpected error (see the log above)\n")
        return EXIT_UNEXPECTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
