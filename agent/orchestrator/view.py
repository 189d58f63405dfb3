"""What `compute-agent migrate` and `migration show` print: a rich live view for people, or JSON
lines (one object per event, then a final object) for machines. The percent shown never goes
down (the tracker keeps the highest); every free text is escaped (cli_output.table, escape)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Protocol, Sequence, TextIO

import msgspec
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from agent.bus import schemas as s
from agent.cli_output import print_warning, table
from agent.orchestrator.migrate import DryRunAnswer, Plan, Started
from agent.orchestrator.model import Rejection
from agent.orchestrator.policy import placement_summary
from agent.orchestrator.tracker import Outcome
from agent.orchestrator.versions import fmt


class MigrateView(Protocol):
    def planned(self, plan: Plan) -> None: ...
    def dry_run(self, answers: Sequence[DryRunAnswer]) -> None: ...
    def refused(self, message: str, rejections: Sequence[Rejection]) -> None: ...
    def failed_to_start(self, message: str) -> None: ...
    def started(self, started: Started) -> None: ...
    def progress(self, event: s.MigrationProgressEvent) -> None: ...
    def state(self, host: str, state: s.MigrationStateResult) -> None: ...
    def detached(self, migration_id: str) -> None: ...
    def finished(self, outcome: Outcome, started: Started | None) -> None: ...


def _rate(bps: int) -> str:
    return f"{bps / (1 << 20):.1f} MiB/s"


def _eta(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.0f} s"


def policy_lines(plan: Plan) -> list[str]:
    """Each part of the resolved policy with where it came from (flavor, image, host config)."""
    lines = []
    for part in plan.instance.parts:
        value = "unset" if part.value is None else str(part.value).lower()
        lines.append(f"{part.feature.replace('_', '-')}: {value} ({part.source})")
    lines.append(f"source agent decides: {plan.instance.info.policy.decided_by}")
    if plan.instance.required_traits:
        lines.append("required of the destination: " + ", ".join(sorted(plan.instance.required_traits)))
    return lines


def progress_line(p: s.MigrationProgressEvent) -> str:
    return (
        f"{p.phase:<9} {p.percent:5.1f}%  ETA {_eta(p.eta_s)}  transfer {_rate(p.bandwidth_bps)}  "
        f"dirty {_rate(p.dirty_rate_bps)}  throttle {p.throttle_pct}%  max downtime {p.max_downtime_ms} ms  "
        f"iteration {p.iteration}"
    )


def rejections_doc(rejections: Sequence[Rejection]) -> list[dict[str, Any]]:
    return [{"host": r.host, "kind": r.kind, "reason": r.reason, "details": r.details} for r in rejections]


def outcome_doc(outcome: Outcome, started: Started | None) -> dict[str, Any]:
    done = outcome.done
    doc: dict[str, Any] = {
        "migration_id": outcome.migration_id,
        "status": outcome.status,
        "reason": outcome.reason,
        "host_now": done.host_now if done else None,
        "downtime_ms": done.downtime_ms if done else None,
        "total_s": done.total_s if done else None,
    }
    if started is not None:
        before = started.plan.instance.info.placement
        after = started.placement if started.placement is not None else before  # the legacy move copies it
        doc["pinning_before"] = msgspec.to_builtins(before)
        doc["pinning_after"] = msgspec.to_builtins(after) if outcome.status == "completed" else doc["pinning_before"]
        doc["move"] = started.move.kind.value
        doc["rejections"] = rejections_doc(started.rejections)
    return doc


class JsonView:
    """One JSON object a line: {"event": ..., ...}; the last line is {"event": "result", ...}."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout

    def _emit(self, event: str, **fields: Any) -> None:
        self.out.write(json.dumps({"event": event, **fields}, default=msgspec.to_builtins) + "\n")
        self.out.flush()

    def planned(self, plan: Plan) -> None:
        self._emit(
            "planned",
            instance=plan.instance.uuid,
            source=plan.source.name,
            cap=fmt(plan.cap),
            candidates=[h.name for h in plan.candidates.hosts],
            filtered=[{"host": r.host, "reason": r.reason} for r in plan.candidates.rejected],
            policy=policy_lines(plan),
        )

    def dry_run(self, answers: Sequence[DryRunAnswer]) -> None:
        rows = [
            {
                "host": a.host,
                "fits": a.placement is not None,
                "placement": a.placement,
                "why_not": str(a.rejection or ""),
            }
            for a in answers
        ]
        self._emit("result", dry_run=rows)

    def refused(self, message: str, rejections: Sequence[Rejection]) -> None:
        self._emit("result", status="no_destination", reason=message, rejections=rejections_doc(rejections))

    def failed_to_start(self, message: str) -> None:
        self._emit("result", status="failed", reason=message)

    def started(self, started: Started) -> None:
        self._emit(
            "started",
            migration_id=started.migration_id,
            destination=started.destination.name,
            move=started.move.kind.value,
            version=fmt(started.move.version),
            warning=started.move.warning,
            rejections=rejections_doc(started.rejections),
        )

    def progress(self, event: s.MigrationProgressEvent) -> None:
        self._emit("progress", **msgspec.to_builtins(event))

    def state(self, host: str, state: s.MigrationStateResult) -> None:
        self._emit("state", source=host, **msgspec.to_builtins(state))

    def detached(self, migration_id: str) -> None:
        self._emit("detached", migration_id=migration_id)

    def finished(self, outcome: Outcome, started: Started | None) -> None:
        self._emit("result", **outcome_doc(outcome, started))


