"""The promise every fault test checks.

Every user of every batch the gateway accepted ends with a result in the batch's
generation keyspace, or sits in a job in the dead-letter queue. Nothing is lost, and a
job delivered twice changes nothing (results equal a direct ranking, each job is counted
once in its ledger).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis

from recfleet.shared.codec import HEADER, encode_results, model_tag
from recfleet.shared.errors import UndecodableMessage
from recfleet.shared.keys import Keys
from recfleet.shared.ledger import LedgerStatus
from recfleet.shared.messages import decode_job
from recfleet.shared.settings import Settings
from recfleet.shared.topology import HEADER_BATCH_ID
from tests.support.queues import read_queue


@dataclass
class DeadLetter:
    job_id: str | None
    batch_id: str | None
    user_ids: list[int] | None  # None when the body does not decode
    body: bytes


def dead_letters(settings: Settings) -> list[DeadLetter]:
    """Everything in the dead-letter queue, left in place."""
    out = []
    for body, props in read_queue(settings, settings.dead_letter_queue):
        try:
            users: list[int] | None = decode_job(body).user_ids
        except UndecodableMessage:
            users = None
        batch_id = (props.headers or {}).get(HEADER_BATCH_ID)
        out.append(DeadLetter(props.message_id, batch_id, users, body))
    return out


@functools.cache
def _direct(
    artifacts: Path, top_k: int, users: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, int]:
    """Rank ``users`` directly (no broker, no Redis): external ids, cold flags, model tag."""
    from recfleet.shared.artifacts import load_artifacts
    from recfleet.worker.ranking import Ranker

    art = load_artifacts(artifacts)
    ranked = Ranker.from_artifacts(art, k=top_k).rank(art.user_rows(np.asarray(users)))
    rows = ranked.playlists
    external = np.where(rows >= 0, art.playlist_ids[np.maximum(rows, 0)], -1)
    return external, ranked.cold, model_tag(art.model_version)


@dataclass
class Tally:
    users: int = 0  # users in accepted batches
    results: int = 0
    lost: int = 0
    dlq: int = 0
    dead_jobs: int = 0
    wrong: int = 0  # results that differ from a direct ranking
    problems: list[str] = field(default_factory=list)


def check_invariant(
    settings: Settings,
    accepted: Mapping[str, Sequence[int]],
    dead: Sequence[DeadLetter] | None = None,
) -> Tally:
    """Check every accepted batch: each user has a result equal to a direct ranking or
    sits in a dead-lettered job; the ledger counts every job exactly once."""
    dead = dead_letters(settings) if dead is None else dead
    dead_ids = {d.job_id for d in dead}
    tally = Tally(dead_jobs=len(dead))
    keys = Keys(settings.redis_prefix)
    client = redis.Redis.from_url(str(settings.redis_url))
    try:
        for batch_id, users in accepted.items():
            stored = _read_results(client, keys, batch_id, users)
            _check_results(settings, batch_id, users, stored, dead_ids, tally)
            _check_ledger(client, keys, batch_id, len(users), tally)
    finally:
        client.close()
    return tally


def _read_results(
    client: redis.Redis, keys: Keys, batch_id: str, users: Sequence[int]
) -> list[bytes | None]:
    buckets = sorted({keys.result_bucket(batch_id, u) for u in users})
    with client.pipeline(transaction=False) as pipe:
        for key in buckets:
            pipe.hgetall(key)
        by_key = dict(zip(buckets, pipe.execute(), strict=True))
    return [
        by_key[keys.result_bucket(batch_id, u)].get(str(keys.result_field(u)).encode())
        for u in users
    ]


def _check_results(
    settings: Settings,
    batch_id: str,
    users: Sequence[int],
    stored: list[bytes | None],
    dead_ids: set[str | None],
    tally: Tally,
) -> None:
    present = [raw for raw in stored if raw is not None]
    if present:
        generated_at = HEADER.unpack_from(present[0])[1]
        external, cold, tag = _direct(settings.artifacts, settings.top_k, tuple(users))
        expected = encode_results(external, cold, generated_at, tag)
    for pos, raw in enumerate(stored):
        tally.users += 1
        if raw is not None:
            tally.results += 1
            if raw != expected[pos]:
                tally.wrong += 1
        elif f"{batch_id}-{pos // settings.job_size}" in dead_ids:
            tally.dlq += 1
        else:
            tally.lost += 1


def _check_ledger(client: redis.Redis, keys: Keys, batch_id: str, users: int, tally: Tally) -> None:
    status = LedgerStatus.parse(batch_id, client.hgetall(keys.batch(batch_id))).document()
    done = client.scard(keys.batch_done(batch_id))
    dead = client.scard(keys.batch_dead(batch_id))
    problems = []
    if status["state"] not in ("done", "failed"):
        problems.append(f"state {status['state']}")
    if (status["jobs_done"], status["jobs_dead"]) != (done, dead):
        problems.append(
            f"jobs counted {status['jobs_done']}+{status['jobs_dead']}, sets {done}+{dead}"
        )
    if status["jobs_done"] + status["jobs_dead"] != status["jobs_total"]:
        problems.append(
            f"{status['jobs_done']}+{status['jobs_dead']} of {status['jobs_total']} jobs"
        )
    if (
        status["users_done"] + status["users_dead"] != status["users_total"]
        or status["users_total"] != users
    ):
        problems.append(
            f"users {status['users_done']}+{status['users_dead']} of {status['users_total']}"
        )
    tally.problems += [f"batch {batch_id}: {p}" for p in problems]


def assert_invariant(tally: Tally) -> None:
    assert tally.lost == 0, f"{tally.lost} users lost"
    assert tally.wrong == 0, f"{tally.wrong} results differ from a direct ranking"
    assert not tally.problems, tally.problems
