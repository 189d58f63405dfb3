"""`compute-agent` command line.

Exit codes (agent.cli_output.ExitCode, where the rendering lives too): 0 success, 2 invalid input
(the error on stderr), 3 "does not fit" (fit), 4 not found, 1 the agent could not do it (libvirt
unreachable, ledger unusable, ...; the typed error on stderr) or an unexpected bug (logged with its
traceback, never silent).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from agent import __version__
from agent.cpuset import format_cpu_set
from agent.errors import AgentError, InvalidInput
from agent.limits import MAX_CLI_FILE_BYTES, MAX_XML_BYTES
from agent.safe_io import read_bounded, read_bounded_text
from agent.units import page_label

# The commands' own modules (rich, the ledger, libvirt) are imported where they are used, so that
# `compute-agent daemon` starts without loading what only the operator commands need.
if TYPE_CHECKING:
    from agent.claims.hoststate import HostStateReport
    from agent.claims.model import Claim
    from agent.libvirt_ops.inventory import DomainInventory
    from agent.numa.placement import Placement
    from agent.numa.request import InstanceRequest
    from agent.numa.topology import HostTopology

log = logging.getLogger("compute_agent.cli")

PROG = "compute-agent"


def _read_json_file(path: str, what: str) -> Any:
    return read_bounded(path, limit=MAX_CLI_FILE_BYTES, what=f"{what} file")


# --- discover -----------------------------------------------------------------------------------


def _read_capabilities(path: str | None) -> str | None:
    if not path:
        return None
    return read_bounded_text(path, limit=MAX_XML_BYTES, what="capabilities file")


def _cmd_discover(args: argparse.Namespace) -> int:
    from agent.cli_output import ExitCode, print_json
    from agent.numa.capabilities import discover

    caps_xml = _read_capabilities(args.capabilities)
    topology, differences = discover(sysfs_root=args.sysfs_root, capabilities_xml=caps_xml, hostname=args.hostname)
    if args.json:
        print_json(topology.to_json())
    else:
        _print_topology(topology, differences)
    return ExitCode.OK


def _print_topology(topology: HostTopology, differences: Sequence[str]) -> None:
    from agent.cli_output import console, print_warning, table

    columns = ("cell", "CPUs", "cores", "memory", "hugepages (free/total)", "distances")
    rows = [
        (
            str(cell.id),
            format_cpu_set(cell.cpus) or "-",
            str(len(cell.siblings)) + (" (SMT)" if any(len(g) > 1 for g in cell.siblings) else ""),
            f"{cell.memory_kb / 1048576:.1f} GiB",
            ", ".join(f"{page_label(p.size_kb)}: {p.free}/{p.total}" for p in cell.pages if p.size_kb != 4) or "-",
            " ".join(f"{k}:{v}" for k, v in sorted(cell.distances.items())),
        )
        for cell in topology.cells
    ]
    screen = console()
    screen.print(table(f"NUMA topology of {topology.hostname}", columns, rows))
    screen.print(
        f"online: {format_cpu_set(topology.online_cpus) or '-'}   "
        f"offline: {format_cpu_set(topology.offline_cpus) or '-'}   "
        f"isolated: {format_cpu_set(topology.isolated_cpus) or '-'}"
    )
    for line in differences:
        print_warning(screen, "sysfs and libvirt disagree:", line)


# --- fit ----------------------------------------------------------------------------------------


def _cmd_fit(args: argparse.Namespace) -> int:
    from agent.cli_output import ExitCode, print_json
    from agent.numa.fit import fit
    from agent.numa.placement import NoFit
    from agent.numa.request import parse_request
    from agent.numa.state import HostState

    state = HostState.from_json(_read_json_file(args.host, "host"))
    request = parse_request(_read_json_file(args.instance, "instance"))
    result = fit(request, state, preference=args.preference)
    if args.json:
        print_json(result.to_json())
    elif isinstance(result, NoFit):
        sys.stdout.write(f"does not fit: {result.reason}\n")
    else:
        _print_placement(request, result)
    return ExitCode.NO_FIT if isinstance(result, NoFit) else ExitCode.OK


def _print_placement(request: InstanceRequest, placement: Placement) -> None:
    from agent.cli_output import console, table

    columns = ("guest cell", "host cell", "vCPU -> host CPUs", "memory", "page size")
    rows = [
        (
            str(cell.guest_cell),
            str(cell.host_cell),
            " ".join(f"{v}->{format_cpu_set(cell.cpu_pins[v])}" for v in cell.vcpus),
            f"{cell.memory_mb} MiB",
            page_label(cell.pagesize_kb),
        )
        for cell in placement.cells
    ]
    screen = console()
    screen.print(table(f"placement of {request.uuid}", columns, rows))
    screen.print(f"emulator threads: {format_cpu_set(placement.emulator_pins) or '-'}")


# --- host-state ---------------------------------------------------------------------------------


def _live_claims(state_dir: Path) -> list[Claim]:
    """The ledger's live claims, read-only: a look at the host never creates, upgrades or moves
    aside the agent's ledger. No ledger yet: no claims."""
    from agent.claims.errors import LedgerError
    from agent.claims.ledger import Ledger
    from agent.claims.store import LEDGER_FILE

    try:
        with Ledger.open(state_dir, readonly=True) as ledger:
            return ledger.live_claims()
    except LedgerError as exc:
        if (state_dir / LEDGER_FILE).exists():
            raise
        log.info("no claim ledger in %s (%s): counting no claims", state_dir, exc)
        return []


