"""What the broker features of our wire contract cost by themselves, before any code of ours runs.

    python bench/bus_features_bench.py [--calls N] [--rounds R] [--url URL] [--json]

A bare py-amqp echo (one thread on each side, no envelope, no signature, ~1.3 KiB body: the size of
our signed 1 KiB call) measured as it is (the `floor` of bench/bus_bench.py), then with one feature
of shared/formats.md and issue 8 at a time, then with all of them:
  - ttl: the AMQP `expiration` property on the call and the reply (the call's remaining time);
  - topic: the call routed through a topic exchange (`<prefix>.rpc`, key `agent.<host>`);
  - manual ack: the server consumes with acks and a prefetch bound, and acks each call on receipt;
  - confirms: both publishing channels in confirm mode, each publish waiting for its confirm
    (replies `mandatory`).
Sequential p50 per case, the cases interleaved over rounds. bench/bus_bench.py's ratios are to
oslo's echo; this one says how much of our call's time the contract itself asks for.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import amqp  # type: ignore[import-untyped]  # py-amqp ships no type hints
from kombu import Connection

URL = "amqp://guest:guest@127.0.0.1:5672//"
BODY = b"x" * 1300
ROUTING_KEY = "agent.bench"
TTL_MS = "30000"
WARMUP = 200


@dataclass(frozen=True)
class Features:
    ttl: bool = False
    topic: bool = False
    manual_ack: bool = False
    confirms: bool = False


CASES = {
    "bare": Features(),
    "ttl": Features(ttl=True),
    "topic": Features(topic=True),
    "manual ack": Features(manual_ack=True),
    "confirms": Features(confirms=True),
    "all": Features(ttl=True, topic=True, manual_ack=True, confirms=True),
}
_CONFIRMS = [amqp.spec.Basic.Ack, amqp.spec.Basic.Nack]


def _publish(channel: Any, features: Features, body: bytes, exchange: str, key: str, **props: Any) -> None:
    if features.ttl:
        props["expiration"] = TTL_MS
    channel.basic_publish(amqp.Message(body, **props), exchange=exchange, routing_key=key, mandatory=features.confirms)
    if features.confirms:
        channel.wait(_CONFIRMS)


def serve(url: str, queue: str, exchange: str, features: Features, ready: Any, stop: Any) -> None:
    """The echo server (also bus_bench.py's floor, with no features): one thread, in its own process."""
    conn = Connection(url)
    channel = conn.channel()
    if features.confirms:
        channel.confirm_select()
    channel.queue_declare(queue, auto_delete=True)
    if features.topic:
        channel.exchange_declare(exchange, "topic", auto_delete=True)
        channel.queue_bind(queue, exchange, routing_key=ROUTING_KEY)
    if features.manual_ack:
        channel.basic_qos(0, 64, False)

    def echo(msg: Any) -> None:
        if features.manual_ack:
            channel.basic_ack(msg.delivery_tag)
        reply_to = msg.properties["reply_to"]
        _publish(channel, features, msg.body, "", reply_to, correlation_id=msg.properties.get("correlation_id"))

    channel.basic_consume(queue, callback=echo, no_ack=not features.manual_ack)
    ready.set()
    while not stop.is_set():
        try:
            conn.drain_events(timeout=0.2)
        except socket.timeout:
            pass
    conn.release()


def measure(url: str, features: Features, calls: int) -> float:
    """The p50 round trip in ms of `calls` sequential echoes (after a warm-up)."""
    queue = f"bus-features-{uuid.uuid4().hex[:8]}"
    exchange = f"{queue}.rpc"
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=serve, args=(url, queue, exchange, features, ready, stop), daemon=True)
    proc.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the echo server did not start")
        conn = Connection(url)
        channel = conn.channel()
        if features.confirms:
            channel.confirm_select()
        reply_queue = channel.queue_declare("", exclusive=True).queue
        got: list[Any] = []
        channel.basic_consume(reply_queue, callback=got.append, no_ack=True)
        target = (exchange, ROUTING_KEY) if features.topic else ("", queue)
        lat = []
        for _ in range(WARMUP + calls):
            got.clear()
            t0 = time.perf_counter()
            _publish(channel, features, BODY, *target, reply_to=reply_queue)
            while not got:
                conn.drain_events(timeout=5)
            lat.append(time.perf_counter() - t0)
            time.sleep(0.0003)  # as a caller between calls: the other side goes idle
        conn.release()
        return statistics.median(lat[WARMUP:]) * 1000
    finally:
        stop.set()
        proc.join(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--url", default=URL, help=f"the broker (default {URL})")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    runs: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name, features in CASES.items():
            runs[name].append(measure(args.url, features, args.calls))
    p50 = {name: round(statistics.median(ms), 3) for name, ms in runs.items()}
    if args.json:
        print(json.dumps({"p50_ms": p50, "runs_ms": runs}))
    else:
        for name, ms in p50.items():
            print(f"{name:>10}: p50 {ms:.3f} ms  ({ms / p50['bare']:.2f} x bare)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
