"""``recfleet dlq``: look at, replay or drop dead-lettered jobs, by batch id or job id."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import click
import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from recfleet.shared.settings import Settings, get_settings
from recfleet.shared.topology import HEADER_BATCH_ID, HEADER_DEAD_REASON, HEADER_USERS


@dataclass
class DeadJob:
    delivery_tag: int
    job_id: str | None
    batch_id: str | None
    users: int | None
    reason: str
    properties: pika.BasicProperties
    body: bytes

    def matches(self, batch_id: str | None, job_id: str | None) -> bool:
        if batch_id is None and job_id is None:
            return True
        return (batch_id is not None and self.batch_id == batch_id) or (
            job_id is not None and self.job_id == job_id
        )


def _reason(props: pika.BasicProperties) -> str:
    headers = props.headers or {}
    if HEADER_DEAD_REASON in headers:
        return str(headers[HEADER_DEAD_REASON])
    deaths = headers.get("x-death") or []
    if deaths:
        death = deaths[0]
        reason = death.get("reason", b"")
        reason = reason.decode() if isinstance(reason, bytes) else str(reason)
        if reason == "delivery_limit":
            return "delivery limit reached (the job kept failing or crashing workers)"
        if reason == "rejected":
            return "rejected by a worker (undecodable or invalid job)"
        return reason
    return "unknown"


@contextmanager
def _channel(settings: Settings) -> Iterator[BlockingChannel]:
    try:
        conn = pika.BlockingConnection([pika.URLParameters(u) for u in settings.amqp_urls])
    except pika.exceptions.AMQPError as exc:
        raise click.ClickException(
            f"cannot reach RabbitMQ at {settings.amqp_url}: {exc!r}"
        ) from exc
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        yield channel
    finally:
        if conn.is_open:
            conn.close()


def _take_all(channel: BlockingChannel, queue: str, limit: int) -> list[DeadJob]:
    """Fetch up to ``limit`` messages without acking them (they return if not settled)."""
    jobs: list[DeadJob] = []
    while len(jobs) < limit:
        try:
            method, props, body = channel.basic_get(queue, auto_ack=False)
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise click.ClickException(f"queue {queue}: {exc.reply_text}") from exc
        if method is None:
            break
        headers = props.headers or {}
        users = headers.get(HEADER_USERS)
        jobs.append(
            DeadJob(
                delivery_tag=method.delivery_tag,
                job_id=props.message_id,
                batch_id=headers.get(HEADER_BATCH_ID),
                users=users if isinstance(users, int) else None,
                reason=_reason(props),
                properties=props,
                body=body,
            )
        )
    return jobs


selection = [
    click.option("--batch", "batch_id", default=None, help="only jobs of this batch"),
    click.option("--job", "job_id", default=None, help="only this job"),
    click.option(
        "--limit",
        type=click.IntRange(1),
        default=100_000,
        show_default=True,
        help="look at most this many dead-lettered messages",
    ),
]


def _with_selection(fn: Any) -> Any:
    for option in reversed(selection):
        fn = option(fn)
    return fn


@click.group()
def dlq() -> None:
    """Dead-lettered jobs: list them, replay them onto the jobs queue, or purge them."""


@dlq.command("list")
@_with_selection
def dlq_list(batch_id: str | None, job_id: str | None, limit: int) -> None:
    """List dead-lettered jobs with the reason each was dead-lettered."""
    s = get_settings()
    with _channel(s) as channel:
        jobs = _take_all(channel, s.dead_letter_queue, limit)
        shown = [j for j in jobs if j.matches(batch_id, job_id)]
        for j in shown:
            click.echo(
                f"{j.job_id or '-':40} batch {j.batch_id or '-':34} users "
                f"{j.users if j.users is not None else '-':>5}  {j.reason}"
            )
        for j in jobs:
            channel.basic_nack(j.delivery_tag, requeue=True)
    click.echo(f"{len(shown)} of {len(jobs)} dead-lettered jobs shown", err=True)


@dlq.command("replay")
@_with_selection
def dlq_replay(batch_id: str | None, job_id: str | None, limit: int) -> None:
    """Publish the selected jobs to the jobs queue they died in again (confirmed: a shard's
    queue for a sharded model), then drop them here."""
    s = get_settings()
    replayed = 0
    targets: set[str] = set()
    with _channel(s) as channel:
        jobs = _take_all(channel, s.dead_letter_queue, limit)
        for j in jobs:
            if not j.matches(batch_id, job_id):
                channel.basic_nack(j.delivery_tag, requeue=True)
                continue
            props = j.properties
            headers = {
                k: v
                for k, v in (props.headers or {}).items()
                if not k.startswith("x-death") and k != HEADER_DEAD_REASON
            }
            target = _origin_queue(props, s)
            targets.add(target)
            channel.basic_publish(
                "",
                target,
                j.body,
                pika.BasicProperties(
                    content_type=props.content_type,
                    delivery_mode=2,
                    message_id=props.message_id,
                    headers=headers,
                ),
                mandatory=True,
            )
            channel.basic_ack(j.delivery_tag)
            replayed += 1
    click.echo(f"replayed {replayed} jobs onto {', '.join(sorted(targets)) or s.jobs_queue}")


def _origin_queue(props: pika.BasicProperties, s: Settings) -> str:
    """The jobs queue a dead letter came from (its first x-death entry), when that is
    one of recfleet's jobs queues (the plain one or a shard's); else the jobs queue."""
    deaths = (props.headers or {}).get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        queue = deaths[0].get("queue")
        queue = queue.decode() if isinstance(queue, bytes) else queue
        if isinstance(queue, str) and (
            queue == s.jobs_queue or queue.startswith(f"{s.jobs_queue}.shard-")
        ):
            return queue
    return s.jobs_queue


@dlq.command("purge")
@_with_selection
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
def dlq_purge(batch_id: str | None, job_id: str | None, limit: int, yes: bool) -> None:
    """Drop the selected dead-lettered jobs for good."""
    if not yes:
        what = f"batch {batch_id}" if batch_id else f"job {job_id}" if job_id else "every job"
        click.confirm(f"drop {what} from the dead-letter queue?", abort=True)
    s = get_settings()
    dropped = 0
    with _channel(s) as channel:
        for j in _take_all(channel, s.dead_letter_queue, limit):
            if j.matches(batch_id, job_id):
                channel.basic_ack(j.delivery_tag)
                dropped += 1
            else:
                channel.basic_nack(j.delivery_tag, requeue=True)
    click.echo(f"dropped {dropped} jobs")
