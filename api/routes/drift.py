"""Drift: what a batch recommended against a reference batch; and the gateway's monitor.

Routes: ``GET /api/batches/{batch_id}/drift[?reference=ID]`` and ``GET|PUT|DELETE
/api/drift/reference`` (the batch an operator pins as the reference).

The app's lifespan (``api/app.py``) runs ``monitor``, which every ``MONITOR_EVERY_S``
seconds exports:

- the cold fraction of the latest finished batch, and the chi-square test of its
  popularity-bucket counts against its reference (the pinned batch, else the batch that
  finished before it);
- how many batches with progress in the last 15 minutes are in each state;
- ready, unacked and consumer counts of the jobs queue and the dead-letter queue, from
  RabbitMQ's management API (``http://<AMQP host>:15672``, the AMQP credentials). AMQP
  alone cannot tell unacked messages; without the management plugin these gauges stay
  absent and the workers' passive-declare figures (ready, consumers) remain.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from contextlib import suppress
from dataclasses import asdict
from typing import Annotated, Any, Literal, cast
from urllib.parse import quote, unquote, urlsplit

import httpx
from fastapi import APIRouter, HTTPException, Path, Query, Security, status
from pydantic import BaseModel, Field
from redis.asyncio import Redis
from redis.exceptions import RedisError

from recfleet.api import metrics
from recfleet.api.auth import Role, require
from recfleet.api.deps import KeysDep, RedisDep
from recfleet.api.limits import OrjsonRoute
from recfleet.api.schemas import Problem
from recfleet.shared.codec import as_text
from recfleet.shared.drift import chi_square, cold_fraction
from recfleet.shared.keys import Keys
from recfleet.shared.ledger import LedgerStatus
from recfleet.shared.messages import ID_PATTERN, ClosedModel
from recfleet.shared.settings import Settings

log = logging.getLogger(__name__)

MONITOR_EVERY_S = 5.0
RECENT_S = 900.0  # window of the batches-by-state gauge
RECENT_LIMIT = 500  # batches read per refresh, newest first
PREVIOUS_LIMIT = 50  # batches searched for the previous finished one
MANAGEMENT_PORT = 15672
# Indexed batches have progress, so none is "queued".
STATES = ("running", "done", "failed")
FINISHED = ("done", "failed")
BatchId = Annotated[str, Path(pattern=ID_PATTERN)]
READ = [Security(require(Role.READ))]
OPERATOR = [Security(require(Role.OPERATOR))]


class BatchCounts(BaseModel):
    batch_id: str
    state: str
    users_done: int
    cold_users: int
    cold_fraction: float | None = Field(description="cold users / users ranked")
    recommended_by_popularity: dict[str, int] = Field(
        description="recommended playlists per popularity-rank bucket"
    )


class ChiSquareResult(BaseModel):
    statistic: float
    p_value: float
    dof: int
    cramers_v: float = Field(description="effect size, 0 (same) to 1 (disjoint)")
    n: int
    categories: list[str]


class DriftReport(BaseModel):
    batch: BatchCounts
    reference: BatchCounts | None
    reference_source: Literal["request", "pinned", "previous"] | None
    chi_square: ChiSquareResult | None = Field(description="null without a usable reference")


class PinnedReference(ClosedModel):
    batch_id: str | None = Field(default=None, pattern=ID_PATTERN)


def batch_counts(batch_id: str, fields: dict[Any, Any]) -> BatchCounts:
    """The drift-relevant figures of one batch ledger."""
    doc = LedgerStatus.parse(batch_id, fields).document()
    return BatchCounts(
        batch_id=batch_id,
        state=doc["state"],
        users_done=doc["users_done"],
        cold_users=doc["cold_users"],
        cold_fraction=cold_fraction(doc["cold_users"], doc["users_done"]),
        recommended_by_popularity=doc["recommended_by_popularity"],
    )


def drift_report(
    batch: BatchCounts, reference: BatchCounts | None, source: str | None
) -> DriftReport:
    test = (
        chi_square(batch.recommended_by_popularity, reference.recommended_by_popularity)
        if reference
        else None
    )
    return DriftReport(
        batch=batch,
        reference=reference,
        reference_source=source if reference else None,  # type: ignore[arg-type]
        chi_square=ChiSquareResult(**{**asdict(test), "categories": list(test.categories)})
        if test
        else None,
    )


async def _ledgers(redis: Redis, keys: Keys, ids: list[str]) -> list[dict[Any, Any]]:
    async with redis.pipeline(transaction=False) as pipe:
        for batch_id in ids:
            pipe.hgetall(keys.batch(batch_id))
        return list(await pipe.execute())


async def _previous_finished(redis: Redis, keys: Keys, batch_id: str) -> BatchCounts | None:
    """The latest finished batch whose last progress came before ``batch_id``'s."""
    score = await redis.zscore(keys.batches, batch_id)
    newest = "+inf" if score is None else f"({score}"
    found = await redis.zrevrangebyscore(keys.batches, newest, "-inf", start=0, num=PREVIOUS_LIMIT)
    ids = [as_text(member) for member in cast(list[bytes], found)]
    for other, fields in zip(ids, await _ledgers(redis, keys, ids), strict=True):
        if other != batch_id and fields:
            counts = batch_counts(other, fields)
            if counts.state in FINISHED:
                return counts
    return None


