"""Logging for operators: journald when run by systemd, readable lines on a terminal.

Under systemd, stderr is a journald stream (JOURNAL_STREAM is set). A `<N>` syslog prefix on each
line gives journald the record's priority (SyslogLevelPrefix=yes is the default), so
`journalctl -p warning -u compute-agent` works without a journald client library.
"""

from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        # one journal entry per line: keep continuation lines at the same priority
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines() or [""])


def under_journald(stream=None) -> bool:
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


def setup_logging(level: str | int = "INFO", *, stream=None) -> None:
    """Configure the root `compute_agent` logger once (idempotent)."""
    stream = stream if stream is not None else sys.stderr
    logger = logging.getLogger("compute_agent")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream)
    if under_journald(stream):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level if isinstance(level, int) else level.upper())
    logger.propagate = False
