"""One user's current recommendations, read from the active generations in Redis."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status

from api.deps import ClientsDep
from api.schemas import Problem, UserResult
from shared.messages import MAX_USER_ID

router = APIRouter(tags=["playlists"])


@router.get(
    "/api/playlist/{user_id}", response_model=UserResult, responses={404: {"model": Problem}}
)
async def get_playlists(
    user_id: Annotated[int, Path(ge=0, le=MAX_USER_ID)], clients: ClientsDep
) -> UserResult:
    """The user's ranked playlists, best first; 404 when no result was written yet."""
    result = await clients.results.read(user_id)
    if result is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no recommendations for user {user_id}")
    return result
