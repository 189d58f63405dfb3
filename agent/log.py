"""Logging for operators, through structlog: journald's native protocol under systemd, readable lines
elsewhere.

Every record goes through one structlog processor chain, whether it comes from a structlog logger
(`get_logger`) or from a plain `logging.getLogger("compute_agent....")` caller (structlog's
ProcessorFormatter). Fields bound with `get_logger(...).bind(...)`, passed as `extra=` or bound for a
stretch of code with `log_context(...)` become journal fields, so one migration's whole story, from
both agents, is `journalctl MIGRATION_ID=<id>`:

    log = get_logger("compute_agent.migration", migration_id=mid, instance_uuid=uuid)
    log.info("copying memory", phase="precopy", percent=42)
    logging.getLogger("compute_agent.claims").warning("claim expired", extra={"claim_id": cid})

Where the records go (`setup_logging`):
- journald, natively (MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, LOGGER, CODE_FILE/LINE/FUNC and every
  bound field upper-cased: MIGRATION_ID, INSTANCE_UUID, CLAIM_ID, SOURCE_HOST, DEST_HOST, PHASE,
  PERCENT, CODE, ...) when our stderr is the journal stream systemd gave us (JOURNAL_STREAM) or the
  caller says so, and journald's socket answers;
- `<N>`-prefixed lines on the journal stream when that socket does not answer (journald still takes
  the priority from the prefix, SyslogLevelPrefix=yes being the default);
- readable lines (`time LEVEL logger: message key=value ...`) anywhere else.

The journal protocol is logging-journald's JournaldTransport (pure Python, maintained; the native
datagram, the length-prefixed form for multi-line values and the memfd hand-over for big records),
so no C build of libsystemd's binding is needed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, cast

import structlog
from logging_journald import JournaldTransport  # type: ignore[import-untyped]  # ships no py.typed marker
from structlog.processors import CallsiteParameter
from structlog.typing import EventDict, Processor, WrappedLogger

#: The fields the migration code binds; journald gets them upper-cased (MIGRATION_ID=...).
MIGRATION_FIELDS = ("migration_id", "instance_uuid", "claim_id", "source_host", "dest_host", "phase", "percent", "code")
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
SYSLOG_IDENTIFIER = "compute-agent"

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
_LEVEL_PRIORITY = {logging.getLevelName(level).lower(): prio for level, prio in _PRIORITY.items()}
#: Keys that the line format shows in its own columns or that are not the record's fields.
_NOT_FIELDS = frozenset({"event", "level", "logger", "exception", "pathname", "lineno", "func_name", "positional_args"})
#: A journal field name: upper-case ASCII letters, digits and '_', not starting with '_' or a digit.
_JOURNAL_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
#: Set by journal_fields itself: a bound field of the same name must not duplicate them.
_RESERVED_JOURNAL_NAMES = frozenset(
    {"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "LOGGER", "CODE_FILE", "CODE_LINE", "CODE_FUNC"}
)
_LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_JOURNAL_STREAM_FORMAT = "%(name)s: %(message)s"
_CALLSITE = structlog.processors.CallsiteParameterAdder(
    {CallsiteParameter.PATHNAME, CallsiteParameter.LINENO, CallsiteParameter.FUNC_NAME}
)
# Run for every record, in the caller's thread: bound contextvars, the level, the logger, the callsite.
_COMMON: tuple[Processor, ...] = (
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    _CALLSITE,
)


# --- loggers and fields ------------------------------------------------------------------------------


def get_logger(name: str = "compute_agent", **fields: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger writing through the stdlib logger `name`, with `fields` bound.

    Built per call (no structlog.configure(): nothing global for a second agent in the process to share).
    """
    logger = structlog.wrap_logger(
        logging.getLogger(name),
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.PositionalArgumentsFormatter(),
            *_COMMON,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
    )
    return cast(structlog.stdlib.BoundLogger, logger.bind(**fields))


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Bind `fields` to every record logged in this context (this task, or thread), plain stdlib
    callers included: `with log_context(migration_id=mid): run(...)`."""
    with structlog.contextvars.bound_contextvars(**fields):
        yield


def record_fields(event: EventDict) -> dict[str, Any]:
    """The record's own fields (bound, extra, contextvars), migration fields first."""
    rest = sorted(k for k in event if k not in _NOT_FIELDS and k not in MIGRATION_FIELDS)
    return {k: event[k] for k in (*MIGRATION_FIELDS, *rest) if k in event and event[k] is not None}


# --- rendering ---------------------------------------------------------------------------------------


def _render_line(_: WrappedLogger, __: str, event: EventDict) -> str:
    """'message key=value ...' then the traceback; the line format adds time, level and logger."""
    text = str(event.get("event", ""))
    pairs = " ".join(f"{key}={value}" for key, value in record_fields(event).items())
    text = f"{text} {pairs}" if pairs else text
    return f"{text}\n{event['exception']}" if event.get("exception") else text


