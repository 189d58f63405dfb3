"""What a benchmark run declared on the (shared) broker and would outlive it: the three durable
exchanges of its own exchange prefix and the durable per-host queues under it. The private
queues (replies, broadcast, events) are exclusive and auto-delete: they go with their connections."""

from __future__ import annotations

from collections.abc import Iterable

from kombu import Connection

from agent.bus.transport import Names


def delete_bus_objects(url: str, prefix: str, hosts: Iterable[str], extra_queues: Iterable[str] = ()) -> None:
    """Delete `prefix`'s exchanges, the per-host queues of `hosts` and `extra_queues` (missing ones
    are fine: queue_delete and exchange_delete succeed on names that do not exist)."""
    names = Names(prefix)
    with Connection(url) as conn:
        channel = conn.channel()
        for queue in [*(names.host_queue(h) for h in hosts), *extra_queues]:
            channel.queue_delete(queue)
        for exchange in names.exchanges():
            channel.exchange_delete(exchange.name)
