"""Request and response bodies of the public HTTP contract."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from recfleet.shared.messages import ID_PATTERN, UserId


class UserIdsRequest(BaseModel):
    """A list of user ids. Integers only (no strings, floats or booleans), 0 ≤ id < 2**63."""

    model_config = ConfigDict(extra="forbid")

    user_ids: list[UserId] = Field(min_length=1, description="user ids to rank")


class BatchRequest(UserIdsRequest):
    """Users to rank; with ``batch_id``, appended to a batch opened by ``POST /api/batches``."""

    batch_id: str | None = Field(
        default=None, pattern=ID_PATTERN, description="an open batch to append these users to"
    )
    run: StrictBool = Field(
        default=False,
        description="without batch_id: the request is a whole declared run (a new "
        "generation, made current when complete and past its gates); otherwise ad-hoc",
    )

    @model_validator(mode="after")
    def _run_is_declared_when_opened(self) -> BatchRequest:
        if self.run and self.batch_id is not None:
            raise ValueError("run is declared when the batch is opened (POST /api/batches)")
        return self


class BatchOpen(BaseModel):
    """Options of a batch opened for appending."""

    model_config = ConfigDict(extra="forbid")

    run: StrictBool = Field(
        default=False,
        description="a declared run: its own generation, made current for every reader "
        "at once when sealed, complete and past its gates; otherwise ad-hoc: each job's "
        "results go into the current generation as it finishes",
    )


class BatchOpened(BaseModel):
    batch_id: str
    run: bool = False


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
    run: bool = Field(description="a declared run (its own generation), else ad-hoc")
    gen_state: str = Field(
        description="a run: pending | active | rejected | retired; any other batch: ad-hoc"
    )
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
    generation: str = Field(
        description="the generation (declared run, or live) the result was read from"
    )


class SyncResult(BaseModel):
    user_id: int
    playlists: list[int]


class Problem(BaseModel):
    detail: str
