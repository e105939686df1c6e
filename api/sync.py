"""Request/reply over RabbitMQ for small synchronous requests (direct reply-to)."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

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

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
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

    async def request(self, job: Job) -> list[dict]:
        """Send ``job`` and return the worker's answer.

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
                routing_key=self._settings.sync_queue,
                timeout=timeout,
            )
            body = await asyncio.wait_for(future, timeout)
        except TimeoutError as exc:
            raise SyncTimeout(f"no worker answered within {timeout:g}s") from exc
        finally:
            self._waiting.pop(correlation_id, None)
        return list(orjson.loads(body))
