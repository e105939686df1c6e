"""Submit test batches through the gateway and follow them through their ledgers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import redis

from recfleet.cli.fleet import LocalFleet
from recfleet.shared.keys import Keys
from recfleet.shared.ledger import LedgerStatus
from recfleet.shared.settings import Settings
from tests.support.polling import wait_until

# The users of every test batch: the small artifacts know 0..5999; the rest are cold.
BATCH_USERS = list(range(8000))


def post_batch(
    base_url: str, user_ids: Sequence[int], *, client: httpx.Client | None = None
) -> httpx.Response:
    # A declared run: its results stay in its own keyspace, where the invariant looks.
    body = {"user_ids": list(user_ids), "run": True}
    if client is not None:
        return client.post("/api/playlist/beta_recommend/", json=body)
    return httpx.post(f"{base_url}/api/playlist/beta_recommend/", json=body, timeout=30)


def submit_batches(
    base_url: str, count: int, users: Sequence[int] = BATCH_USERS
) -> dict[str, list[int]]:
    """Submit ``count`` batches of ``users``; every one must be accepted."""
    accepted: dict[str, list[int]] = {}
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for _ in range(count):
            resp = post_batch(base_url, users, client=client)
            assert resp.status_code == 202, resp.text
            accepted[resp.json()["batch_id"]] = list(users)
    return accepted


@dataclass
class Progress:
    jobs_total: int
    jobs_finished: int
    users_total: int
    users_finished: int

    @property
    def complete(self) -> bool:
        return self.jobs_finished >= self.jobs_total

    @property
    def fraction(self) -> float:
        return self.users_finished / max(self.users_total, 1)


def progress(settings: Settings, batch_ids: Sequence[str]) -> Progress:
    """Progress of the batches, read from their ledgers in Redis (the gateway may be down)."""
    keys = Keys(settings.redis_prefix)
    client = redis.Redis.from_url(str(settings.redis_url), socket_timeout=5)
    try:
        with client.pipeline(transaction=False) as pipe:
            for batch_id in batch_ids:
                pipe.hgetall(keys.batch(batch_id))
            ledgers = [
                LedgerStatus.parse(b, f) for b, f in zip(batch_ids, pipe.execute(), strict=True)
            ]
    finally:
        client.close()
    return Progress(
        jobs_total=sum(s.jobs_total for s in ledgers),
        jobs_finished=sum(s.jobs_done + s.jobs_dead for s in ledgers),
        users_total=sum(s.users_total for s in ledgers),
        users_finished=sum(s.users_done + s.users_dead for s in ledgers),
    )


def safe_progress(settings: Settings, batch_ids: Sequence[str]) -> Progress | None:
    try:
        return progress(settings, batch_ids)
    except redis.RedisError:
        return None


def wait_fraction(
    settings: Settings, batch_ids: Sequence[str], at_least: float, timeout: float = 60
) -> Progress:
    """Wait until at least this fraction of the batches' users is finished; the batches
    must not be complete yet (else the fault would land after the work)."""
    found: list[Progress] = []

    def reached() -> bool:
        p = safe_progress(settings, batch_ids)
        if p is not None and p.fraction >= at_least:
            found.append(p)
            return True
        return False

    wait_until(reached, timeout, f"{at_least:.0%} of the users to finish")
    assert not found[0].complete, "the batches finished before the fault: make them bigger"
    return found[0]


def wait_complete(settings: Settings, batch_ids: Sequence[str], timeout: float = 120) -> None:
    def complete() -> bool:
        p = safe_progress(settings, batch_ids)
        return p is not None and p.complete

    wait_until(complete, timeout, "every batch to complete")


def under_way(
    fleet: LocalFleet, count: int = 50, at: float = 0.1
) -> tuple[dict[str, list[int]], Progress]:
    """Start the fleet's gateway, submit ``count`` batches, then start its workers and
    wait until every one consumes and the fraction ``at`` of the users is finished: the
    moment a fault test strikes. The work is queued first, so that the fault lands in the
    middle of it however fast the workers are (they keep pace with the POSTs). Returns
    the accepted batches and their progress then."""
    fleet.start_gateway()
    batches = submit_batches(fleet.base_url, count)
    fleet.start_workers(wait_consuming=False)
    wait_until(fleet.workers_consuming, 120, "every worker to consume")
    return batches, wait_fraction(fleet.settings, list(batches), at)
