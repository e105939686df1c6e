"""One user's current recommendations, read from the active generations in Redis."""

from __future__ import annotations

import time

import orjson
from fastapi import APIRouter, HTTPException, Response, Security, status

from recfleet.api.auth import Role, require
from recfleet.api.deps import ResultsDep, SettingsDep, SyncDep
from recfleet.api.limits import OrjsonRoute
from recfleet.api.schemas import Problem, SyncResult, UserIdPath, UserIdsRequest, UserResult
from recfleet.shared.messages import Job, new_id

router = APIRouter(tags=["playlists"], route_class=OrjsonRoute)


@router.get(
    "/api/playlist/{user_id}",
    response_model=UserResult,
    dependencies=[Security(require(Role.READ))],
    responses={404: {"model": Problem}},
)
async def get_playlists(user_id: UserIdPath, results: ResultsDep) -> Response:
    """The user's ranked playlists, best first; 404 when no result was written yet."""
    result = await results.read(user_id)
    if result is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no recommendations for user {user_id}")
    # The hottest route: serialise once with orjson instead of validating the model again.
    return Response(orjson.dumps(result.model_dump()), media_type="application/json")


@router.post(
    "/api/playlist/recommend/",
    response_model=list[SyncResult],
    dependencies=[Security(require(Role.SUBMIT))],
    responses={413: {"model": Problem}, 503: {"model": Problem}, 504: {"model": Problem}},
)
async def recommend_now(
    body: UserIdsRequest, s: SettingsDep, results: ResultsDep, sync: SyncDep
) -> list[SyncResult]:
    """Rank a few users now, through the fleet (served ahead of batch jobs). The results
    are also written into the current generation, so later reads return them too."""
    if len(body.user_ids) > s.max_users_sync:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"{len(body.user_ids)} user ids; at most {s.max_users_sync} per synchronous "
            "request (use POST /api/playlist/beta_recommend/ for more)",
        )
    user_ids = list(dict.fromkeys(body.user_ids))
    job = Job(
        job_id=f"sync-{new_id()}",
        batch_id=f"sync-{new_id()}",
        user_ids=user_ids,
        created_at=time.time(),
        generation=await results.generations.current(),
    )
    answer = await sync.request(job)  # SyncTimeout (504), BrokerUnavailable (503)
    return [SyncResult(**row) for row in answer]
