"""systemd's notify protocol (sd_notify(3)) spoken directly: one datagram per state change.

No library: `sdnotify` (last release 2017) reads only the process environment and knows neither
RELOADING's MONOTONIC_USEC nor the watchdog interval, and libsystemd's binding needs a C build; the
protocol itself is "KEY=VALUE" lines in one AF_UNIX datagram. Every Notifier reads an environment
mapping handed to it, so two daemons in one test process each talk to their own socket.

    >>> n = Notifier.from_env({"NOTIFY_SOCKET": "@sd", "WATCHDOG_USEC": "30000000"})
    >>> n.address, n.watchdog_interval_s()
    ('\\x00sd', 15.0)
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from agent.daemon.errors import NotifySocketError

log = logging.getLogger("compute_agent.daemon.notify")

#: A watchdog shorter than this cannot be served by a Python loop that also does real work.
MIN_WATCHDOG_USEC = 100_000
#: STATUS is shown by `systemctl status` on one line; longer text only wastes the datagram.
MAX_STATUS_CHARS = 400


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _socket_address(value: str) -> str:
    """NOTIFY_SOCKET as a socket address: '@name' is Linux's abstract namespace (leading NUL)."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    raise NotifySocketError(f"NOTIFY_SOCKET={value[:80]!r}: want an absolute path or @abstract-name")


def _watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    """WATCHDOG_USEC when it is meant for this process (WATCHDOG_PID unset or ours)."""
    raw = environ.get("WATCHDOG_USEC", "").strip()
    target = environ.get("WATCHDOG_PID", "").strip()
    if not raw or (target and target != str(pid)):
        return None
    if not raw.isdigit() or int(raw) < MIN_WATCHDOG_USEC:
        raise NotifySocketError(f"WATCHDOG_USEC={raw[:40]!r}: want microseconds >= {MIN_WATCHDOG_USEC}")
    return int(raw)


@dataclass(frozen=True, slots=True)
class Notifier:
    """Tells systemd what the service is doing; a no-op when NOTIFY_SOCKET was not given."""

    address: str | None = None
    watchdog_usec: int | None = None
    monotonic_usec: Callable[[], int] = field(default=_monotonic_usec, compare=False, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], *, pid: int | None = None) -> Notifier:
        raw = environ.get("NOTIFY_SOCKET", "")
        address = _socket_address(raw) if raw else None
        return cls(address=address, watchdog_usec=_watchdog_usec(environ, pid if pid is not None else os.getpid()))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1: half the timeout, as sd_watchdog_enabled(3) advises."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2 / 1e6

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *self._status_lines(status))

    def status(self, text: str) -> bool:
        return self.send(*self._status_lines(text))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *self._status_lines(status))

    def reloading(self, status: str | None = None) -> bool:
        """RELOADING=1 with the monotonic time systemd >= 253 needs to tell reloads apart; send
        ready() when the reload is done."""
        return self.send("RELOADING=1", f"MONOTONIC_USEC={self.monotonic_usec()}", *self._status_lines(status))

    def send(self, *lines: str) -> bool:
        """One datagram; False (and a warning) when systemd cannot be told: never raises."""
        if self.address is None:
            return False
        payload = "\n".join(lines).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, self.address)
        except OSError as exc:
            log.warning("cannot notify systemd at %r (%s): %s", self.address, exc, lines[0])
            return False
        return True

    @staticmethod
    def _status_lines(text: str | None) -> tuple[str, ...]:
        if text is None:
            return ()
        return ("STATUS=" + " ".join(text.split())[:MAX_STATUS_CHARS],)
