"""Broker topology as one declarative spec that every side applies.

The gateway, the workers, the CLI's clean-up and the tests all build the same
``Topology`` from the settings and apply it with a few lines: RabbitMQ refuses a
declare whose arguments differ from the queue's, so there must be one source.

A model split into N shards (see ``shared.shards``) gets one jobs queue and one sync
queue per shard; an unsharded model (N = 1) keeps the plain names. The dead-letter
exchange, the dead-letter queue and the dead-events queue are shared by all shards.

Nothing here imports a client library: ``declare_blocking`` takes a pika channel,
``declare_async`` an aio-pika channel, both by duck typing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from recfleet.shared.settings import Settings

# Headers on every job message, visible in the management UI.
HEADER_BATCH_ID = "x-recfleet-batch-id"
HEADER_USERS = "x-recfleet-users"
HEADER_SCHEMA = "x-recfleet-schema"
# Set by the worker when it dead-letters a message itself, to say why.
HEADER_DEAD_REASON = "x-recfleet-dead-reason"


@dataclass(frozen=True)
class QueueSpec:
    """A durable queue, and the routing key that binds it to the dead-letter exchange."""

    name: str
    arguments: dict[str, Any]
    dead_letter_binding: str | None = None


@dataclass(frozen=True)
class Topology:
    """Every exchange and queue recfleet declares under one settings object."""

    dead_letter_exchange: str
    queues: tuple[QueueSpec, ...] = field(default_factory=tuple)

    @property
    def queue_names(self) -> tuple[str, ...]:
        return tuple(q.name for q in self.queues)


def shard_suffix(shard: int, shards: int) -> str:
    """The suffix of shard ``shard``'s queue names: none for an unsharded model."""
    return "" if shards <= 1 else f".shard-{shard}"


def jobs_queue(settings: Settings, shard: int = 0, shards: int = 1) -> str:
    """Name of the jobs queue that shard ``shard`` of ``shards`` consumes."""
    return settings.jobs_queue + shard_suffix(shard, shards)


def sync_queue(settings: Settings, shard: int = 0, shards: int = 1) -> str:
    """Name of the sync request queue that shard ``shard`` of ``shards`` consumes."""
    return settings.sync_queue + shard_suffix(shard, shards)


def _quorum(settings: Settings) -> dict[str, Any]:
    """A quorum queue, with ``quorum_replicas`` members when set (else the broker's
    default: every node of the cluster, up to its own limit)."""
    arguments: dict[str, Any] = {"x-queue-type": "quorum"}
    if settings.quorum_replicas is not None:
        arguments["x-quorum-initial-group-size"] = settings.quorum_replicas
    return arguments


def jobs_queue_arguments(settings: Settings) -> dict[str, Any]:
    """Arguments of a durable quorum jobs queue.

    A message is dead-lettered (at least once, which needs reject-publish overflow)
    after ``delivery_limit`` deliveries, so a job that keeps crashing workers ends
    in the dead-letter queue instead of looping forever.
    """
    return {
        **_quorum(settings),
        "x-delivery-limit": settings.delivery_limit,
        "x-dead-letter-exchange": settings.dead_letter_exchange,
        "x-dead-letter-routing-key": settings.dead_letter_queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-max-length": settings.queue_max_length,
    }


def sync_queue_arguments(settings: Settings) -> dict[str, Any]:
    """A queue whose messages expire with the request: nobody waits for them after.

    Classic on one node. On a cluster (``quorum_replicas`` set) a quorum queue: a
    classic queue lives on one node, and when that node stops every declare of it
    fails until the node is back, which would keep the gateway and the workers from
    reconnecting to the nodes still up.
    """
    ttl = {"x-message-ttl": int(settings.sync_timeout_s * 1000)}
    return ttl if settings.quorum_replicas is None else {**_quorum(settings), **ttl}


def topology(settings: Settings, shards: int = 1, only_shard: int | None = None) -> Topology:
    """The topology of a model with ``shards`` shards.

    ``only_shard`` limits the per-shard queues to that one shard (what one worker
    declares); the gateway and the clean-up take every shard.
    """
    picked = range(shards) if only_shard is None else (only_shard,)
    dead = (
        QueueSpec(settings.dead_letter_queue, _quorum(settings), settings.dead_letter_queue),
        QueueSpec(settings.dead_events_queue, _quorum(settings), settings.dead_letter_queue),
    )
    per_shard = tuple(
        spec
        for k in picked
        for spec in (
            QueueSpec(jobs_queue(settings, k, shards), jobs_queue_arguments(settings)),
            QueueSpec(sync_queue(settings, k, shards), sync_queue_arguments(settings)),
        )
    )
    return Topology(settings.dead_letter_exchange, dead + per_shard)


def queue_names(settings: Settings, shards: int = 1) -> tuple[str, ...]:
    """Every queue recfleet declares under these settings."""
    return topology(settings, shards).queue_names


class BlockingChannel(Protocol):
    def exchange_declare(self, exchange: str, exchange_type: str, *, durable: bool) -> Any: ...
    def queue_declare(self, queue: str, *, durable: bool, arguments: dict[str, Any]) -> Any: ...
    def queue_bind(self, queue: str, exchange: str, *, routing_key: str) -> Any: ...
    def queue_delete(self, queue: str) -> Any: ...
    def exchange_delete(self, exchange: str) -> Any: ...


def declare_blocking(channel: BlockingChannel, topo: Topology) -> None:
    """Declare ``topo`` on a pika channel (idempotent)."""
    channel.exchange_declare(topo.dead_letter_exchange, "direct", durable=True)
    for q in topo.queues:
        channel.queue_declare(q.name, durable=True, arguments=q.arguments)
        if q.dead_letter_binding is not None:
            channel.queue_bind(q.name, topo.dead_letter_exchange, routing_key=q.dead_letter_binding)


def delete_blocking(channel: BlockingChannel, topo: Topology) -> None:
    """Delete every queue of ``topo`` and its exchange on a pika channel."""
    for name in topo.queue_names:
        channel.queue_delete(name)
    channel.exchange_delete(topo.dead_letter_exchange)


async def declare_async(channel: Any, topo: Topology) -> None:
    """Declare ``topo`` on an aio-pika channel (idempotent)."""
    exchange = await channel.declare_exchange(topo.dead_letter_exchange, "direct", durable=True)
    for q in topo.queues:
        queue = await channel.declare_queue(q.name, durable=True, arguments=q.arguments)
        if q.dead_letter_binding is not None:
            await queue.bind(exchange, routing_key=q.dead_letter_binding)
