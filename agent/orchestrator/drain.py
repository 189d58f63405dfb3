"""Drain a host (Nova's `host-evacuate-live`, done right): live-migrate every instance off it, each
with its own candidates and alternates, never forcing one that cannot go anywhere.

Limits: at most `parallel` migrations out of the host at once (default 1, as the agent's
`[DEFAULT] max_concurrent_live_migrations`; the source queues beyond its own limit anyway); a
destination at its inbound limit answers Busy and the next alternate is asked; when every
candidate was Busy the instance waits the largest `retry_after` and tries again (a few times).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

from agent.bus.errors import BusError, RemoteError
from agent.errors import AgentError, InvalidInput
from agent.orchestrator.errors import NoDestination, NumaMigrationRefused
from agent.orchestrator.migrate import Orchestrator, Started
from agent.orchestrator.model import Rejection
from agent.orchestrator.tracker import MigrationTracker

log = logging.getLogger("compute_agent.orchestrator")

ALL_BUSY_RETRIES = 5  # rounds over the candidates when every one answered Busy
Result = Literal["migrated", "no-destination", "refused", "failed", "invalid", "running"]


@dataclass(frozen=True, slots=True)
class DrainItem:
    instance: str
    result: Result
    destination: str | None = None
    migration_id: str | None = None
    reason: str | None = None
    rejections: tuple[Rejection, ...] = ()


def _all_busy(exc: NoDestination) -> float | None:
    """The largest retry_after when every asked host said Busy; None otherwise."""
    asked = [r for r in exc.rejections if r.kind != "filtered"]
    if not asked or any(r.kind != "Busy" for r in asked):
        return None
    return max(r.retry_after or 1.0 for r in asked)


def _result(status: str) -> Result:
    if status == "completed":
        return "migrated"
    return "running" if status == "running" else "failed"


class Drainer:
    def __init__(
        self,
        orchestrator: Orchestrator,
        tracker: MigrationTracker,
        *,
        wait_timeout_s: float = 3600.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.orch, self.tracker, self.wait_timeout_s, self.sleep = orchestrator, tracker, wait_timeout_s, sleep

    def drain(self, host: str, instances: Sequence[str], *, parallel: int = 1) -> list[DrainItem]:
        with ThreadPoolExecutor(max(parallel, 1), thread_name_prefix=f"drain-{host}") as pool:
            return list(pool.map(lambda name: self.move_one(host, name), instances))

    def move_one(self, host: str, instance: str) -> DrainItem:
        try:
            started = self.start(host, instance)
        except NoDestination as exc:
            return DrainItem(instance, "no-destination", reason=exc.message, rejections=exc.rejections)
        except NumaMigrationRefused as exc:
            return DrainItem(instance, "refused", reason=exc.message)
        except InvalidInput as exc:
            return DrainItem(instance, "invalid", reason=exc.message)
        except (AgentError, RemoteError, BusError) as exc:
            return DrainItem(instance, "failed", reason=str(exc))
        return self._follow(started)

    def start(self, host: str, instance: str) -> Started:
        """Plan and start, waiting and trying again while every destination answers Busy."""
        for attempt in range(ALL_BUSY_RETRIES + 1):
            plan = self.orch.plan(instance, host)
            try:
                return self.orch.start(plan)
            except NoDestination as exc:
                wait = _all_busy(exc)
                if wait is None or attempt == ALL_BUSY_RETRIES:
                    raise
                log.info("drain %s: every destination for %s is busy; again in %.1f s", host, instance, wait)
                self.sleep(wait)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _follow(self, started: Started) -> DrainItem:
        src, mid = started.plan.source.name, started.migration_id
        outcome = self.tracker.wait(
            mid, timeout=self.wait_timeout_s, poll=lambda: self.orch.api.migration_status(src, mid)
        )
        self.tracker.forget(mid)
        return DrainItem(
            started.plan.instance.info.name,
            _result(outcome.status),
            started.destination.name,
            mid,
            outcome.reason,
            started.rejections,
        )
