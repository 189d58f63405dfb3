"""Test support for logging: a real systemd-journald (the one running, or one started for the
session), reading its entries back, and a clean `compute_agent` logger for each test.

Without systemd as PID 1, systemd-journald still runs on its own: it binds /run/systemd/journal/socket
(native), .../stdout and .../dev-log itself and writes the system journal that journalctl reads.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.log import JOURNAL_SOCKET, journald_listening

JOURNALD = Path("/lib/systemd/systemd-journald")


def _start(log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [str(JOURNALD)], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 10
    while not journald_listening(JOURNAL_SOCKET):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"systemd-journald did not come up: {log_path.read_text(errors='replace')[-500:]}")
        time.sleep(0.05)
    return proc


def journald_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Yield the socket of a listening journald; stop it afterwards only if we started it."""
    if journald_listening(JOURNAL_SOCKET):
        yield JOURNAL_SOCKET
        return
    if not os.access(JOURNALD, os.X_OK) or os.geteuid() != 0:
        pytest.skip(f"no journald runs and {JOURNALD} cannot be started here (needs the systemd package and root)")
    proc = _start(tmp_path_factory.mktemp("journald") / "journald.log")
    try:
        yield JOURNAL_SOCKET
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def journal_entries(match: str, *, expect: int, timeout: float = 10.0) -> list[dict[str, str]]:
    """`journalctl MATCH -o json`, polled until `expect` entries arrived (journald writes asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(
            ["journalctl", "--no-pager", "-o", "json", match], capture_output=True, text=True, check=False
        ).stdout
        entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if len(entries) >= expect or time.monotonic() > deadline:
            return entries
        time.sleep(0.1)


def compute_agent_logger_restored() -> Iterator[None]:
    """setup_logging (in a test, or an earlier CLI test) changes the process-wide `compute_agent`
    logger: give each test the default one (propagating, so caplog sees it), then close what the
    test set up and put back what was there."""
    logger = logging.getLogger("compute_agent")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    logger.handlers, logger.level, logger.propagate = [], logging.NOTSET, True
    yield
    for handler in logger.handlers:
        handler.close()
    logger.handlers, logger.level, logger.propagate = saved