def journal_fields(event: EventDict, identifier: str) -> list[tuple[str, Any]]:
    """The journal entry of one record: its message, priority, origin, then its fields upper-cased."""
    message = str(event.get("event", ""))
    if event.get("exception"):
        message = f"{message}\n{event['exception']}"
    entry: list[tuple[str, Any]] = [
        ("MESSAGE", message),
        ("PRIORITY", _LEVEL_PRIORITY.get(str(event.get("level", "info")), 6)),
        ("SYSLOG_IDENTIFIER", identifier),
        ("LOGGER", event.get("logger")),
        ("CODE_FILE", event.get("pathname")),
        ("CODE_LINE", event.get("lineno")),
        ("CODE_FUNC", event.get("func_name")),
    ]
    for key, value in record_fields(event).items():
        name = re.sub(r"[^A-Z0-9_]", "_", key.upper())
        if _JOURNAL_NAME.fullmatch(name) and name not in _RESERVED_JOURNAL_NAMES:
            entry.append((name, value if isinstance(value, int | float | str) else str(value)))
    return entry


def _formatter(
    fmt: str, final: Processor, kind: type[structlog.stdlib.ProcessorFormatter] = structlog.stdlib.ProcessorFormatter
) -> structlog.stdlib.ProcessorFormatter:
    """One chain for every handler: records from plain stdlib callers first get what structlog's
    loggers add at call time (extra=, contextvars, level, logger, callsite)."""
    return kind(
        fmt=fmt,
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *_COMMON],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            final,
        ],
    )


class JournalStreamFormatter(structlog.stdlib.ProcessorFormatter):
    """Lines for the journal stream: a `<N>` syslog prefix on each, so journald keeps the priority."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        # one journal entry per line: keep continuation lines at the same priority
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines() or [""])


class JournaldHandler(logging.Handler):
    """Sends each record to journald natively; a record journald does not take goes to `fallback`."""

    def __init__(self, socket_path: Path, fallback: logging.Handler, identifier: str = SYSLOG_IDENTIFIER) -> None:
        super().__init__()
        # unconnected: each record is addressed to the path, so a restarted journald is found again
        self.transport = JournaldTransport(socket_path=socket_path, connected=False)
        self.identifier, self.fallback = identifier, fallback
        self.setFormatter(_formatter("%(message)s", structlog.processors.JSONRenderer(default=str)))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = json.loads(self.format(record))
            self.transport.send(journal_fields(event, self.identifier))
        except OSError:
            self.fallback.handle(record)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.transport.socket.close()
        self.fallback.close()
        super().close()


# --- where records go --------------------------------------------------------------------------------


def under_journald(stream: IO[str] | None = None) -> bool:
    """True when `stream` (default stderr) is the journald stream systemd gave us: JOURNAL_STREAM
    names its device:inode, so a child whose stderr was redirected elsewhere gets plain lines."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat((stream if stream is not None else sys.stderr).fileno())
    except (AttributeError, OSError, ValueError):  # not a real file (tests, StringIO)
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def journald_listening(socket_path: Path = JOURNAL_SOCKET) -> bool:
    """True when a journald answers on `socket_path` (a socket file left by a stopped one does not)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.connect(str(socket_path))
        except OSError:
            return False
    return True


def _stream_handler(stream: IO[str]) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    if under_journald(stream):
        handler.setFormatter(_formatter(_JOURNAL_STREAM_FORMAT, _render_line, JournalStreamFormatter))
    else:
        handler.setFormatter(_formatter(_LINE_FORMAT, _render_line))
    return handler


def _wants_journal(stream: IO[str] | None, journal: bool | None, socket_path: Path) -> bool:
    """Native journald when told so, or (auto) when our own stderr is the journal stream; either way
    only if journald answers. An explicit `stream` means "write there" unless `journal=True`."""
    if journal is False or (journal is None and (stream is not None or not under_journald())):
        return False
    return journald_listening(socket_path)


def setup_logging(
    level: str | int = "INFO",
    *,
    stream: IO[str] | None = None,
    journal: bool | None = None,
    journal_socket: Path = JOURNAL_SOCKET,
    identifier: str = SYSLOG_IDENTIFIER,
) -> logging.Handler:
    """Configure the `compute_agent` logger (idempotent: replaces what an earlier call set up) and
    return its handler. `journal`: None = decide (see the module doc), True = journald natively if it
    answers, False = never natively."""
    logger = logging.getLogger("compute_agent")
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    handler = _stream_handler(stream if stream is not None else sys.stderr)
    if _wants_journal(stream, journal, journal_socket):
        handler = JournaldHandler(journal_socket, fallback=handler, identifier=identifier)
    logger.addHandler(handler)
    set_log_level(level)
    logger.propagate = False
    return handler


def set_log_level(level: str | int) -> None:
    """Change the level at run time (SIGHUP re-reads [DEFAULT] log_level)."""
    logging.getLogger("compute_agent").setLevel(level if isinstance(level, int) else level.upper())