class LiveView:
    """For people: the plan, then a live progress panel (a line per event when not a terminal)."""

    def __init__(self, con: Console) -> None:
        self.con = con
        self.live: Live | None = None
        self.header: list[str] = []
        self.t0 = time.monotonic()

    def planned(self, plan: Plan) -> None:
        self.header = [
            f"{plan.instance.info.name} ({plan.instance.uuid}) on {plan.source.name}; RPC cap {fmt(plan.cap)}",
            *("policy: " + line for line in policy_lines(plan)),
            "candidates: " + (", ".join(h.name for h in plan.candidates.hosts) or "none"),
            *(f"filtered: {r}" for r in plan.candidates.rejected),
        ]
        for line in self.header:
            self.con.print(escape(line))

    def dry_run(self, answers: Sequence[DryRunAnswer]) -> None:
        rows = [
            (
                a.host,
                "yes" if a.placement else "no",
                placement_summary(a.placement) if a.placement else str(a.rejection),
            )
            for a in answers
        ]
        self.con.print(table("dry run: nothing is held", ("host", "fits", "pinning or why not"), rows))

    def refused(self, message: str, rejections: Sequence[Rejection]) -> None:
        self.con.print(f"[red]not migrated:[/red] {escape(message)}")
        if rejections:
            rows = [(r.host, r.kind, r.reason) for r in rejections]
            self.con.print(table("each host's reason", ("host", "answer", "reason"), rows))

    def failed_to_start(self, message: str) -> None:
        self.con.print(f"[red]not started:[/red] {escape(message)}")

    def started(self, started: Started) -> None:
        for r in started.rejections:
            print_warning(self.con, "refused:", str(r))
        if started.move.warning:
            print_warning(self.con, "WARNING:", started.move.warning)
        self.con.print(
            f"migration {escape(started.migration_id)}: -> {escape(started.destination.name)} "
            f"({started.move.kind.value}, RPC {fmt(started.move.version)}); "
            f"destination pinning: {escape(placement_summary(started.placement))}"
        )
        if self.con.is_terminal:
            self.live = Live(Text("waiting for progress..."), console=self.con, auto_refresh=False)
            self.live.start()

    def progress(self, event: s.MigrationProgressEvent) -> None:
        line = progress_line(event)
        if self.live is not None:
            bar = "#" * int(event.percent / 4)
            self.live.update(Group(Text(f"[{bar:<25}]"), Text(line)), refresh=True)
        else:
            self.con.print(escape(line))

    def state(self, host: str, state: s.MigrationStateResult) -> None:
        self.con.print(
            f"migration {escape(state.migration_id)} of {escape(state.instance)} from {escape(host)}: "
            f"{state.status}, {escape(state.phase)}, {state.percent:.1f}%"
            + (f" ({escape(state.reason)})" if state.reason else "")
        )

    def detached(self, migration_id: str) -> None:
        self._stop()
        self.con.print(
            f"detached; the migration goes on: compute-agent migration show {escape(migration_id)} follows it again"
        )

    def finished(self, outcome: Outcome, started: Started | None) -> None:
        self._stop()
        doc = outcome_doc(outcome, started)
        colour = "green" if outcome.status == "completed" else "red"
        self.con.print(
            f"[{colour}]{outcome.status}[/{colour}]" + (f": {escape(outcome.reason)}" if outcome.reason else "")
        )
        rows = [("runs on", str(doc["host_now"] or "-"))]
        if started is not None:
            rows += [
                ("pinning before", placement_summary(started.plan.instance.info.placement)),
                ("pinning after", placement_summary(doc["pinning_after"])),
            ]
        rows += [("downtime", f"{doc['downtime_ms']} ms" if doc["downtime_ms"] is not None else "-")]
        rows += [("total time", f"{doc['total_s']:.1f} s" if doc["total_s"] is not None else "-")]
        self.con.print(table("result", ("", ""), rows, show_header=False))

    def _stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
