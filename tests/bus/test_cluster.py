"""A three-node RabbitMQ cluster with quorum queues, one node killed under traffic (issue 8): every
cast the broker acknowledged (publisher confirm) is delivered exactly once, and calls go on.

The cluster is private (three nodes this module starts, joined with `join_cluster`); the agent's
`transport_url` lists all three (failover), `quorum_queues = true` makes its per-host queue a quorum
queue, replicated on every node. The node killed is the one everybody is connected to and where the
queue's leader lives (the declaring connection's node), the worst case: connections fail over, the
queue elects a new leader, and the server's replay cache turns a redelivery of a message it had
already taken into a drop, so nothing runs twice.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import pytest

from agent.bus.rpc import RpcClient
from tests.bus.rabbit_nodes import (
    Executions,
    RabbitNode,
    Traffic,
    bus_config,
    node_set,
    rabbit_available,
    serve,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

HOST = "hv-cluster"
RECOVERY_S = 10.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[RabbitNode]]:
    ok, why = rabbit_available()
    if not ok:
        pytest.fail(why)
    with node_set() as ns:
        yield ns.start_cluster(3)


def _queue_type(node: RabbitNode, queue: str) -> str:
    out = node.ctl("list_queues", "-q", "--no-table-headers", "name", "type").stdout
    types = dict(line.split("\t", 1) for line in out.strip().splitlines() if "\t" in line)
    return types.get(queue, "").strip()


def _port(thread) -> int:
    return int(thread.conn.as_uri().rsplit(":", 1)[1].split("/", 1)[0])


def _failures(what: str, traffic: Traffic, since: float) -> str:
    errors = Counter(o.error for o in list(traffic.outcomes) if o.started >= since)
    return f"{what} did not go on within {RECOVERY_S} s of the kill: outcomes since {dict(errors)}"


def test_quorum_queues_survive_a_node_killed_under_traffic(cluster, key_file, keyring):
    first, *others = cluster
    urls = ";".join(n.url for n in cluster)
    cfg = bus_config(urls, key_file, quorum_queues=True, call_timeout_s=3.0)
    executions = Executions()
    server = serve(cfg, HOST, keyring, executions)
    caster = RpcClient(cfg, keyring, sender="orchestrator@casts")
    caller = RpcClient(cfg, keyring, sender="orchestrator@calls")
    casts = Traffic(caster, HOST, "cast", cast=True, timeout=5.0)
    calls = Traffic(caller, HOST, "call", timeout=3.0)
    try:
        assert _queue_type(first, server.names.host_queue(HOST)) == "quorum"
        assert _port(server.consumer) == first.amqp_port  # the leader's node: the first URL
        casts.start()
        calls.start()
        assert wait_for(lambda: len(casts.ok_ops()) >= 50 and len(calls.ok_ops()) >= 20, 30)

        first.kill()
        t_kill = time.monotonic()
        assert wait_for(lambda: calls.first_ok_started_after(t_kill), RECOVERY_S), _failures("calls", calls, t_kill)
        assert wait_for(lambda: casts.first_ok_started_after(t_kill), RECOVERY_S), _failures("casts", casts, t_kill)
        calls_back = (calls.first_ok_started_after(t_kill) or 0.0) - t_kill
        time.sleep(2.0)  # traffic on the two remaining nodes
    finally:
        casts.stop()
        calls.stop()
    try:
        acked = casts.ok_ops()
        # every acknowledged cast is delivered: wait until each ran (the queue drains after the election)
        assert wait_for(lambda: all(executions[op] >= 1 for op in acked), 30), (
            f"acknowledged casts never delivered: {sorted(op for op in acked if executions[op] == 0)[:10]}"
        )
        time.sleep(1.0)  # a late redelivery would show up now
        assert executions.more_than_once() == {}
        assert all(executions[op] == 1 for op in calls.ok_ops())
        assert _port(server.consumer) in {n.amqp_port for n in others}
        assert _queue_type(others[0], server.names.host_queue(HOST)) == "quorum"
        print(
            f"\ncluster: {len(acked)} acknowledged casts each delivered once "
            f"({sum(1 for o in casts.outcomes if o.error)} casts refused during the election); "
            f"{len(calls.ok_ops())} calls answered, again {calls_back:.2f} s after the kill; "
            f"drops {dict(server.drops)}"
        )
    finally:
        caster.close()
        caller.close()
        server.stop()
