"""The job schema, splitting and decoding."""

from __future__ import annotations

import orjson
import pytest

from recfleet.shared.errors import UndecodableMessage
from recfleet.shared.messages import SCHEMA_VERSION, Job, decode_job, make_jobs, new_id


def test_split_into_jobs_of_at_most_job_size_in_order() -> None:
    ids = list(range(2501))
    jobs = make_jobs("b1", ids, 1000)
    assert [len(j.user_ids) for j in jobs] == [1000, 1000, 501]
    assert [u for j in jobs for u in j.user_ids] == ids
    assert [j.job_id for j in jobs] == ["b1-0", "b1-1", "b1-2"]
    assert len({j.created_at for j in jobs}) == 1


def test_round_trip() -> None:
    job = make_jobs(new_id(), [5, 2**63 - 1, 0], 1000)[0]
    assert decode_job(job.encode()) == job


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"schema_version": 99}', "schema_version 99"),
        (orjson.dumps({"schema_version": SCHEMA_VERSION, "job_id": "a"}), "invalid job"),
        (
            orjson.dumps(
                {
                    "schema_version": SCHEMA_VERSION,
                    "job_id": "a",
                    "batch_id": "b",
                    "user_ids": ["1"],
                    "created_at": 1.0,
                }
            ),
            "invalid job",
        ),
        (
            orjson.dumps(
                {
                    "schema_version": SCHEMA_VERSION,
                    "job_id": "a:b",
                    "batch_id": "b",
                    "user_ids": [1],
                    "created_at": 1.0,
                }
            ),
            "invalid job",
        ),
    ],
)
def test_undecodable_keeps_raw_bytes(body: bytes, reason: str) -> None:
    with pytest.raises(UndecodableMessage) as info:
        decode_job(body)
    assert reason in str(info.value)
    assert info.value.raw == body


def test_job_refuses_more_than_1000_users() -> None:
    with pytest.raises(ValueError, match="1000"):
        Job(job_id="a", batch_id="b", user_ids=list(range(1001)), created_at=1.0)
