"""Request/reply over RabbitMQ for small synchronous requests (direct reply-to)."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from recfleet.api.routing import ShardRouter
from recfleet.shared.errors import TransientError
from recfleet.shared.messages import CONTENT_TYPE, Job
from recfleet.shared.settings import Settings

REPLY_TO = "amq.rabbitmq.reply-to"


class SyncTimeout(TransientError):
    """No worker answered in time."""

    status_code = 504


class BrokerUnavailable(TransientError):
    """The gateway is not connected to the broker."""


class SyncRequester:
    """Publishes a job to the sync queue and waits for the worker's reply.

    Replies come back on RabbitMQ's direct reply-to pseudo-queue, consumed on the
    same channel that publishes, so no reply queue is ever declared.
    """

    def __init__(self, settings: Settings, router: ShardRouter | None = None) -> None:
        self._settings = settings
        # Which shard's sync queue each user goes to (the publisher's router).
        self._router = router or ShardRouter(settings)
        self._channel: AbstractChannel | None = None
        self._waiting: dict[str, asyncio.Future[bytes]] = {}

    async def start(self, connection: AbstractRobustConnection) -> None:
        self._channel = await connection.channel()
        queue = await self._channel.get_queue(REPLY_TO, ensure=False)
        await queue.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._waiting.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message.body)

    async def request_routed(self, job: Job) -> list[dict]:
        """Send each shard its part of ``job`` at once and return the answers in order.

        Raises SyncTimeout when a shard does not answer in time, and BrokerUnavailable
        when the broker cannot be reached.
        """
        router = self._router
        parts = router.split(job.user_ids)
        if len(parts) == 1:
            return await self.request(job, router.sync_queue(parts[0]))
        answers = await asyncio.gather(
            *(
                self.request(
                    job.model_copy(
                        update={"job_id": f"{job.job_id}-{p.shard}", "user_ids": p.user_ids}
                    ),
                    router.sync_queue(p),
                )
                for p in parts
            )
        )
        by_user = {row["user_id"]: row for rows in answers for row in rows}
        return [by_user[u] for u in job.user_ids]

    async def request(self, job: Job, queue: str | None = None) -> list[dict]:
        """Send ``job`` (to ``queue``, or the sync queue) and return the worker's answer.

        Raises SyncTimeout when no answer arrives within ``sync_timeout_s``, and
        BrokerUnavailable when the broker cannot be reached.
        """
        if self._channel is None or self._channel.is_closed:
            raise BrokerUnavailable("not connected to the broker; retry later")
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = future
        timeout = self._settings.sync_timeout_s
        try:
            await self._channel.default_exchange.publish(
                aio_pika.Message(
                    body=job.encode(),
                    content_type=CONTENT_TYPE,
                    correlation_id=correlation_id,
                    reply_to=REPLY_TO,
                    message_id=job.job_id,
                    expiration=timeout,
                ),
                routing_key=queue or self._settings.sync_queue,
                timeout=timeout,
            )
            body = await asyncio.wait_for(future, timeout)
        except TimeoutError as exc:
            raise SyncTimeout(f"no worker answered within {timeout:g}s") from exc
        finally:
            self._waiting.pop(correlation_id, None)
        return list(orjson.loads(body))
