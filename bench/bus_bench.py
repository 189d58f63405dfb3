"""Bus benchmark: our signed RPC against oslo.messaging's, in one run, on the same local RabbitMQ.

    python bench/bus_bench.py [--calls N] [--url URL] [--json]

Three servers, each in a process of its own (as an agent would be), called from this process:
  (a) oslo.messaging RPC echo (rabbit driver, threading executor): the library OpenStack agents use;
  (b) our signed call to a method that echoes its body (the same ~1 KiB payload as (a): the bus's
      whole cost: envelope, HMAC signature both ways, checks, confirms, reply queue);
  (c) our full `claim`: a real RpcServer whose `claim` handler runs the project's fitter and the
      durable ledger commit (agent.claims.ledger: WAL, synchronous=FULL, one fsync'ed transaction),
      followed by `release_claim` (not timed in the claim figures; it is in the cycle figures).
For each: sequential p50/p99 and calls/s, and calls/s with 8 concurrent callers. Ratios are to
oslo's echo p50 in the same run. oslo.messaging is a bench-only extra: `pip install -e '.[bench]'`.

Targets (issue 8): empty p50 <= 0.5 x oslo echo p50; claim p50 <= 1.0 x oslo echo p50; >= 400
claims/s sequential (claims/s counts the claim calls' own time, as bench/claims_bench.py does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import amqp  # type: ignore[import-untyped]  # noqa: E402  # py-amqp ships no type hints
import msgspec  # noqa: E402
from broker_objects import delete_bus_objects  # noqa: E402
from bus_features_bench import Features  # noqa: E402
from bus_features_bench import serve as serve_echo  # noqa: E402
from kombu import Connection  # noqa: E402

from agent.bus.keys import Keyring  # noqa: E402
from agent.bus.rpc import RpcClient, RpcServer  # noqa: E402
from agent.bus.schemas import ClaimBody, ReleaseClaimBody  # noqa: E402
from agent.config import BusConfig  # noqa: E402

PAYLOAD = "x" * 1024  # ~1 KiB, the payload
CONCURRENCY = 8
HOST = "bench-host"
URL = "amqp://guest:guest@127.0.0.1:5672//"
START_TIMEOUT_S = 60.0


class EchoBody(msgspec.Struct, frozen=True):
    payload: str


# --- servers (each in a spawned process) ----------------------------------------------------------


def _oslo_url(url: str) -> str:
    return "rabbit://" + url.split("://", 1)[1].rstrip("/") + "/"


def _quiet_oslo() -> None:
    warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")  # raised on import by oslo.service
    logging.getLogger("oslo.messaging").setLevel(logging.ERROR)
    logging.getLogger("amqp").setLevel(logging.ERROR)


def serve_oslo(url: str, topic: str, ready: Any, stop: Any) -> None:
    _quiet_oslo()
    import oslo_messaging as om  # type: ignore[import-untyped]  # bench-only extra, untyped
    from oslo_config import cfg

    cfg.CONF(args=[], project="bus-bench")  # oslo registers its own options on the global CONF
    transport = om.get_rpc_transport(cfg.CONF, url=_oslo_url(url))

    class Echo:
        def echo(self, ctxt: Any, payload: str) -> str:
            return payload

    target = om.Target(topic=topic, server="bench")
    server = om.get_rpc_server(transport, target, [Echo()], executor="threading")
    server.start()
    ready.set()
    stop.wait()
    server.stop()
    server.wait()
    transport.cleanup()


class HandlerTimes:
    """Where the claim handler's time goes, measured inside the server: parsing the request, the
    ledger's claim (fit + one fsync'ed transaction: wall time and the thread's CPU time; the
    difference is waiting, mostly for the disk), building the result."""

    def __init__(self) -> None:
        self.parse: list[float] = []
        self.ledger_wall: list[float] = []
        self.ledger_cpu: list[float] = []
        self.result: list[float] = []

    def summary(self, first: int, count: int) -> dict[str, float]:
        """Medians over claims first .. first+count-1: the first sequential round (the concurrent
        rounds would add the ledger's lock waits to every figure)."""

        def p50(xs: list[float]) -> float:
            part = xs[first : first + count]
            return round(statistics.median(part) * 1000, 3) if part else 0.0

        return {
            "claim_parse_p50_ms": p50(self.parse),
            "claim_ledger_p50_ms": p50(self.ledger_wall),
            "claim_ledger_cpu_p50_ms": p50(self.ledger_cpu),
            "claim_result_p50_ms": p50(self.result),
        }


def _ledger_handlers(
    ledger: Any, host_state: Any, times: HandlerTimes
) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    def claim(body: ClaimBody) -> dict[str, Any]:
        t0 = time.perf_counter()
        request = body.request()
        t1, c1 = time.perf_counter(), time.thread_time()
        held = ledger.claim(body.migration_id, request, body.source_host, body.ttl_s or 60.0, host_state)
        t2, c2 = time.perf_counter(), time.thread_time()
        result = {"placement": held.placement.to_json(), "expires_at": held.expires_at}
        times.parse.append(t1 - t0)
        times.ledger_wall.append(t2 - t1)
        times.ledger_cpu.append(c2 - c1)
        times.result.append(time.perf_counter() - t2)
        return result

    def release_claim(body: ReleaseClaimBody) -> dict[str, Any]:
        return ledger.release(body.migration_id, body.reason).to_json()

    return claim, release_claim


def serve_ours(cfg: BusConfig, key_file: str, ledger_dir: str, ready: Any, stop: Any) -> None:
    from claims_bench import build_topology, make_request

    from agent.claims.hoststate import host_state_fn
    from agent.claims.ledger import Ledger
    from agent.config import ComputeConfig

    keyring = Keyring.from_file(key_file)
    server = RpcServer(cfg, HOST, keyring)
    server.register("echo", lambda body: {"payload": body.payload}, since="1.0", body_type=EchoBody)
    with Ledger.open(Path(ledger_dir)) as ledger:
        host_state = host_state_fn(build_topology(), list, ComputeConfig())
        for i in range(8):  # the same background as claims_bench: a partly full host
            ledger.claim(f"background-{i}", make_request(), "src", 3600, host_state)
        times = HandlerTimes()
        claim, release = _ledger_handlers(ledger, host_state, times)
        server.register("claim", claim, since="1.1", body_type=ClaimBody)
        server.register("release_claim", release, since="1.1", body_type=ReleaseClaimBody)
        server.start()
        ready.set()
        stop.wait()
        server.stop()
    (Path(ledger_dir) / "handler-times.json").write_text(json.dumps(vars(times)))


class Served:
    """A server process started with `target(*args, ready, stop)`, stopped on exit."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        ctx = mp.get_context("spawn")
        self.ready, self.stop = ctx.Event(), ctx.Event()
        self.proc = ctx.Process(target=target, args=(*args, self.ready, self.stop), daemon=True)

    def __enter__(self) -> Served:
        self.proc.start()
        if not self.ready.wait(START_TIMEOUT_S):
            self.proc.kill()
            raise RuntimeError(f"{self.proc.name} did not start in {START_TIMEOUT_S} s")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.proc.join(20)
        if self.proc.is_alive():
            self.proc.kill()


# --- measuring ------------------------------------------------------------------------------------

#: a case: call(i) makes one call and returns the seconds to count (None: its own wall time)
Call = Callable[[int], "float | None"]


def _stats(lat: list[float], wall: float) -> dict[str, float]:
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return {
        "p50_ms": round(statistics.median(lat) * 1000, 3),
        "p99_ms": round(q[98] * 1000, 3),
        "per_s": round(len(lat) / sum(lat), 1),  # counted time only (a claim without its release)
        "wall_per_s": round(len(lat) / wall, 1),  # everything the case does (claim + release)
    }


def _run_sequential(call: Call, n: int, lat: list[float]) -> float:
    t_all = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        counted = call(i)
        lat.append(counted if counted is not None else time.perf_counter() - t0)
    return time.perf_counter() - t_all


def _run_concurrent(call: Call, n: int, workers: int = CONCURRENCY) -> float:
    """Seconds for `workers` threads to make `n` calls between them."""
    counter = iter(range(n))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            call(i)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(worker) for _ in range(workers)]:
            f.result()
    return time.perf_counter() - t0


def measure(cases: dict[str, Call], n: int, warmup: int, rounds: int) -> dict[str, dict[str, float]]:
    """Every case `n` times sequentially and `n` times with 8 callers, interleaved in `rounds` rounds,
    so that the machine's changing load (2 shared cores) weighs on every case alike."""
    for call in cases.values():
        for i in range(warmup):
            call(i)
    per_round = max(1, n // rounds)
    lat: dict[str, list[float]] = {name: [] for name in cases}
    wall = dict.fromkeys(cases, 0.0)
    conc = dict.fromkeys(cases, 0.0)
    for _ in range(rounds):
        for name, call in cases.items():
            wall[name] += _run_sequential(call, per_round, lat[name])
        for name, call in cases.items():
            conc[name] += _run_concurrent(call, per_round)
    out = {}
    for name in cases:
        out[name] = _stats(lat[name], wall[name])
        out[name]["concurrent_per_s"] = round(per_round * rounds / conc[name], 1)
    return out


# --- the three cases ------------------------------------------------------------------------------

#: the claims_bench request as flavor extra specs: 4 dedicated vCPUs on 2 MiB pages
EXTRA_SPECS = {"hw:cpu_policy": "dedicated", "hw:cpu_thread_policy": "prefer", "hw:mem_page_size": "2048"}


def oslo_echo(url: str, topic: str) -> tuple[Call, Callable[[], None]]:
    """(the oslo echo call, its cleanup)."""
    import oslo_messaging as om  # type: ignore[import-untyped]  # untyped
    from oslo_config import cfg

    cfg.CONF(args=[], project="bus-bench")
    transport = om.get_rpc_transport(cfg.CONF, url=_oslo_url(url))
    client = om.get_rpc_client(transport, om.Target(topic=topic, server="bench"))

    def call(i: int) -> None:
        if client.call({}, "echo", payload=PAYLOAD) != PAYLOAD:
            raise AssertionError("oslo echo answered something else")
        return None

    return call, transport.cleanup


def floor_echo(url: str, queue: str) -> tuple[Call, Callable[[], None]]:
    """(the bare py-amqp round trip, its cleanup): what any RPC over this broker costs at least."""
    conn = Connection(url)
    channel = conn.channel()
    reply_queue = channel.queue_declare("", exclusive=True).queue
    got: list[bytes] = []
    channel.basic_consume(reply_queue, callback=lambda msg: got.append(msg.body), no_ack=True)
    lock = threading.Lock()  # one connection: the 8 concurrent callers take turns

    def call(i: int) -> None:
        with lock:
            got.clear()
            channel.basic_publish(amqp.Message(PAYLOAD.encode(), reply_to=reply_queue), exchange="", routing_key=queue)
            while not got:
                conn.drain_events(timeout=5)
        return None

    return call, conn.release


def our_calls(client: RpcClient) -> tuple[Call, Call]:
    """(the signed echo call, the claim + release_claim cycle that counts the claim only)."""

    def echo(i: int) -> None:
        if client.call(HOST, "echo", {"payload": PAYLOAD})["payload"] != PAYLOAD:
            raise AssertionError("our echo answered something else")
        return None

    def claim_cycle(i: int) -> float:
        doc = {"uuid": str(uuid.uuid4()), "vcpus": 4, "memory_mb": 4096, "extra_specs": EXTRA_SPECS}
        mig = f"bench-{uuid.uuid4().hex[:12]}"
        body = {"migration_id": mig, "instance": doc, "source_host": "src", "ttl_s": 60}
        t0 = time.perf_counter()
        client.call(HOST, "claim", body)
        took = time.perf_counter() - t0
        client.call(HOST, "release_claim", {"migration_id": mig, "reason": "bench cycle"})
        return took

    return echo, claim_cycle


def run(url: str, n: int, warmup: int, rounds: int) -> dict[str, Any]:
    _quiet_oslo()
    load_before = os.getloadavg()[0]
    topic = f"bus-bench-{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bus-bench-", dir="/var/tmp")))
        key_file = tmp / "bus.keys"
        key_file.write_text(f"bench {os.urandom(32).hex()}\n")
        cfg = replace(BusConfig(), transport_url=url, exchange_prefix=f"bus-bench-{uuid.uuid4().hex[:8]}")
        # after every server and client stopped: our per-host queue and exchanges, oslo's two topic queues
        stack.callback(delete_bus_objects, url, cfg.exchange_prefix, [HOST], [topic, f"{topic}.bench"])
        stack.enter_context(Served(serve_oslo, url, topic))
        handler_times = HandlerTimes()
        # registered before the server: runs after it stopped and wrote its times
        stack.callback(
            lambda: vars(handler_times).update(json.loads((tmp / "ledger" / "handler-times.json").read_text()))
        )
        stack.enter_context(Served(serve_ours, cfg, str(key_file), str(tmp / "ledger")))
        floor_queue = f"bus-bench-floor-{uuid.uuid4().hex[:8]}"
        stack.enter_context(Served(serve_echo, url, floor_queue, "", Features()))  # no broker feature
        floor, floor_cleanup = floor_echo(url, floor_queue)
        stack.callback(floor_cleanup)
        oslo, oslo_cleanup = oslo_echo(url, topic)
        stack.callback(oslo_cleanup)
        client = stack.enter_context(RpcClient(cfg, Keyring.from_file(key_file), sender="bench"))
        echo, claim = our_calls(client)
        res = measure({"floor": floor, "oslo": oslo, "empty": echo, "claim": claim}, n, warmup, rounds)
    load = {"load_avg_1m_before": round(load_before, 2), "load_avg_1m_after": round(os.getloadavg()[0], 2)}
    return {**summary(res, n), **handler_times.summary(warmup, max(1, n // rounds)), **load}


def summary(res: dict[str, dict[str, float]], n: int) -> dict[str, Any]:
    floor, oslo, empty, claim = res["floor"], res["oslo"], res["empty"], res["claim"]
    return {
        "calls": n,
        "payload_bytes": len(PAYLOAD),
        "floor_amqp_p50_ms": floor["p50_ms"],
        "floor_amqp_p99_ms": floor["p99_ms"],
        "oslo_echo_p50_ms": oslo["p50_ms"],
        "oslo_echo_p99_ms": oslo["p99_ms"],
        "oslo_echo_per_s": oslo["per_s"],
        "oslo_echo_concurrent_per_s": oslo["concurrent_per_s"],
        "empty_call_p50_ms": empty["p50_ms"],
        "empty_call_p99_ms": empty["p99_ms"],
        "empty_calls_per_s": empty["per_s"],
        "empty_calls_concurrent_per_s": empty["concurrent_per_s"],
        "claim_p50_ms": claim["p50_ms"],
        "claim_p99_ms": claim["p99_ms"],
        "claims_per_s": claim["per_s"],
        "claim_release_cycles_per_s": claim["wall_per_s"],
        "claim_release_cycles_concurrent_per_s": claim["concurrent_per_s"],
        "ratio_empty_to_oslo": round(empty["p50_ms"] / oslo["p50_ms"], 3),
        "ratio_claim_to_oslo": round(claim["p50_ms"] / oslo["p50_ms"], 3),
    }


def report(res: dict[str, Any]) -> str:
    targets = [
        ("empty p50 <= 0.5 x oslo", res["ratio_empty_to_oslo"] <= 0.5),
        ("claim p50 <= 1.0 x oslo", res["ratio_claim_to_oslo"] <= 1.0),
        (">= 400 claims/s", res["claims_per_s"] >= 400),
    ]
    lines = [
        f"{res['calls']} calls each, payload {res['payload_bytes']} B, {CONCURRENCY} concurrent callers; "
        f"load average (1 min) {res['load_avg_1m_before']} before, {res['load_avg_1m_after']} after",
        f"floor (bare py-amqp echo, no signature, no confirms): p50 {res['floor_amqp_p50_ms']} ms, "
        f"p99 {res['floor_amqp_p99_ms']} ms",
        f"oslo.messaging echo: p50 {res['oslo_echo_p50_ms']} ms, p99 {res['oslo_echo_p99_ms']} ms, "
        f"{res['oslo_echo_per_s']}/s sequential, {res['oslo_echo_concurrent_per_s']}/s concurrent",
        f"our signed call:     p50 {res['empty_call_p50_ms']} ms, p99 {res['empty_call_p99_ms']} ms, "
        f"{res['empty_calls_per_s']}/s sequential, {res['empty_calls_concurrent_per_s']}/s concurrent "
        f"(ratio to oslo {res['ratio_empty_to_oslo']})",
        f"our full claim:      p50 {res['claim_p50_ms']} ms, p99 {res['claim_p99_ms']} ms, "
        f"{res['claims_per_s']} claims/s sequential (ratio to oslo {res['ratio_claim_to_oslo']}); "
        f"claim+release cycles {res['claim_release_cycles_per_s']}/s sequential, "
        f"{res['claim_release_cycles_concurrent_per_s']}/s concurrent",
        f"inside the claim handler (p50): request parsing {res['claim_parse_p50_ms']} ms, ledger.claim "
        f"{res['claim_ledger_p50_ms']} ms (of which CPU {res['claim_ledger_cpu_p50_ms']} ms; the rest is waiting, "
        f"mostly for the fsync), result {res['claim_result_p50_ms']} ms",
        "targets: " + ", ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in targets),
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1000, help="calls per measurement (default 1000)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--url", default=URL, help=f"the broker (default {URL})")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = run(args.url, args.calls, args.warmup, args.rounds)
    print(json.dumps(res) if args.json else report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