def _cmd_host_state(args: argparse.Namespace) -> int:
    """This host's true state: topology - config reservations - domains - live claims."""
    from agent.claims.hoststate import compute_host_state
    from agent.cli_output import ExitCode, print_json
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
    claims = _live_claims(Path(args.state_dir) if args.state_dir else cfg.claims.state_dir)
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
        print_json(doc)
    else:
        _print_host_state(topology, inventory, claims, report, problems)
    return ExitCode.OK


def _print_host_state(
    topology: HostTopology,
    inventory: DomainInventory,
    claims: list[Claim],
    report: HostStateReport,
    problems: list[str],
) -> None:
    from agent.cli_output import console, print_warning, table

    columns = ("cell", "pinned", "free dedicated", "shared", "floating room", "small MiB free", "hugepages free")
    rows = []
    for res in report.state.all_resources():
        usage = report.state.cell_usage(res.cell.id)
        rows.append(
            (
                str(res.cell.id),
                format_cpu_set(usage.pinned_cpus) or "-",
                format_cpu_set(res.dedicated_cpus) or "-",
                format_cpu_set(res.shared_cpus) or "-",
                str(res.floating_capacity),
                str(res.small_free_mb),
                ", ".join(f"{page_label(s)}: {n}" for s, n in sorted(res.free_pages.items())) or "-",
            )
        )
    title = f"free resources of {topology.hostname} ({len(inventory.domains)} domains, {len(claims)} live claims)"
    screen = console()
    screen.print(table(title, columns, rows))
    screen.print(
        f"reserved host memory: {report.state.reserved_memory_mb} MiB; "
        f"memory not bound to a cell: {report.unbound_memory_mb} MiB"
    )
    for line in problems:
        print_warning(screen, "warning:", line)


# --- parser -------------------------------------------------------------------------------------


def _add_discover(sub: Any) -> None:
    p = sub.add_parser("discover", help="print this host's NUMA topology")
    p.add_argument("--sysfs-root", default="/sys", metavar="DIR", help="read DIR/devices/system/... (default /sys)")
    p.add_argument("--capabilities", metavar="FILE", help="libvirt capabilities XML to cross-check with")
    p.add_argument("--hostname", help="hostname to report (default: this host's)")
    p.add_argument("--json", action="store_true", help="JSON as in formats.md (Host topology)")
    p.set_defaults(func=_cmd_discover)


