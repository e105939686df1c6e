"""Batches: submit users for ranking (in one request, or appended to an open batch), seal,
follow progress. A batch opened with ``run`` is a declared run: its own generation, made
current when complete; every other batch is ad-hoc and updates the current generation."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Header, HTTPException, Path, Query, Security, status
from redis.asyncio import Redis

from recfleet.api import metrics
from recfleet.api.auth import ApiKey, CallingKeyDep, Role, check_owner, require
from recfleet.api.broker import Publisher, PublishFailed
from recfleet.api.deps import KeysDep, PublisherDep, RedisDep, ResultsDep, SettingsDep
from recfleet.api.idempotency import KEY_PATTERN, IdempotencyStore, digest
from recfleet.api.limits import OrjsonRoute
from recfleet.api.schemas import (
    BatchAccepted,
    BatchOpen,
    BatchOpened,
    BatchRequest,
    BatchStatus,
    Problem,
)
from recfleet.shared.codec import as_text
from recfleet.shared.generations import finalize_steps, run_steps_async
from recfleet.shared.keys import Keys
from recfleet.shared.ledger import (
    APPEND_MISSING,
    APPEND_SCRIPT,
    APPEND_SEALED,
    SEAL_SCRIPT,
    BatchState,
    GenState,
    LedgerStatus,
    new_batch_fields,
)
from recfleet.shared.messages import ID_PATTERN, Job, new_id
from recfleet.shared.settings import Settings

log = logging.getLogger(__name__)
# The ledger field naming the API key that opened a batch (absent on an open gateway).
OWNER = "owner"


router = APIRouter(tags=["batches"], route_class=OrjsonRoute)
BatchId = Annotated[str, Path(pattern=ID_PATTERN)]
MAX_FAILED_USERS = 100_000
PUBLISH_LEASE_FACTOR = 3
PUBLISHER_DIED = "publish: the gateway stopped before the broker confirmed every job"
SUBMIT = [Security(require(Role.SUBMIT))]
READ = [Security(require(Role.READ))]


def publish_lease_s(s: Settings) -> float:
    """How long one request may take to publish its jobs before it counts as dead: the
    Idempotency-Key's claim and the batch's publishing lease."""
    return PUBLISH_LEASE_FACTOR * s.publish_timeout_s


def unique_in_order(user_ids: list[int]) -> list[int]:
    """Drop repeated ids, keeping the first occurrence and the order."""
    return list(dict.fromkeys(user_ids))


@router.post(
    "/api/playlist/beta_recommend/",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=BatchAccepted,
    dependencies=SUBMIT,
    responses={
        404: {"model": Problem},
        409: {"model": Problem},
        413: {"model": Problem},
        503: {"model": Problem},
    },
)
async def submit_batch(
    body: BatchRequest,
    s: SettingsDep,
    redis: RedisDep,
    keys: KeysDep,
    publisher: PublisherDep,
    caller: CallingKeyDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            description="the same key within the window returns the same batch",
            pattern=KEY_PATTERN.pattern,
        ),
    ] = None,
) -> BatchAccepted:
    """Queue users: split into jobs of at most ``job_size`` users, publish each with a
    publisher confirm, and answer 202 only once the broker confirmed every job.

    Without ``batch_id`` the request is a whole batch: ad-hoc (each job's results go into
    the current generation as it finishes, updating those users and hiding no one), or
    with ``"run": true`` a declared run. With ``batch_id``, the users join that open batch
    (``POST /api/batches``)."""
    if len(body.user_ids) > s.max_users_per_request:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"{len(body.user_ids)} user ids; at most {s.max_users_per_request} per request",
        )
    if idempotency_key is None:
        return await _queue(body, s, redis, keys, publisher, caller)
    store = IdempotencyStore(redis, s.redis_prefix, s.idempotency_window_s, publish_lease_s(s))
    # "run" joins the digest only when set: an ad-hoc body digests as it always did.
    fields = [body.batch_id, body.user_ids, *([True] if body.run else [])]
    body_digest = digest(orjson.dumps(fields))
    earlier = await store.begin(idempotency_key, body_digest)
    if earlier is not None:
        return BatchAccepted(**earlier)
    try:
        accepted = await _queue(body, s, redis, keys, publisher, caller)
    except BaseException:
        await store.abandon(idempotency_key)
        raise
    await store.finish(idempotency_key, body_digest, accepted.model_dump())
    return accepted


# The name the client's existing code uses.
router.add_api_route(
    "/beta_recommend",
    submit_batch,
    methods=["POST"],
    status_code=status.HTTP_202_ACCEPTED,
    response_model=BatchAccepted,
    dependencies=SUBMIT,
    include_in_schema=False,
)


async def _queue(
    body: BatchRequest,
    s: Settings,
    redis: Redis,
    keys: Keys,
    publisher: Publisher,
    caller: ApiKey | None,
) -> BatchAccepted:
    """Record the jobs in the batch ledger and publish them.

    Raises HTTPException 404/409 for an unknown or sealed batch, Forbidden (403) for a
    batch another key opened, PublishFailed (503) when the broker did not confirm every
    job.
    """
    user_ids = unique_in_order(body.user_ids)
    router = publisher.router
    parts = router.split(user_ids)
    n_jobs = router.count_jobs(parts)
    # The queues of every shard exist before any job is counted in a ledger.
    await publisher.ensure_shards(router.shards)
    if body.batch_id is None:
        batch_id, first = new_id(), 0
        ledger = keys.batch(batch_id)
        # The ledger exists before the first job can finish, so no progress is lost.
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hset(ledger, mapping=new_batch_fields(n_jobs, len(user_ids), run=body.run))  # type: ignore[arg-type]
            _hold_publish_lease(pipe, ledger, s)
            pipe.expire(ledger, s.batch_ttl_s)
            await pipe.execute()
    else:
        batch_id = body.batch_id
        ledger = keys.batch(batch_id)
        check_owner(as_text(await redis.hget(ledger, OWNER)), caller, f"batch {batch_id}")
        first = int(
            await redis.eval(APPEND_SCRIPT, 1, ledger, n_jobs, len(user_ids), s.batch_ttl_s)
        )
        if first == APPEND_MISSING:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no batch {batch_id}")
        if first == APPEND_SEALED:
            raise HTTPException(status.HTTP_409_CONFLICT, f"batch {batch_id} is sealed")
        async with redis.pipeline(transaction=True) as pipe:
            _hold_publish_lease(pipe, ledger, s)
            await pipe.execute()
    jobs, queues = router.jobs(batch_id, parts, first_index=first)
    try:
        await publisher.publish_jobs(jobs, queues)
    except PublishFailed as exc:
        await _undo(redis, ledger, exc.failed, exc.reason)
        metrics.PUBLISH_FAILURES.labels(exc.reason).inc()
        raise
    finally:
        await redis.hincrby(ledger, "publishing", -1)
    metrics.JOBS_PUBLISHED.inc(len(jobs))
    metrics.USERS_PUBLISHED.inc(len(user_ids))
    metrics.BATCHES_ACCEPTED.inc()
    return BatchAccepted(
        batch_id=batch_id,
        jobs=len(jobs),
        users=len(user_ids),
        duplicates=len(body.user_ids) - len(user_ids),
    )


def _hold_publish_lease(pipe: Any, ledger: str, s: Settings) -> None:
    """Count one request publishing into ``ledger`` and push its lease's end out. A
    count left above zero past the lease means a gateway died mid-publish."""
    pipe.hincrby(ledger, "publishing", 1)
    pipe.hset(ledger, "publish_lease_until", f"{time.time() + publish_lease_s(s):.3f}")


def _publisher_died(fields: dict[Any, Any]) -> bool:
    publishing = int(fields.get(b"publishing", 0))
    lease = float(fields.get(b"publish_lease_until", 0))
    return publishing > 0 and lease < time.time()


async def _undo(redis: Redis, ledger: str, failed: list[Job], reason: str) -> None:
    """Take jobs the broker did not confirm out of the ledger's totals; confirmed jobs
    still run. The client resubmits what was refused (to an open run: before sealing it)."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hincrby(ledger, "jobs_total", -len(failed))
        pipe.hincrby(ledger, "users_total", -sum(len(j.user_ids) for j in failed))
        pipe.hset(ledger, "publish_failed", reason)
        await pipe.execute()


