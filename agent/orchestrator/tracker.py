"""Following migrations: `migration.<id>.progress|done` events, one subscription for them all.

`MigrationTracker.handlers()` gives the EventSubscriber handlers (subscribe before the first
`live_migrate`, so no event is missed); `wait(id, ...)` returns the done event, calling
`on_progress` with every new progress event whose percent is shown never going down. When no event
comes for `poll_s`, `migration_status` on the source is asked (an event lost, or the migration
ended before we subscribed: `show` re-attaches that way).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec

from agent.bus import schemas as s
from agent.bus.errors import BusError, RemoteError

ProgressHook = Callable[[s.MigrationProgressEvent], None]
StatusPoll = Callable[[], s.MigrationStateResult]
ENDED = frozenset({"completed", "failed", "aborted"})


@dataclass
class _Followed:
    progress: s.MigrationProgressEvent | None = None
    done: s.MigrationDoneEvent | None = None
    percent: float = 0.0  # the highest seen: what is shown never goes down
    changed: threading.Condition = field(default_factory=threading.Condition)
    events: int = 0


@dataclass(frozen=True, slots=True)
class Outcome:
    migration_id: str
    status: str  # completed, failed, aborted; "running" when the wait timed out
    done: s.MigrationDoneEvent | None  # None when only migration_status told the end
    reason: str | None


class MigrationTracker:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._followed: dict[str, _Followed] = {}

    def handlers(self) -> list[tuple[str, Callable[[str, Any], None], type[msgspec.Struct]]]:
        """(pattern, handler, body type) for EventSubscriber.subscribe."""
        return [
            ("migration.*.progress", self._on_progress, s.MigrationProgressEvent),
            ("migration.*.done", self._on_done, s.MigrationDoneEvent),
        ]

    def _get(self, migration_id: str) -> _Followed:
        with self._lock:
            return self._followed.setdefault(migration_id, _Followed())

    def forget(self, migration_id: str) -> None:
        with self._lock:
            self._followed.pop(migration_id, None)

    def _on_progress(self, _key: str, event: s.MigrationProgressEvent) -> None:
        f = self._get(event.migration_id)
        with f.changed:
            f.percent = max(f.percent, event.percent)
            f.progress = msgspec.structs.replace(event, percent=f.percent) if event.percent < f.percent else event
            f.events += 1
            f.changed.notify_all()

    def _on_done(self, _key: str, event: s.MigrationDoneEvent) -> None:
        f = self._get(event.migration_id)
        with f.changed:
            f.done = event
            f.events += 1
            f.changed.notify_all()

    def wait(
        self,
        migration_id: str,
        *,
        timeout: float,
        on_progress: ProgressHook | None = None,
        poll: StatusPoll | None = None,
        poll_s: float = 5.0,
    ) -> Outcome:
        """Until the migration ends or `timeout` passes (the migration goes on either way)."""
        f = self._get(migration_id)
        deadline, shown, last = self.clock() + timeout, 0, None
        while True:
            with f.changed:
                if f.done is None and f.events == shown:
                    f.changed.wait(max(min(poll_s, deadline - self.clock()), 0.0))
                progress, done, events = f.progress, f.done, f.events
            if progress is not None and progress is not last and on_progress is not None:
                on_progress(progress)  # each progress event once, however many other events came
            last = progress
            if done is not None:
                return Outcome(migration_id, done.status, done, done.reason)
            if events == shown and poll is not None:
                ended = _polled(poll)
                if ended is not None:
                    return Outcome(migration_id, ended.status, None, ended.reason)
            shown = events
            if self.clock() >= deadline:
                return Outcome(migration_id, "running", None, "still running (not waited for any longer)")


def _polled(poll: StatusPoll) -> s.MigrationStateResult | None:
    """The state when it has ended; None while running or when the agent cannot say now."""
    try:
        state = poll()
    except (RemoteError, BusError):
        return None
    return state if state.status in ENDED else None