def _add_fit(sub: Any) -> None:
    p = sub.add_parser("fit", help="place an instance request on a host state")
    p.add_argument("--host", required=True, metavar="FILE", help="host state JSON")
    p.add_argument("--instance", required=True, metavar="FILE", help="instance request JSON")
    p.add_argument("--preference", choices=("spread", "pack"), default="spread")
    p.add_argument("--json", action="store_true", help="Placement JSON as in formats.md")
    p.set_defaults(func=_cmd_fit)


def _add_host_state(sub: Any) -> None:
    p = sub.add_parser("host-state", help="this host's free resources: topology - reservations - domains - claims")
    p.add_argument("--connection", metavar="URI", help="libvirt URI (default: [libvirt] connection_uri)")
    p.add_argument("--state-dir", metavar="DIR", help="claim ledger directory (default: [claims] state_dir)")
    p.add_argument("--sysfs-root", default="/sys", metavar="DIR")
    p.add_argument("--cross-check", action="store_true", help="compare sysfs with libvirt capabilities")
    p.add_argument("--json", action="store_true", help="Host state JSON as in formats.md, plus problems")
    p.set_defaults(func=_cmd_host_state)


def _cmd_daemon(args: argparse.Namespace) -> int:
    from agent.daemon.process import DaemonOptions, run_daemon

    config = getattr(args, "daemon_config", None) or args.config
    return run_daemon(DaemonOptions(config_path=Path(config) if config else None, sysfs_root=Path(args.sysfs_root)))


def _daemon_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", dest="daemon_config", metavar="FILE", help="agent config (default as above)")
    p.add_argument("--sysfs-root", default="/sys", metavar="DIR", help="read the topology below DIR (tests)")
    p.set_defaults(func=_cmd_daemon)


def _add_daemon(sub: Any) -> None:
    _daemon_arguments(sub.add_parser("daemon", help="run the agent (under systemd: Type=notify)"))


def _daemon_main(argv: list[str]) -> int:
    """`compute-agent daemon ...` without building the operator commands' parsers (start-up time)."""
    parser = argparse.ArgumentParser(prog=f"{PROG} daemon", description="run the agent (under systemd: Type=notify)")
    _daemon_arguments(parser)
    args = parser.parse_args(argv)
    args.config = None
    return _cmd_daemon(args)


def build_parser() -> argparse.ArgumentParser:
    from agent.claims.cli import add_claims_parser
    from agent.libvirt_ops.instance_cli import add_instance_parser
    from agent.orchestrator.cli import add_orchestrator_parsers

    parser = argparse.ArgumentParser(prog=PROG, description="NUMA-aware live migration agent for KVM hypervisors.")
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
    _add_discover(sub)
    _add_fit(sub)
    _add_host_state(sub)
    add_claims_parser(sub)
    add_instance_parser(sub)
    add_orchestrator_parsers(sub)
    _add_daemon(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["daemon"]:  # the systemd unit's command line: the fast way in
        return _daemon_main(given[1:])
    from agent.cli_output import exit_code_for, print_error
    from agent.log import setup_logging

    parser = build_parser()
    args = parser.parse_args(given)
    setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except AgentError as exc:
        if isinstance(exc, InvalidInput):
            log.debug("invalid input", exc_info=True)
        print_error(PROG, f"error: {exc}")
        return exit_code_for(exc)
    except KeyboardInterrupt:
        return 130  # 128 + SIGINT, as shells report it
    except Exception as exc:
        return _unexpected(args.command, exc)


def _unexpected(command: str, exc: Exception) -> int:
    from agent.cli_output import ExitCode, print_error

    if type(exc).__name__ == "libvirtError":  # a libvirt call not yet wrapped at its edge
        log.debug("libvirt error", exc_info=True)
        print_error(PROG, f"libvirt error: {exc}")
        return ExitCode.ERROR
    # an unexpected bug: say so loudly, with the traceback in the log
    log.exception("unexpected error in %s", command)
    print_error(PROG, "unexpected error (see the log above)")
    return ExitCode.ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