async def resolve_reference(
    redis: Redis, keys: Keys, batch_id: str, requested: str | None
) -> tuple[BatchCounts | None, str | None]:
    """The reference of ``batch_id``: the requested batch, else the pinned one, else the
    previous finished batch. Raises HTTPException 404 when a requested batch is unknown."""
    if requested is not None:
        fields = await redis.hgetall(keys.batch(requested))
        if not fields:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no reference batch {requested}")
        return batch_counts(requested, fields), "request"
    pinned = await redis.get(keys.drift_reference)
    if pinned is not None and as_text(pinned) != batch_id:
        fields = await redis.hgetall(keys.batch(as_text(pinned)))
        if fields:
            return batch_counts(as_text(pinned), fields), "pinned"
    previous = await _previous_finished(redis, keys, batch_id)
    return previous, "previous" if previous else None


router = APIRouter(tags=["drift"], route_class=OrjsonRoute)


@router.get(
    "/api/batches/{batch_id}/drift",
    response_model=DriftReport,
    dependencies=READ,
    responses={404: {"model": Problem}},
)
async def get_drift(
    batch_id: BatchId,
    redis: RedisDep,
    keys: KeysDep,
    reference: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
) -> DriftReport:
    """Cold fraction of a batch and a chi-square test of its recommendations' popularity
    buckets against a reference batch (``reference``, else the pinned one, else the batch
    that finished before it). ``chi_square`` is null when there is no usable reference."""
    fields = await redis.hgetall(keys.batch(batch_id))
    if not fields:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no batch {batch_id}")
    ref, source = await resolve_reference(redis, keys, batch_id, reference)
    return drift_report(batch_counts(batch_id, fields), ref, source)


@router.get("/api/drift/reference", response_model=PinnedReference, dependencies=READ)
async def get_pinned_reference(redis: RedisDep, keys: KeysDep) -> PinnedReference:
    """The batch pinned as drift reference, if any."""
    pinned = await redis.get(keys.drift_reference)
    return PinnedReference(batch_id=as_text(pinned) if pinned is not None else None)


@router.put(
    "/api/drift/reference",
    response_model=PinnedReference,
    dependencies=OPERATOR,
    responses={404: {"model": Problem}},
)
async def pin_reference(body: PinnedReference, redis: RedisDep, keys: KeysDep) -> PinnedReference:
    """Pin a batch as the reference of every later drift test (until its ledger expires)."""
    if body.batch_id is None or not await redis.exists(keys.batch(body.batch_id)):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no batch {body.batch_id}")
    ttl = await redis.ttl(keys.batch(body.batch_id))
    await redis.set(keys.drift_reference, body.batch_id, ex=ttl if ttl > 0 else None)
    return body


@router.delete(
    "/api/drift/reference", status_code=status.HTTP_204_NO_CONTENT, dependencies=OPERATOR
)
async def unpin_reference(redis: RedisDep, keys: KeysDep) -> None:
    """Go back to comparing each batch with the one that finished before it."""
    await redis.delete(keys.drift_reference)


# -- the monitor ---------------------------------------------------------------------