@router.post(
    "/api/batches",
    status_code=status.HTTP_201_CREATED,
    response_model=BatchOpened,
    dependencies=SUBMIT,
)
async def open_batch(
    s: SettingsDep,
    redis: RedisDep,
    keys: KeysDep,
    caller: CallingKeyDep,
    body: BatchOpen | None = None,
) -> BatchOpened:
    """Open a batch that several requests append users to; seal it when all are in.
    Only the key that opened it (or an operator's) may append to it or seal it.

    With ``{"run": true}`` it is a declared run (a new generation); without, ad-hoc. A
    batch that never gets a user is forgotten after ``open_batch_ttl_s``."""
    run = body.run if body else False
    batch_id = new_id()
    ledger = keys.batch(batch_id)
    fields = new_batch_fields(0, 0, sealed=False, run=run)
    if caller is not None:
        fields[OWNER] = caller.name
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(ledger, mapping=fields)  # type: ignore[arg-type]
        pipe.expire(ledger, s.open_batch_ttl_s)
        await pipe.execute()
    return BatchOpened(batch_id=batch_id, run=run)


@router.post(
    "/api/batches/{batch_id}/seal",
    response_model=BatchStatus,
    dependencies=SUBMIT,
    responses={404: {"model": Problem}},
)
async def seal_batch(
    batch_id: BatchId,
    s: SettingsDep,
    redis: RedisDep,
    keys: KeysDep,
    results: ResultsDep,
    caller: CallingKeyDep,
) -> BatchStatus:
    """No more users for this batch. If every job already finished, run the switch now.
    Only the key that opened the batch (or an operator's) may seal it."""
    ledger = keys.batch(batch_id)
    check_owner(as_text(await redis.hget(ledger, OWNER)), caller, f"batch {batch_id}")
    outcome = int(await redis.eval(SEAL_SCRIPT, 1, ledger))
    if outcome == -1:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no batch {batch_id}")
    return await get_batch(batch_id, s, redis, keys, results)


