"""Removing what tests declared on the machine's shared RabbitMQ (127.0.0.1:5672).

Every test gives the bus an exchange prefix of its own, so its durable exchanges and per-host
queues outlive it unless deleted. `track()` (called by `tests.bus.conftest.ensure_broker`, which every
broker fixture calls) records every exchange and queue this process declares on the shared broker:
it wraps py-amqp's `Channel.exchange_declare` / `queue_declare`, so kombu entities, raw channels and
the bus's own threads are all seen. Then:

- `delete_prefix(prefix)` (a fixture's teardown) deletes the three exchanges `<prefix>.rpc`,
  `.broadcast`, `.events` and every queue this process declared under `<prefix>.`;
- at exit, `sweep()` deletes what is left under every prefix this process used, including the queues
  of daemons the tests ran as child processes (found with one `rabbitmqctl list_queues`, when present).

Only names under a test prefix (`test-…<hex>`, `TEST_PREFIX_RE`) are ever deleted, so a test that
touched another prefix cannot remove anything it did not make.

`python -m tests.broker_cleanup --stale` deletes leftovers of earlier runs: every exchange and queue
under a test prefix whose queues have no consumer (a test that is running has consumers).
"""

from __future__ import annotations

import argparse
import atexit
import functools
import logging
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterable
from typing import Any

import amqp.channel
from kombu import Connection

log = logging.getLogger(__name__)

SHARED_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
SHARED_BROKER_HOSTS = frozenset({"127.0.0.1:5672", "localhost:5672", "127.0.0.1", "localhost"})
# the prefixes our tests make: test-<12 hex> (bus, daemon), test-src-<10 hex>, test-e2e-<8 hex>
TEST_PREFIX_RE = re.compile(r"^(test-(?:src-|e2e-)?[0-9a-f]{8,16})\.")
EXCHANGE_ROLES = ("rpc", "broadcast", "events")
RABBITMQCTL_TIMEOUT_S = 30.0  # one listing takes ~0.6 s; a broker in trouble must not hang the run

_lock = threading.Lock()
_queues: set[str] = set()
_prefixes: set[str] = set()


def test_prefix(name: str) -> str | None:
    """The test prefix of an exchange or queue name (None: not a name our tests make)."""
    match = TEST_PREFIX_RE.match(name)
    return match.group(1) if match else None


def _on_shared_broker(channel: Any) -> bool:
    host = getattr(getattr(channel, "connection", None), "host", "")
    return host in SHARED_BROKER_HOSTS


def _record(name: Any, channel: Any, is_queue: bool) -> None:
    prefix = test_prefix(name) if isinstance(name, str) else None
    if prefix is None or not _on_shared_broker(channel):
        return
    with _lock:
        _prefixes.add(prefix)
        if is_queue:
            _queues.add(name)


def _wrap(declare: Callable[..., Any], arg: str, is_queue: bool) -> Callable[..., Any]:
    @functools.wraps(declare)
    def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        _record(kwargs.get(arg, args[0] if args else None), self, is_queue)
        return declare(self, *args, **kwargs)

    recording.__broker_cleanup__ = True  # type: ignore[attr-defined]
    return recording


def track() -> None:
    """Record every declaration on the shared broker from now on (idempotent); sweep at exit."""
    with _lock:
        channel = amqp.channel.Channel
        if getattr(channel.queue_declare, "__broker_cleanup__", False):
            return
        channel.queue_declare = _wrap(channel.queue_declare, "queue", True)  # type: ignore[method-assign]
        channel.exchange_declare = _wrap(channel.exchange_declare, "exchange", False)  # type: ignore[method-assign]
    atexit.register(sweep)


def delete_names(exchanges: Iterable[str], queues: Iterable[str]) -> int:
    """Delete these exchanges and queues from the shared broker (missing ones are fine); how many
    deletions the broker accepted. A queue another connection holds exclusively is skipped: it goes
    when that connection closes."""
    done = 0
    with Connection(SHARED_BROKER_URL, connect_timeout=5) as conn:
        channel = conn.channel()
        for kind, name in [("queue", q) for q in queues] + [("exchange", x) for x in exchanges]:
            if test_prefix(name) is None:
                continue  # never anything our tests did not make
            try:
                channel.queue_delete(name) if kind == "queue" else channel.exchange_delete(name)
                done += 1
            except conn.channel_errors as exc:  # e.g. RESOURCE_LOCKED: the channel is closed, open another
                log.debug("broker cleanup: %s %s: %s", kind, name, exc)
                channel = conn.channel()
    return done


def delete_prefix(prefix: str, extra_queues: Iterable[str] = ()) -> None:
    """Delete `<prefix>.rpc|broadcast|events` and every queue this process declared under `<prefix>.`
    (plus `extra_queues`, e.g. the per-host queues of a daemon run as a child process)."""
    with _lock:
        mine = {q for q in _queues if q.startswith(prefix + ".")}
        _queues.difference_update(mine)
        _prefixes.discard(prefix)
    try:
        delete_names([f"{prefix}.{role}" for role in EXCHANGE_ROLES], sorted(mine | set(extra_queues)))
    except OSError as exc:  # the broker went away: the exit sweep or --stale gets them later
        log.warning("broker cleanup of %s failed: %s", prefix, exc)


def listed_names(kind: str) -> list[tuple[str, int]]:
    """(name, consumers) of every queue (kind "queues"; consumers -1 for "exchanges") on the shared
    broker, from rabbitmqctl; [] when it is not installed or fails."""
    tool = shutil.which("rabbitmqctl")
    if tool is None:
        return []
    columns = ["name", "consumers"] if kind == "queues" else ["name"]
    try:
        out = subprocess.run(
            [tool, "-q", f"list_{kind}", *columns], capture_output=True, text=True, timeout=RABBITMQCTL_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = [line.split("\t") for line in out.stdout.splitlines() if line.strip()]
    return [(row[0], int(row[1]) if len(row) > 1 and row[1].isdigit() else -1) for row in rows]


def sweep() -> None:
    """At exit: everything left under the prefixes this process used."""
    with _lock:
        prefixes, queues = set(_prefixes), set(_queues)
        _prefixes.clear()
        _queues.clear()
    if not prefixes:
        return
    listed = {name for name, _ in listed_names("queues") if test_prefix(name) in prefixes}
    exchanges = [f"{p}.{role}" for p in sorted(prefixes) for role in EXCHANGE_ROLES]
    try:
        delete_names(exchanges, sorted(queues | listed))
    except OSError as exc:
        log.warning("broker cleanup at exit failed: %s", exc)


def stale_names() -> tuple[list[str], list[str]]:
    """(exchanges, queues) under test prefixes none of whose queues has a consumer."""
    queues = [(n, c) for n, c in listed_names("queues") if test_prefix(n)]
    busy = {test_prefix(n) for n, c in queues if c != 0}
    exchanges = [n for n, _ in listed_names("exchanges") if test_prefix(n) not in busy | {None}]
    return exchanges, [n for n, _ in queues if test_prefix(n) not in busy]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stale", action="store_true", help="delete the leftovers of earlier test runs")
    args = parser.parse_args()
    if not args.stale:
        parser.error("say --stale to delete leftovers")
    exchanges, queues = stale_names()
    done = delete_names(exchanges, queues)
    print(f"deleted {done} of {len(exchanges)} exchanges and {len(queues)} queues under test prefixes")


if __name__ == "__main__":
    main()
