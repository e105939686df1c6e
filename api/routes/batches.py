"""Batches: submit a list of users for ranking, follow its progress."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status
from fastapi.responses import JSONResponse

from api import metrics
from api.broker import PublishFailed
from api.deps import ClientsDep
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
    responses={413: {"model": Problem}, 503: {"model": Problem}},
)
async def submit_batch(body: UserIdsRequest, clients: ClientsDep) -> BatchAccepted:
    """Queue a batch: split into jobs of at most ``job_size`` users, publish each with a
    publisher confirm, and answer 202 only once the broker confirmed every job."""
    s = clients.settings
    if len(body.user_ids) > s.max_users_per_request:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"{len(body.user_ids)} user ids; at most {s.max_users_per_request} per request",
        )
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
