"""One user's current recommendations, read straight from Redis."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status

from api.deps import Clients, ClientsDep
from api.schemas import Problem, UserResult
from shared.messages import MAX_USER_ID
from shared.store import decode_result

router = APIRouter(tags=["playlists"])


async def model_version(clients: Clients, tag: int) -> str:
    """Resolve a model tag; cached in-process since there are only a handful of versions."""
    version = clients.model_versions.get(tag)
    if version is None:
        raw = await clients.redis.hget(clients.keys.models, str(tag))
        version = raw.decode() if raw else f"unknown-{tag:08x}"
        if raw:
            clients.model_versions[tag] = version
    return version


@router.get(
    "/api/playlist/{user_id}", response_model=UserResult, responses={404: {"model": Problem}}
)
async def get_playlists(
    user_id: Annotated[int, Path(ge=0, le=MAX_USER_ID)], clients: ClientsDep
) -> UserResult:
    """The user's ranked playlists, best first; 404 when no result was written yet."""
    raw = await clients.redis.hget(clients.keys.bucket_of(user_id), str(user_id))
    if raw is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no recommendations for user {user_id}")
    result = decode_result(raw)
    return UserResult(
        user_id=user_id,
        playlists=result.playlists,
        model_version=await model_version(clients, result.model_tag),
        generated_at=result.generated_at,
        cold=result.cold,
    )
