"""The pika consumer: thin I/O around ``JobHandler``.

The connection's I/O (and so its heartbeats) stays on the main thread; jobs run on
one compute thread and their acks come back through ``add_callback_threadsafe``. A job's
write is sent when it is ranked and confirmed (then acked) after the next job is ranked,
or as soon as no job waits, so Redis stores one job while the next one ranks.
Retries live here and only here:

- undecodable or invalid job -> rejected without requeue, so the broker dead-letters it;
- any other exception while handling one job (a bug, a value the encoder refuses) ->
  dead-lettered the same way, so no delivery is ever left unacked;
- Redis unavailable (TransientError) -> retried in place with backoff, holding the
  message, so a short outage does not burn the queue's delivery limit;
- a job that crashes the process -> redelivered by the broker until its delivery
  limit dead-letters it.
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import orjson
import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties
from tenacity import Retrying, retry_if_exception_type, stop_when_event_set, wait_exponential

from recfleet.shared.errors import TransientError, UndecodableMessage
from recfleet.shared.messages import ID_PATTERN, decode_job
from recfleet.shared.settings import Settings
from recfleet.shared.topology import (
    HEADER_BATCH_ID,
    HEADER_USERS,
    declare_blocking,
    jobs_queue,
    sync_queue,
    topology,
)
from recfleet.worker import metrics
from recfleet.worker.handler import JobHandler, PendingJob
from recfleet.worker.lanes import BATCH, URGENT, PriorityLane

log = logging.getLogger(__name__)
T = TypeVar("T")
QUEUE_SAMPLE_EVERY_S = 5.0
# Longer than the longest reconnect back-off (30 s) plus a connection attempt.
LIVENESS_WINDOW_S = 90.0
_VALID_ID = re.compile(ID_PATTERN)
# Orders returned jobs by delivery count, then latest arrival first (see _job_priority);
# every such priority stays below the lane's shutdown marker.
_SUSPECT_SPAN = 1 << 20


class Consumer:
    """Consumes jobs until ``stop()``; reconnects with backoff when the broker goes away."""

    def __init__(self, settings: Settings, handler: JobHandler, *, sample_queues: bool = False):
        self.settings = settings
        self.handler = handler
        self.sample_queues = sample_queues
        self._stopping = threading.Event()
        self._held: _Held | None = None  # the job whose write is sent and not yet confirmed
        self._lane = PriorityLane(on_idle=self._settle_held)
        self._arrivals = itertools.count()
        self._connection: pika.BlockingConnection | None = None
        self._last_tick = 0.0
        self._last_retry = time.monotonic()
        self._consuming = False
        self._jobs_queue = settings.jobs_queue

    # -- public -----------------------------------------------------------------
    def stop(self) -> None:
        """Finish the job in hand, requeue the rest, then return from ``run``. Signal-safe."""
        self._stopping.set()

    @property
    def healthy(self) -> bool:
        """Connected, consuming, the I/O loop turned within the last 10 s, and the compute
        lane is not stuck (no job running longer than ``job_stuck_after_s``)."""
        return self._consuming and time.monotonic() - self._last_tick < 10 and not self.stuck

    @property
    def stuck(self) -> bool:
        """The compute lane has run one task for longer than ``job_stuck_after_s``."""
        return self._lane.busy_for > self.settings.job_stuck_after_s

    @property
    def alive(self) -> bool:
        """The consume/reconnect loop is turning (consuming, or retrying a lost broker).

        For liveness probes: a worker waiting out a broker outage is alive, not stuck.
        """
        return time.monotonic() - max(self._last_tick, self._last_retry) < LIVENESS_WINDOW_S

    def run(self) -> None:
        """Consume until stopped, reconnecting with capped exponential backoff."""
        delay = 0.5
        while not self._stopping.is_set():
            self._last_retry = time.monotonic()
            try:
                self._consume_once()
                delay = 0.5
            except (pika.exceptions.AMQPError, OSError) as exc:
                self._consuming = False
                if self._stopping.is_set():
                    break
                log.warning("broker connection lost (%r); reconnecting in %.1fs", exc, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 30.0)
        self._lane.shutdown()
        log.info("consumer stopped")

    # -- connection ---------------------------------------------------------------
    def _layout(self) -> tuple[int, int]:
        """This worker's shard and the model's shard count (0 of 1 when unsharded)."""
        model = self.handler.models.current()
        return self.handler.models.shard or 0, model.shards

    @staticmethod
    def _process_events(connection: pika.BlockingConnection) -> None:
        """Run pika's I/O for half a second.

        Raises pika.exceptions.StreamLostError when the connection is closed or closes
        under the call: pika closes it from inside a callback when the node goes away, and
        its next timer call then fails with a ValueError rather than an AMQP error.
        """
        if not connection.is_open:
            raise pika.exceptions.StreamLostError("the broker connection is closed")
        try:
            connection.process_data_events(time_limit=0.5)
        except ValueError:
            if connection.is_open:
                raise
            raise pika.exceptions.StreamLostError("the broker connection closed") from None

    def _consume_once(self) -> None:
        s = self.settings
        # pika tries the nodes in turn; a cluster node that went away is skipped.
        connection = pika.BlockingConnection(broker_parameters(s))
        self._connection = connection
        try:
            channel = connection.channel()
            shard, shards = self._layout()
            declare_blocking(channel, topology(s, shards, only_shard=shard))
            self._jobs_queue = jobs_queue(s, shard, shards)
            channel.basic_qos(prefetch_count=s.prefetch)
            tags = [
                channel.basic_consume(self._jobs_queue, self._on_message),
                channel.basic_consume(sync_queue(s, shard, shards), self._on_sync),
                channel.basic_consume(s.dead_events_queue, self._on_dead_event),
            ]
            self._consuming = True
            log.info("consuming %s (prefetch %d)", self._jobs_queue, s.prefetch)
            next_sample = 0.0
            while not self._stopping.is_set():
                self._process_events(connection)
                self._last_tick = time.monotonic()
                if self.sample_queues and self._last_tick >= next_sample:
                    self._sample_queues(connection)
                    next_sample = self._last_tick + QUEUE_SAMPLE_EVERY_S
            self._consuming = False
            for tag in tags:
                channel.basic_cancel(tag)
            self._drain(connection)
        finally:
            self._consuming = False
            if connection.is_open:
                connection.close()

    def _drain(self, connection: pika.BlockingConnection) -> None:
        """Keep the I/O loop turning until every submitted job has acked or requeued."""
        while not self._lane.idle:
            connection.process_data_events(time_limit=0.1)
        connection.process_data_events(time_limit=0)

    def _sample_queues(self, connection: pika.BlockingConnection) -> None:
        for queue in (self._jobs_queue, self.settings.dead_letter_queue):
            try:
                probe = connection.channel()
                ok = probe.queue_declare(queue, passive=True)
                metrics.QUEUE_MESSAGES.labels(queue).set(ok.method.message_count)
                metrics.QUEUE_CONSUMERS.labels(queue).set(ok.method.consumer_count)
                probe.close()
            except pika.exceptions.ChannelClosedByBroker:
                log.debug("queue %s not there yet", queue)

    # -- messages -----------------------------------------------------------------
    def _on_message(
        self, channel: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes
    ) -> None:
        if method.redelivered:
            metrics.REDELIVERIES.inc()
        priority = self._job_priority(method, props)
        self._lane.submit(
            priority,
            functools.partial(
                self._work, channel, method.delivery_tag, props, body, suspect=priority > BATCH
            ),
        )

    def _job_priority(self, method: Basic.Deliver, props: BasicProperties) -> int:
        """Fresh jobs first, in arrival order; then jobs returned before, the most often
        returned last and, among equals, the earliest delivered last.

        A crash returns every job the worker held, and each return counts towards the
        queue's delivery limit. The job that was running, the likely culprit, is the one
        delivered first, so it runs last here: the innocent jobs delivered with a poison
        job finish before it crashes again, instead of reaching the limit alongside it.
        """
        returned = (props.headers or {}).get("x-delivery-count", 0)
        if not isinstance(returned, int) or returned < 1:
            returned = 1 if method.redelivered else 0
        if returned == 0:
            return BATCH
        arrival = next(self._arrivals) % _SUSPECT_SPAN
        return BATCH + 1 + min(returned, 255) * _SUSPECT_SPAN + (_SUSPECT_SPAN - 1 - arrival)

    def _on_sync(
        self, channel: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes
    ) -> None:
        self._lane.submit(
            URGENT, functools.partial(self._work_sync, channel, method.delivery_tag, props, body)
        )

    def _on_dead_event(
        self, channel: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes
    ) -> None:
        self._lane.submit(
            URGENT, functools.partial(self._count_dead, channel, method.delivery_tag, props, body)
        )

    def _work_sync(
        self, channel: BlockingChannel, tag: int, props: BasicProperties, body: bytes
    ) -> None:
        """Rank a small request now and answer on its reply-to address."""
        if self._stopping.is_set():
            self._reply(channel.basic_nack, tag, requeue=True)
            return
        try:
            job = decode_job(body)
            summary = self.handler.handle(job, want_results=True)
            answer = orjson.dumps(
                [
                    {"user_id": uid, "playlists": playlists}
                    for uid, playlists in zip(job.user_ids, summary.results or [], strict=True)
                ]
            )
        except UndecodableMessage as exc:
            log.error("sync request %s dropped: %s", props.correlation_id, exc.reason[:300])
            self._reply(channel.basic_reject, tag, requeue=False)
            return
        except TransientError as exc:
            # The caller times out with a 504; a retry of its own is the right fix.
            log.warning("sync request %s failed: %s", props.correlation_id, exc)
            self._reply(channel.basic_reject, tag, requeue=False)
            return
        except Exception:  # never leave a delivery unsettled; the caller gets a 504
            log.exception("sync request %s failed", props.correlation_id)
            self._reply(channel.basic_reject, tag, requeue=False)
            return
        if props.reply_to:
            self._publish_reply(channel, props, answer)
        metrics.JOBS.labels("sync").inc()
        self._reply(channel.basic_ack, tag)

    def _publish_reply(self, channel: BlockingChannel, props: BasicProperties, body: bytes) -> None:
        reply_props = BasicProperties(
            correlation_id=props.correlation_id, content_type="application/json"
        )
        self._on_io_thread(
            functools.partial(channel.basic_publish, "", props.reply_to, body, reply_props),
            f"reply {props.correlation_id}",
        )

    def _count_dead(
        self, channel: BlockingChannel, tag: int, props: BasicProperties, body: bytes
    ) -> None:
        """A copy of a dead letter (the original stays in the DLQ): count it in its batch."""
        try:
            self._record_dead(props, body)
        finally:
            self._reply(channel.basic_ack, tag)

    def _work(
        self,
        channel: BlockingChannel,
        tag: int,
        props: BasicProperties,
        body: bytes,
        *,
        suspect: bool = False,
    ) -> None:
        """Rank a job and send its write, then confirm the previous job's write and ack it:
        Redis stores one job while the next one ranks. The last job's write is confirmed
        when the lane has nothing else queued (``_settle_held``)."""
        if self._stopping.is_set():
            self._settle_held()
            self._reply(channel.basic_nack, tag, requeue=True)
            return
        if suspect:
            # A returned job may crash this process: first let the acks of the jobs
            # finished before it leave, so a crash does not return (and count) them too.
            self._settle_held()
            self._wait_for_io_thread()
        start = time.perf_counter()
        try:
            job = decode_job(body)
        except UndecodableMessage as exc:
            self._dead_letter(channel, tag, props, exc.reason)
            return
        extra = {"batch_id": job.batch_id, "job_id": job.job_id}
        try:
            pending = self._with_retries(lambda: self.handler.start(job), extra)
        except TransientError as exc:
            self._settle_held()
            log.warning("job requeued: %s", exc, extra=extra)
            metrics.JOBS.labels("requeued").inc()
            self._reply(channel.basic_nack, tag, requeue=True)
            return
        except Exception as exc:  # any other failure of this one job: dead-letter it
            self._settle_held()
            log.exception("job failed", extra=extra)
            self._dead_letter(channel, tag, props, f"{type(exc).__name__}: {exc}", "failed")
            return
        self._settle_held()
        self._held = _Held(pending, channel, tag, props, extra, start)

    def _settle_held(self) -> None:
        """Confirm the held job's write (retrying while Redis is away) and ack it; requeue
        it when stopping before Redis came back, dead-letter it on any other failure."""
        held, self._held = self._held, None
        if held is None:
            return
        try:
            summary = self._with_retries(lambda: self.handler.finish(held.pending), held.extra)
        except TransientError as exc:
            log.warning("job requeued: %s", exc, extra=held.extra)
            metrics.JOBS.labels("requeued").inc()
            self._reply(held.channel.basic_nack, held.tag, requeue=True)
            return
        except Exception as exc:
            log.exception("job failed", extra=held.extra)
            reason = f"{type(exc).__name__}: {exc}"
            self._dead_letter(held.channel, held.tag, held.props, reason, "failed")
            return
        metrics.JOBS.labels("done").inc()
        metrics.JOB_DURATION.observe(time.perf_counter() - held.start)
        log.debug("job done: %d users, %d cold", summary.users, summary.cold, extra=held.extra)
        self._reply(held.channel.basic_ack, held.tag)

    def _with_retries(self, fn: Callable[[], T], extra: dict[str, str]) -> T:
        """Retry transient failures with capped backoff until they pass or we are stopping."""
        retrying = Retrying(
            retry=retry_if_exception_type(TransientError),
            wait=wait_exponential(multiplier=0.2, max=10),
            stop=stop_when_event_set(self._stopping),
            reraise=True,
            before_sleep=lambda state: log.warning(
                "transient failure, retrying: %s",
                state.outcome.exception() if state.outcome else "",
                extra=extra,
            ),
        )
        return retrying(fn)

    def _dead_letter(
        self,
        channel: BlockingChannel,
        tag: int,
        props: BasicProperties,
        reason: str,
        kind: str = "undecodable",
    ) -> None:
        log.error(
            "dead-lettering message %s: %s", props.message_id, reason[:500], extra=_ids(props)
        )
        metrics.DEAD_LETTERED.labels(kind).inc()
        metrics.JOBS.labels("dead").inc()
        # The broker's copy on the dead-events queue counts it in its batch ledger.
        self._reply(channel.basic_reject, tag, requeue=False)

    def _record_dead(self, props: BasicProperties, body: bytes = b"") -> None:
        """Count a dead-lettered job in its batch ledger when the headers name a valid batch,
        keeping its user ids when the body is a job (so operators can list failed users)."""
        headers = props.headers or {}
        batch_id, job_id = headers.get(HEADER_BATCH_ID), props.message_id
        users = headers.get(HEADER_USERS, 0)
        if not (isinstance(batch_id, str) and isinstance(job_id, str) and isinstance(users, int)):
            return
        if not (_VALID_ID.fullmatch(batch_id) and _VALID_ID.fullmatch(job_id)):
            return
        try:
            user_ids = decode_job(body).user_ids
        except UndecodableMessage:
            user_ids = None
        try:
            self.handler.record_dead(batch_id, job_id, users, user_ids)
        except TransientError:
            log.warning(
                "could not record dead job %s in its batch ledger", job_id, extra=_ids(props)
            )

    def _wait_for_io_thread(self, timeout: float = 5.0) -> None:
        """Block until the I/O thread has run every callback handed to it so far."""
        done = threading.Event()
        self._on_io_thread(done.set, "barrier")
        done.wait(timeout)

    def _reply(self, fn: Callable[..., None], tag: int, **kwargs: bool) -> None:
        """Settle a delivery (ack, nack, reject) from the compute thread."""
        self._on_io_thread(functools.partial(fn, tag, **kwargs), f"delivery {tag}")

    def _on_io_thread(self, call: Callable[[], object], what: str) -> None:
        """Run ``call`` on the connection's thread; pika channels are not thread-safe."""
        connection = self._connection
        if connection is None or not connection.is_open:
            log.warning("connection closed before %s was settled; broker redelivers", what)
            return
        connection.add_callback_threadsafe(functools.partial(self._settle, call, what))

    @staticmethod
    def _settle(call: Callable[[], object], what: str) -> None:
        try:
            call()
        except pika.exceptions.AMQPError:
            # A late settle on a channel that closed (or belongs to an older connection).
            log.warning("channel closed before %s was settled; broker redelivers", what)


@dataclass(frozen=True)
class _Held:
    """A job whose write was sent and whose delivery waits for that write's replies."""

    pending: PendingJob
    channel: BlockingChannel
    tag: int
    props: BasicProperties
    extra: dict[str, str]
    start: float


def _ids(props: BasicProperties) -> dict[str, str | None]:
    """Batch and job ids of a message that did not decode, for its log lines."""
    batch_id = (props.headers or {}).get(HEADER_BATCH_ID)
    return {
        "batch_id": batch_id if isinstance(batch_id, str) else None,
        "job_id": props.message_id if isinstance(props.message_id, str) else None,
    }


def broker_parameters(settings: Settings) -> list[pika.ConnectionParameters]:
    """Connection parameters of every broker node, for pika to try in turn."""
    params = []
    for url in settings.amqp_urls:
        p = pika.URLParameters(url)
        p.heartbeat = settings.heartbeat_s
        p.blocked_connection_timeout = 60
        p.connection_attempts = 1
        p.socket_timeout = 5
        params.append(p)
    return params
