"""Read and write a queue of the broker directly, as a test sets up or checks a fault."""

from __future__ import annotations

from collections.abc import Iterable

import pika

from recfleet.shared.settings import Settings

Message = tuple[bytes, pika.BasicProperties]


def read_queue(settings: Settings, queue: str, *, take: bool = False) -> list[Message]:
    """Every message in ``queue``, in order: left in place, or taken out with ``take``."""
    conn = pika.BlockingConnection(pika.URLParameters(str(settings.amqp_url)))
    messages: list[Message] = []
    try:
        channel = conn.channel()
        while True:
            method, props, body = channel.basic_get(queue, auto_ack=take)
            if method is None:
                return messages
            messages.append((body, props))
    finally:
        conn.close()  # what was not taken goes back to the queue


def publish(settings: Settings, messages: Iterable[Message]) -> None:
    """Publish to the jobs queue, each message confirmed by the broker."""
    conn = pika.BlockingConnection(pika.URLParameters(str(settings.amqp_url)))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        for body, props in messages:
            channel.basic_publish("", settings.jobs_queue, body, props, mandatory=True)
    finally:
        conn.close()
