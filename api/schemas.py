"""Request and response bodies of the public HTTP contract."""

from __future__ import annotations

import itertools
import operator
from typing import Annotated, Any, NoReturn

import numpy as np
from fastapi import Path
from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    PlainValidator,
    StrictBool,
    model_validator,
)
from pydantic_core import PydanticCustomError

from recfleet.shared.messages import ID_PATTERN, MAX_USER_ID, ClosedModel, UserId


def check_user_ids(value: Any) -> list[int]:
    """The ids, or ONE error naming the first bad element.

    C-speed passes only (a map over the element types, then numpy over the values), so a
    body of a million ids, good or bad, costs a few milliseconds and never a
    per-element error record. Replaces pydantic's item validation, which would record
    an error per bad element and cost ten times as much on a good list.
    """
    if not isinstance(value, list):
        raise PydanticCustomError("list_type", "Input should be a valid list")
    if not value:
        raise PydanticCustomError("too_short", "List should have at least 1 item, not 0")
    if type(value[0]) is not int:  # a list of junk is refused without a pass over it
        raise PydanticCustomError("int_type", "user_ids[0]: Input should be a valid integer")
    types = list(map(type, value))
    if types.count(int) != len(types):
        first = list(map(operator.is_not, types, itertools.repeat(int))).index(True)
        raise PydanticCustomError(
            "int_type", "user_ids[{i}]: Input should be a valid integer", {"i": first}
        )
    try:
        ids = np.fromiter(value, dtype=np.int64, count=len(value))
    except OverflowError:  # beyond 64 bits either way: find the first, once
        first = next(i for i, uid in enumerate(value) if not -(2**63) <= uid <= MAX_USER_ID)
        _out_of_range(first, value[first])
    negative = np.flatnonzero(ids < 0)
    if len(negative):
        _out_of_range(int(negative[0]), -1)
    return value


def _out_of_range(i: int, uid: int) -> NoReturn:
    if uid < 0:
        raise PydanticCustomError(
            "greater_than_equal",
            "user_ids[{i}]: Input should be greater than or equal to 0",
            {"i": i},
        )
    raise PydanticCustomError(
        "less_than_equal",
        "user_ids[{i}]: Input should be less than or equal to {max}",
        {"i": i, "max": MAX_USER_ID},
    )


def strict_digits(value: Any) -> Any:
    """A path id is ASCII digits and nothing else: ``5.0``, ``+5``, `` 5``, ``5_0`` and
    other digit scripts are refused, where int() would take them."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit() and len(value) < 20):
        raise PydanticCustomError("int_parsing", "Input should be a whole number in ASCII digits")
    return value


UserIdPath = Annotated[int, BeforeValidator(strict_digits), Path(ge=0, le=MAX_USER_ID)]


class UserIdsRequest(ClosedModel):
    """A list of user ids. Integers only (no strings, floats or booleans), 0 ≤ id < 2**63."""

    user_ids: Annotated[
        list[int],
        PlainValidator(
            check_user_ids,
            json_schema_input_type=Annotated[list[UserId], Field(min_length=1)],
        ),
    ] = Field(description="user ids to rank")


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


class BatchOpen(ClosedModel):
    """Options of a batch opened for appending."""

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