@router.get(
    "/api/batches/{batch_id}",
    response_model=BatchStatus,
    dependencies=READ,
    responses={404: {"model": Problem}},
)
async def get_batch(
    batch_id: BatchId,
    s: SettingsDep,
    redis: RedisDep,
    keys: KeysDep,
    results: ResultsDep,
    failed_users: Annotated[
        bool, Query(description="also list the users of dead-lettered jobs")
    ] = False,
) -> BatchStatus:
    """Progress of a batch: job and user counts, rate, ETA, state and generation state.

    A complete batch whose switch has not run yet (its last worker died before it could)
    is finalized here."""
    ledger = keys.batch(batch_id)
    fields = await redis.hgetall(ledger)
    if not fields:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no batch {batch_id}")
    if _publisher_died(fields) and fields.get(b"gen_state") == GenState.PENDING.value.encode():
        # Its jobs can never all arrive: the batch ends failed and never becomes current.
        rejected = {"gen_state": GenState.REJECTED.value, "gen_reason": PUBLISHER_DIED}
        await redis.hset(ledger, mapping=rejected)  # type: ignore[arg-type]
        fields = await redis.hgetall(ledger)
    ledger_status = LedgerStatus.parse(batch_id, fields)
    if ledger_status.awaits_switch:
        await run_steps_async(redis, finalize_steps(batch_id, s, keys))
        results.generations.invalidate()
        ledger_status = LedgerStatus.parse(batch_id, await redis.hgetall(ledger))
    if _publisher_died(fields):
        ledger_status = replace(ledger_status, state=BatchState.FAILED)
    doc = ledger_status.document()
    if failed_users:
        packed = await redis.hvals(keys.batch_dead_users(batch_id))
        raw = b"".join(p if isinstance(p, bytes) else p.encode() for p in packed)
        users = np.unique(np.frombuffer(raw, dtype="<i8"))
        doc["failed_user_ids"] = users[:MAX_FAILED_USERS].tolist()
        doc["failed_user_ids_truncated"] = len(users) > MAX_FAILED_USERS
    return BatchStatus(**doc)
