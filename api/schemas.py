"""Request and response bodies of the public HTTP contract."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from shared.messages import UserId


class UserIdsRequest(BaseModel):
    """A list of user ids. Integers only (no strings, floats or booleans), 0 ≤ id < 2**63."""

    model_config = ConfigDict(extra="forbid")

    user_ids: list[UserId] = Field(min_length=1, description="user ids to rank")


class BatchAccepted(BaseModel):
    batch_id: str
    jobs: int
    users: int = Field(description="distinct users queued (duplicates in the request are dropped)")
    duplicates: int = Field(description="ids dropped because they repeated an earlier one")


class BatchStatus(BaseModel):
    batch_id: str
    state: str = Field(description="queued | running | done | failed")
    jobs_total: int
    jobs_done: int
    jobs_dead: int
    users_total: int
    users_done: int
    users_dead: int
    cold_users: int
    created_at: float
    first_done_at: float | None
    last_done_at: float | None
    users_per_s: float | None
    eta_s: float | None


class UserResult(BaseModel):
    user_id: int
    playlists: list[int]
    model_version: str
    generated_at: float
    cold: bool


class Problem(BaseModel):
    detail: str
