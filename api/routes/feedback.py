"""Feedback: record the list a user is shown (an impression) and the playlist they like.

Callers: a key with the ``feedback`` role, or the page at ``/`` with its tokens (see
``api/auth.py``): the page token lets it record impressions, and each impression answers
with a like token (header ``X-Like-Token``) that lets the page like that impression only.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response, status

from recfleet.api.auth import (
    LIKE_TOKEN_HEADER,
    LIKE_TOKEN_TTL_S,
    FeedbackCallerDep,
    GuardDep,
    check_page,
    like_scope,
    page_scope,
)
from recfleet.api.db import FAILURES, DatabaseUnavailable, LikeConflict, LikeRefused
from recfleet.api.deps import DatabaseDep, ResultsDep
from recfleet.api.limits import OrjsonRoute
from recfleet.api.schemas import Problem
from recfleet.shared.feedback import Impression, ImpressionRequest, Like, LikeRequest

router = APIRouter(tags=["feedback"], route_class=OrjsonRoute)


@router.post(
    "/api/impressions",
    status_code=status.HTTP_201_CREATED,
    response_model=Impression,
    responses={404: {"model": Problem}, 503: {"model": Problem}},
)
async def record_impression(
    body: ImpressionRequest,
    response: Response,
    caller: FeedbackCallerDep,
    guard: GuardDep,
    db: DatabaseDep,
    results: ResultsDep,
) -> Impression:
    """Show a user their current recommendations and record the impression.

    The list comes from the stored result, never from the client, so an impression is
    what was really served. 404 when the user has no result yet; 503 (nothing recorded)
    when PostgreSQL is unavailable.
    """
    check_page(guard, caller, page_scope(), "the page token is invalid or expired; reload")
    result = await results.read(body.user_id)
    if result is None:
        FAILURES.labels("no_result").inc()
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"no recommendations for user {body.user_id} yet"
        )
    try:
        impression = await db.record_impression(
            user_id=body.user_id,
            playlists=result.playlists,
            model_version=result.model_version,
            generated_at=int(result.generated_at),
            generation=result.generation,
            cold=result.cold,
        )
    except DatabaseUnavailable:
        FAILURES.labels("database").inc()
        raise
    scope = like_scope(impression.impression_id)
    response.headers[LIKE_TOKEN_HEADER] = guard.sign(scope, LIKE_TOKEN_TTL_S)
    return impression


@router.post(
    "/api/feedback",
    status_code=status.HTTP_201_CREATED,
    response_model=Like,
    responses={
        200: {"model": Like, "description": "a retry of a like already recorded"},
        409: {"model": Problem},
        503: {"model": Problem},
    },
)
async def record_like(
    body: LikeRequest,
    response: Response,
    caller: FeedbackCallerDep,
    guard: GuardDep,
    db: DatabaseDep,
) -> Like:
    """Record a like of one playlist of an impression: 201 when new, 200 for a retry
    (same ``like_id``, or the same playlist of the same impression), 422 when the playlist
    was not shown to that user in that impression, 409 when ``like_id`` names another like,
    503 (nothing recorded) when PostgreSQL is unavailable. The page may like only the
    impression its like token names (403 otherwise)."""
    refusal = "the page may like only an impression it was served"
    check_page(guard, caller, like_scope(body.impression_id), refusal)
    try:
        like, created = await db.record_like(body)
    except LikeRefused:
        FAILURES.labels("not_shown").inc()
        raise
    except LikeConflict:
        FAILURES.labels("conflict").inc()
        raise
    except DatabaseUnavailable:
        FAILURES.labels("database").inc()
        raise
    if not created:
        response.status_code = status.HTTP_200_OK
    return like
