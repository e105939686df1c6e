"""The gateway's one long-lived RabbitMQ connection, with publisher confirms."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aio_pika.robust_connection import RobustConnection
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential
from yarl import URL

from recfleet.api.routing import ShardRouter
from recfleet.shared.errors import TransientError
from recfleet.shared.messages import CONTENT_TYPE, Job
from recfleet.shared.settings import Settings
from recfleet.shared.topology import (
    HEADER_BATCH_ID,
    HEADER_SCHEMA,
    HEADER_USERS,
    declare_async,
    topology,
)

log = logging.getLogger(__name__)


class PublishFailed(TransientError):
    """The broker did not confirm some jobs: nacked, returned, timed out or unreachable.

    ``failed`` lists the jobs without a confirm; the others were confirmed and will run.
    """

    def __init__(self, reason: str, failed: list[Job] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.failed = failed or []

    @property
    def detail(self) -> str:
        return f"not accepted: {self.reason}; retry later"


class Publisher:
    """Publishes jobs as persistent messages and waits for the broker's confirms."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._on_connect: list[Callable[[AbstractRobustConnection], Awaitable[None]]] = []
        self._connecting: asyncio.Task[None] | None = None
        # Splits users by shard; the shard queues it names are declared on first use.
        self.router = ShardRouter(settings)
        self._declared_shards = 1

    def on_connect(self, callback: Callable[[AbstractRobustConnection], Awaitable[None]]) -> None:
        """Run ``callback`` with the connection once it is first established."""
        self._on_connect.append(callback)

    async def start(self) -> None:
        """Connect and declare the topology, or keep trying in the background.

        Never raises for an unreachable broker: the gateway must start, report not ready
        and serve what it can, rather than crash-loop until the broker is back. Once
        connected, aio-pika's robust connection reconnects by itself.
        """
        try:
            await self._connect()
        except CONNECT_ERRORS as exc:
            log.warning("broker unreachable at start (%r); retrying in the background", exc)
            self._connecting = asyncio.create_task(self._keep_connecting(), name="broker-connect")

    async def _keep_connecting(self) -> None:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(CONNECT_ERRORS),
            wait=wait_exponential(multiplier=0.5, max=10),
            before_sleep=lambda state: log.warning(
                "broker still unreachable: %r", state.outcome.exception() if state.outcome else ""
            ),
        )
        async for attempt in retrying:
            with attempt:
                await self._connect()
        log.info("connected to the broker")

    async def _connect(self) -> None:
        s = self._settings
        connection = await connect_any(s.amqp_urls, timeout=10)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            await declare_async(channel, topology(s, self.router.shards))
            for callback in self._on_connect:
                await callback(connection)
        except BaseException:
            await connection.close()
            raise
        self._connection = connection
        self._channel = channel
        self._declared_shards = self.router.shards

    @property
    def connection(self) -> AbstractRobustConnection:
        """The one long-lived connection (for other channels, such as sync requests)."""
        if self._connection is None:
            raise ConnectionError("not connected to the broker")
        return self._connection

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._connection is not None:
            await self._connection.close()

    @property
    def ready(self) -> bool:
        return bool(
            self._connection is not None
            and not self._connection.is_closed
            and self._connection.connected.is_set()
            and self._channel is not None
            and not self._channel.is_closed
        )

    async def publish_jobs(self, jobs: list[Job], queues: list[str] | None = None) -> None:
        """Publish every job (to ``queues[i]``, or the jobs queue) and return once the
        broker confirmed all of them.

        Raises PublishFailed when any job was nacked, returned, timed out or could not be sent.
        """
        if self._channel is None:
            raise PublishFailed("not connected to the broker", jobs)
        queues = queues or [self._settings.jobs_queue] * len(jobs)
        results = await asyncio.gather(
            *(self._publish_one(job, q) for job, q in zip(jobs, queues, strict=True)),
            return_exceptions=True,
        )
        failed = [job for job, r in zip(jobs, results, strict=True) if isinstance(r, BaseException)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            log.warning("publish failed for %d of %d jobs: %r", len(errors), len(jobs), errors[0])
            raise PublishFailed(_describe(errors[0]), failed)

    async def ensure_shards(self, shards: int) -> None:
        """Declare the queues of every shard of a model with ``shards`` shards, once.

        Raises PublishFailed when not connected or the broker refuses the declare.
        """
        if shards == self._declared_shards:
            return
        if self._channel is None:
            raise PublishFailed("not connected to the broker")
        try:
            await declare_async(self._channel, topology(self._settings, shards))
        except (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError) as exc:
            raise PublishFailed(_describe(exc)) from exc
        self._declared_shards = shards

    async def _publish_one(self, job: Job, queue: str) -> None:
        assert self._channel is not None
        message = aio_pika.Message(
            body=job.encode(),
            content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=job.job_id,
            timestamp=int(job.created_at),
            headers={
                HEADER_BATCH_ID: job.batch_id,
                HEADER_USERS: len(job.user_ids),
                HEADER_SCHEMA: job.schema_version,
            },
        )
        await self._channel.default_exchange.publish(
            message,
            routing_key=queue,
            mandatory=True,
            timeout=self._settings.publish_timeout_s,
        )


class FailoverConnection(RobustConnection):
    """A robust connection over the nodes of a RabbitMQ cluster.

    aio-pika's robust connection reconnects to the one URL it was given. Here every
    connection attempt made while disconnected goes to the next node in the list, so
    when the node we were connected to goes away the connection moves to another,
    and channels, consumers and the topology are restored there as usual.
    """

    def __init__(self, nodes: list[str], first: int = 0) -> None:
        self._nodes = [URL(n) for n in nodes]
        self._next = first % len(self._nodes)
        super().__init__(self._nodes[self._next])

    @property
    def url(self) -> URL:
        connected = getattr(self, "connected", None)  # None while the base class initialises
        if connected is not None and not connected.is_set():
            # Disconnected: this read is for a connection attempt; take the next node.
            node = self._nodes[self._next]
            self._next = (self._next + 1) % len(self._nodes)
            return node
        return self._nodes[(self._next - 1) % len(self._nodes) if connected else self._next]

    @url.setter
    def url(self, value: URL) -> None:
        # Set by the base class (its first node, or a new password for every node).
        if hasattr(self, "connected"):
            self._nodes = [n.with_password(value.password) for n in self._nodes]


async def connect_any(nodes: list[str], timeout: float) -> AbstractRobustConnection:
    """A robust connection to the first node of ``nodes`` that answers.

    Raises the last node's connection error when none answers.
    """
    error: BaseException | None = None
    for first in range(len(nodes)):
        connection = FailoverConnection(nodes, first)
        try:
            await connection.connect(timeout=timeout)
            return connection
        except CONNECT_ERRORS as exc:
            error = exc
            await connection.close()
    assert error is not None
    raise error


# What an unreachable (or not yet started) broker raises while connecting.
CONNECT_ERRORS = (OSError, asyncio.TimeoutError, aiormq.exceptions.AMQPError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "the broker did not confirm in time"
    if isinstance(exc, aio_pika.exceptions.PublishError):
        return "the broker could not route the job (no jobs queue)"
    if isinstance(exc, aio_pika.exceptions.DeliveryError):
        # A nack: with reject-publish overflow, the jobs queue is at its max length.
        return "the jobs queue is full"
    if isinstance(exc, aiormq.exceptions.AMQPError | ConnectionError):
        return "the broker is unreachable"
    return f"publish failed: {type(exc).__name__}"
