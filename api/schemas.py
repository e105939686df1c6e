"""Request and response bodies of the public HTTP contract."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field
from pydantic_core import PydanticCustomError

from recfleet.shared.messages import ID_PATTERN, MAX_USER_ID, ClosedModel, UserId


def check_user_ids(value: Any) -> Any:
    """Refuse a list with a bad id at its FIRST bad element, with one error.

    One tight pass over the list, so a body of a million bad ids costs what reading it
    costs; pydantic's own item validation (which would record an error per element) then
    only ever sees valid ids.
    """
    if not isinstance(value, list):
        return value  # pydantic says it is not a list
    for i, uid in enumerate(value):
        if type(uid) is not int:
            raise PydanticCustomError(
                "int_type", "user_ids[{i}]: Input should be a valid integer", {"i": i}
            )
        if uid < 0:
            raise PydanticCustomError(
                "greater_than_equal",
                "user_ids[{i}]: Input should be greater than or equal to 0",
                {"i": i},
            )
        if uid > MAX_USER_ID:
            raise PydanticCustomError(
                "less_than_equal",
                "user_ids[{i}]: Input should be less than or equal to {max}",
                {"i": i, "max": MAX_USER_ID},
            )
    return value


class UserIdsRequest(ClosedModel):
    """A list of user ids. Integers only (no strings, floats or booleans), 0 ≤ id < 2**63."""

    user_ids: Annotated[list[UserId], BeforeValidator(check_user_ids)] = Field(
        min_length=1, description="user ids to rank"
    )


class BatchRequest(UserIdsRequest):
    """Users to rank; with ``batch_id``, appended to a batch opened by ``POST /api/batches``."""

    batch_id: str | None = Field(
        default=None, pattern=ID_PATTERN, description="an open batch to append these users to"
    )


class BatchOpened(BaseModel):
    batch_id: str


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
    sealed: bool = Field(description="false while users may still be appended")
    gen_state: str = Field(description="pending | active (current) | rejected | retired")
    gen_reason: str | None = Field(description="why the batch was not made current")
    activated_at: float | None
    model_version: str | None = Field(description="the model pinned by the first job")
    failed_user_ids: list[int] | None = Field(
        default=None, description="users of dead-lettered jobs (with ?failed_users=true)"
    )
    failed_user_ids_truncated: bool | None = None
    recommended_by_popularity: dict[str, int] = Field(
        default_factory=dict, description="recommended playlists per popularity-rank bucket"
    )


class UserResult(BaseModel):
    user_id: int
    playlists: list[int]
    model_version: str
    generated_at: float
    cold: bool
    generation: str = Field(description="the batch whose run produced this result")


class SyncResult(BaseModel):
    user_id: int
    playlists: list[int]


class Problem(BaseModel):
    detail: str
