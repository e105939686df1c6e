"""One user's current recommendations, read from the active generations in Redis."""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException, Request, Response, Security, status

from recfleet.api.auth import BEARER_OPENAPI, Role, authorize, require
from recfleet.api.deps import SettingsDep, SyncDep
from recfleet.api.limits import OrjsonRoute
from recfleet.api.results import ResultReader
from recfleet.api.schemas import Problem, SyncResult, UserIdPath, UserIdsRequest, UserResult
from recfleet.shared.messages import Job, new_id

router = APIRouter(tags=["playlists"], route_class=OrjsonRoute)


@router.get(
    "/api/playlist/{user_id}",
    response_model=UserResult,
    responses={404: {"model": Problem}},
    openapi_extra=BEARER_OPENAPI,
)
async def get_playlists(user_id: UserIdPath, request: Request) -> Response:
    """The user's ranked playlists, best first, from the newest active generation that
    has a result for them; 404 when none has. Needs a key with the read role."""
    authorize(request, Role.READ)  # in the route: a dependency costs more than the read
    # The hottest route: one Redis call, the document serialised once by orjson (no model
    # built, no response model validation), and the reader taken from the app state (what
    # ResultsDep does) without one more dependency to solve on every request.
    results: ResultReader = request.app.state.results
    body = await results.read_json(user_id)
    if body is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no recommendations for user {user_id}")
    return Response(body, media_type="application/json")


@router.post(
    "/api/playlist/recommend/",
    response_model=list[SyncResult],
    dependencies=[Security(require(Role.SUBMIT))],
    responses={413: {"model": Problem}, 503: {"model": Problem}, 504: {"model": Problem}},
)
async def recommend_now(body: UserIdsRequest, s: SettingsDep, sync: SyncDep) -> list[SyncResult]:
    """Rank a few users now, through the fleet (served ahead of batch jobs). Like any
    ad-hoc batch, the results are also written into the current generation (``live``
    while none is), so later reads return them too."""
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
    )
    answer = await sync.request_routed(job)  # SyncTimeout (504), BrokerUnavailable (503)
    return [SyncResult(**row) for row in answer]
