"""Batches: submit a list of users for ranking, follow its progress."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Header, HTTPException, Path, status
from fastapi.responses import JSONResponse

from api import metrics
from api.broker import PublishFailed
from api.deps import Clients, ClientsDep
from api.idempotency import KEY_PATTERN, IdempotencyConflict, IdempotencyStore, digest
from api.schemas import BatchAccepted, BatchStatus, Problem, UserIdsRequest
from shared.messages import ID_PATTERN, make_jobs, new_id
from shared.store import batch_status, new_batch_fields

router = APIRouter(tags=["batches"])
RETRY_AFTER_S = "5"


def unique_in_order(user_ids: list[int]) -> list[int]:
    """Drop repeated ids, keeping the first occurrence and the order."""
    return list(dict.fromkeys(user_ids))


@router.post(
    "/api/playlist/beta_recommend/",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=BatchAccepted,
    responses={409: {"model": Problem}, 413: {"model": Problem}, 503: {"model": Problem}},
)
async def submit_batch(
    body: UserIdsRequest,
    clients: ClientsDep,
    idempotency_key: Annotated[
        str | None,
        Header(description="the same key within the window returns the same batch"),
    ] = None,
) -> BatchAccepted:
    """Queue a batch: split into jobs of at most ``job_size`` users, publish each with a
    publisher confirm, and answer 202 only once the broker confirmed every job."""
    s = clients.settings
    if len(body.user_ids) > s.max_users_per_request:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"{len(body.user_ids)} user ids; at most {s.max_users_per_request} per request",
        )
    if idempotency_key is None:
        return await _queue_batch(body, clients)
    if not KEY_PATTERN.fullmatch(idempotency_key):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "Idempotency-Key must be 1-128 characters of letters, digits and _.:-",
        )
    store = IdempotencyStore(clients.redis, s.redis_prefix, s.idempotency_window_s)
    body_digest = digest(orjson.dumps(body.user_ids))
    try:
        earlier = await store.begin(idempotency_key, body_digest)
    except IdempotencyConflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    if earlier is not None:
        return BatchAccepted(**earlier)
    try:
        accepted = await _queue_batch(body, clients)
    except BaseException:
        await store.abandon(idempotency_key)
        raise
    await store.finish(idempotency_key, body_digest, accepted.model_dump())
    return accepted


async def _queue_batch(body: UserIdsRequest, clients: Clients) -> BatchAccepted:
    s = clients.settings
    user_ids = unique_in_order(body.user_ids)
    batch_id = new_id()
    jobs = make_jobs(batch_id, user_ids, s.job_size)
    ledger = clients.keys.batch(batch_id)
    # The ledger exists before the first job can finish, so no progress is lost.
    async with clients.redis.pipeline(transaction=True) as pipe:
        pipe.hset(ledger, mapping=new_batch_fields(len(jobs), len(user_ids)))
        pipe.expire(ledger, s.batch_ttl_s)
        await pipe.execute()
    try:
        await clients.publisher.publish_jobs(jobs)
    except PublishFailed as exc:
        metrics.PUBLISH_FAILURES.labels(exc.reason).inc()
        await clients.redis.hset(ledger, "publish_failed", exc.reason)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"batch not accepted: {exc.reason}; retry later",
            headers={"Retry-After": RETRY_AFTER_S},
        ) from exc
    metrics.JOBS_PUBLISHED.inc(len(jobs))
    metrics.USERS_PUBLISHED.inc(len(user_ids))
    metrics.BATCHES_ACCEPTED.inc()
    return BatchAccepted(
        batch_id=batch_id,
        jobs=len(jobs),
        users=len(user_ids),
        duplicates=len(body.user_ids) - len(user_ids),
    )


# The name the client's existing code uses.
router.add_api_route(
    "/beta_recommend",
    submit_batch,
    methods=["POST"],
    status_code=status.HTTP_202_ACCEPTED,
    response_model=BatchAccepted,
    include_in_schema=False,
)


@router.get(
    "/api/batches/{batch_id}", response_model=BatchStatus, responses={404: {"model": Problem}}
)
async def get_batch(
    batch_id: Annotated[str, Path(pattern=ID_PATTERN)], clients: ClientsDep
) -> JSONResponse:
    """Progress of a batch: job and user counts, rate, ETA and state."""
    fields = await clients.redis.hgetall(clients.keys.batch(batch_id))
    if not fields:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no batch {batch_id}")
    return JSONResponse(batch_status(batch_id, fields))