async def refresh_batches(redis: Redis, keys: Keys, batch_ttl_s: float) -> None:
    """Set the batches-by-state and drift gauges from the recent batch ledgers."""
    now = time.time()
    await redis.zremrangebyscore(keys.batches, "-inf", now - batch_ttl_s)
    found = await redis.zrevrange(keys.batches, 0, RECENT_LIMIT - 1, withscores=True)
    entries = cast(list[tuple[bytes, float]], found)
    ids = [as_text(member) for member, _ in entries]
    scores = [float(score) for _, score in entries]
    states = dict.fromkeys(STATES, 0)
    latest: BatchCounts | None = None
    gone = []
    ledgers = await _ledgers(redis, keys, ids)
    for batch_id, score, fields in zip(ids, scores, ledgers, strict=True):
        if not fields:  # expired, or a job that belonged to no batch ledger
            gone.append(batch_id)
            continue
        counts = batch_counts(batch_id, fields)
        if score >= now - RECENT_S:
            states[counts.state] = states.get(counts.state, 0) + 1
        if latest is None and counts.state in FINISHED:
            latest = counts
    if gone:
        await redis.zrem(keys.batches, *gone)
    report = None
    if latest is not None:
        reference = await resolve_reference(redis, keys, latest.batch_id, None)
        report = drift_report(latest, *reference)
    # No await from here on: a scrape never sees the gauges half set.
    for state, n in states.items():
        metrics.BATCHES_RECENT.labels(state).set(n)
    for gauge in (
        metrics.DRIFT_COLD_FRACTION,
        metrics.DRIFT_CHI2,
        metrics.DRIFT_P_VALUE,
        metrics.DRIFT_CRAMERS_V,
    ):
        gauge.clear()
    if report is None:
        return
    if report.batch.cold_fraction is not None:
        metrics.DRIFT_COLD_FRACTION.labels(report.batch.batch_id).set(report.batch.cold_fraction)
    if report.chi_square is not None and report.reference is not None:
        labels = (report.batch.batch_id, report.reference.batch_id)
        metrics.DRIFT_CHI2.labels(*labels).set(report.chi_square.statistic)
        metrics.DRIFT_P_VALUE.labels(*labels).set(report.chi_square.p_value)
        metrics.DRIFT_CRAMERS_V.labels(*labels).set(report.chi_square.cramers_v)


def management_api(amqp_url: str) -> tuple[str, str, httpx.BasicAuth]:
    """Base URL, quoted vhost and credentials of the management API of an AMQP URL's broker."""
    url = urlsplit(amqp_url)
    host = url.hostname or "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    vhost = unquote(url.path[1:]) or "/"
    auth = httpx.BasicAuth(unquote(url.username or "guest"), unquote(url.password or "guest"))
    return f"http://{host}:{MANAGEMENT_PORT}", quote(vhost, safe=""), auth


async def sample_queues(http: httpx.AsyncClient, settings: Settings) -> None:
    """Set ready, unacked and consumer gauges of the jobs queue and the DLQ.

    Raises httpx.HTTPError when the management API does not answer.
    """
    base, vhost, auth = management_api(settings.amqp_urls[0])
    gauges = (
        (metrics.QUEUE_MESSAGES, "messages_ready"),
        (metrics.QUEUE_UNACKED, "messages_unacknowledged"),
        (metrics.QUEUE_CONSUMERS, "consumers"),
    )
    for queue in (settings.jobs_queue, settings.dead_letter_queue):
        resp = await http.get(f"{base}/api/queues/{vhost}/{quote(queue, safe='')}", auth=auth)
        if resp.status_code == status.HTTP_404_NOT_FOUND:
            for gauge, _ in gauges:
                with suppress(KeyError):
                    gauge.remove(queue)
            continue
        resp.raise_for_status()
        body = resp.json()
        for gauge, field in gauges:
            # A queue's message stats appear a few seconds after it is declared.
            gauge.labels(queue).set(body.get(field, 0))


async def monitor(
    redis: Redis, settings: Settings, stop: asyncio.Event, every: float = MONITOR_EVERY_S
) -> None:
    """Refresh the batch, drift and queue gauges until ``stop`` is set."""
    failing: set[str] = set()
    keys = Keys(settings.redis_prefix)
    async with httpx.AsyncClient(timeout=3.0) as http:
        while not stop.is_set():
            refresh = refresh_batches(redis, keys, settings.batch_ttl_s)
            await _guarded("batch ledgers", refresh, failing)
            await _guarded("broker management API", sample_queues(http, settings), failing)
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)


async def _guarded(what: str, step: Awaitable[None], failing: set[str]) -> None:
    """Run one refresh; log the first failure of a streak and the recovery, never raise."""
    try:
        await step
    except (RedisError, httpx.HTTPError, ValueError) as exc:
        if what not in failing:
            log.warning("monitor: %s unavailable: %s", what, exc)
        failing.add(what)
        return
    except Exception:  # the monitor must outlive a bug in one refresh
        log.exception("monitor: refreshing from %s failed", what)
        return
    if what in failing:
        log.info("monitor: %s available again", what)
        failing.discard(what)
