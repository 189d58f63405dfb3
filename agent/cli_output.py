"""One place for what the `compute-agent` commands print and the codes they exit with.

Both command lines (`agent/cli.py` and `agent/claims/cli.py`) render through this module:

* `ExitCode`: 0 ok, 1 the agent could not do it (libvirt unreachable, ledger unusable, a bug),
  2 invalid input, 3 does not fit, 4 not found. `exit_code_for` maps a typed error to its code.
* `print_json`: the machine-readable output (``--json``), two-space indented, one trailing newline.
* `print_error`: one line on stderr, ``<prog>: <message>``.
* `console` and `table`: rich rendering for people. Every title and cell of a `table` is escaped,
  and so is the text of `print_warning`: reasons, host names and instance ids are free text (from
  operators, libvirt messages like "[libvirt] ...", remote callers) and never rich markup.
* `shown`: control characters of free text as visible escapes (``\x1b`` for ESC), so no input can
  move the cursor, recolour or clear the screen, or reorder a line (bidi overrides). `table`,
  `print_warning` and `print_error` apply it to everything they print; ``--json`` output is JSON,
  whose encoder escapes them already.
"""

from __future__ import annotations

import enum
import json
import sys
from typing import Any, Iterable, Sequence, TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent.claims.errors import UnknownClaim
from agent.errors import AgentError, DiscoveryError, InvalidInput

# C0 and C1 controls (ESC opens terminal sequences, CSI is 0x9b), DEL, the line separators and the
# bidi marks and overrides that reorder what a line shows
_UNSAFE = (
    *range(0x20),
    0x7F,
    *range(0x80, 0xA0),
    0x200E,
    0x200F,
    0x2028,
    0x2029,
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
)
_ESCAPES = {c: (f"\\x{c:02x}" if c <= 0xFF else f"\\u{c:04x}") for c in _UNSAFE}
_ESCAPES_MULTILINE = {c: e for c, e in _ESCAPES.items() if c != 0x0A}

CLAIMS_TABLE_WIDTH = 200  # wide enough for a claim's reason on one line; tests read the tables off a file


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1  # the agent could not do it, or an unexpected bug (logged with its traceback)
    INVALID_INPUT = 2
    NO_FIT = 3
    NOT_FOUND = 4


def exit_code_for(exc: AgentError) -> ExitCode:
    """The exit code of a typed error: not found, invalid input (a broken sysfs tree is the
    input of `discover`), or the agent could not do it."""
    if isinstance(exc, UnknownClaim):
        return ExitCode.NOT_FOUND
    if isinstance(exc, (InvalidInput, DiscoveryError)):
        return ExitCode.INVALID_INPUT
    return ExitCode.ERROR


def print_json(obj: Any, out: TextIO | None = None) -> None:
    (out or sys.stdout).write(json.dumps(obj, indent=2) + "\n")


def shown(text: object, *, multiline: bool = False) -> str:
    """`text` with every control character as a visible escape: "a\\x1b[2Jb" for "a<ESC>[2Jb".
    `multiline` keeps newlines (a message of several lines)."""
    return str(text).translate(_ESCAPES_MULTILINE if multiline else _ESCAPES)


def print_error(prog: str, message: object, err: TextIO | None = None) -> None:
    (err or sys.stderr).write(f"{shown(prog)}: {shown(message, multiline=True)}\n")


def console(out: TextIO | None = None, *, width: int | None = None) -> Console:
    """A rich console on `out` (default: stdout, as wide as the terminal)."""
    return Console(file=out, width=width)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]], *, show_header: bool = True) -> Table:
    """A rich table whose title and cells are shown as they are: every one is escaped."""
    out = Table(title=escape(shown(title)), show_header=show_header)
    for col in columns:
        out.add_column(escape(shown(col)))
    for row in rows:
        out.add_row(*(escape(shown(cell)) for cell in row))
    return out


def print_warning(to: Console, label: str, text: str) -> None:
    """``label`` in yellow, then `text` (escaped)."""
    to.print(f"[yellow]{escape(shown(label))}[/yellow] {escape(shown(text))}")


__all__ = [
    "CLAIMS_TABLE_WIDTH",
    "ExitCode",
    "console",
    "exit_code_for",
    "print_error",
    "print_json",
    "print_warning",
    "shown",
    "table",
]
