"""Bounded storage: prune deletes rejected and retired runs; everything else expires;
ten simulated days stay flat."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from click.testing import CliRunner
from pydantic import RedisDsn

from recfleet.cli.fleet import settings_env
from recfleet.cli.main import cli
from recfleet.shared.generations import activate
from recfleet.shared.keys import BASE, Keys
from recfleet.shared.messages import Job, new_id
from recfleet.shared.retention import prune, usage
from recfleet.shared.settings import Settings, get_settings
from recfleet.worker.handler import JobHandler
from recfleet.worker.models import ModelStore
from tests.support.generations import handle_queued, run_batch
from tests.support.generations import private_redis as redis_server
from tests.support.net import free_port


def _sync_job(users: list[int]) -> Job:
    """What POST /api/playlist/recommend/ sends a worker: a job with no ledger."""
    return Job(job_id=f"sync-{new_id()}", batch_id=f"sync-{new_id()}", user_ids=users,
               created_at=time.time())  # fmt: skip


def _generations_with_results(client: redis.Redis, keys: Keys) -> set[str]:
    return {keys.generation_of(k.decode()) for k in client.scan_iter(keys.result_pattern())}


async def test_prune_deletes_rejected_and_retired_runs(
    handler: JobHandler, fleet_api: httpx.AsyncClient, fleet_settings: Settings
) -> None:
    keys, ttl = Keys(fleet_settings.redis_prefix), fleet_settings.batch_ttl_s
    for name in ("g1", "g2", "g3"):
        run_batch(handler, name, list(range(200)))
    run_batch(handler, "cold", list(range(10**9, 10**9 + 200)))  # rejected: all cold
    run_batch(handler, "running", list(range(200)), last=False)  # still pending
    assert activate(handler.redis, keys, "g2", ttl) == ["g3"]  # g3 retired by a rollback
    handler.redis.zrem(keys.runs, "g1")  # as if written before the runs set existed

    assert sorted(prune(handler.redis, keys, 1, ttl)) == ["cold", "g1", "g3"]
    assert _generations_with_results(handler.redis, keys) == {"g2", "running"}
    assert (await fleet_api.get("/api/playlist/7")).json()["generation"] == "g2"
    with pytest.raises(ValueError, match="pruned"):
        activate(handler.redis, keys, "g3", ttl)
    assert prune(handler.redis, keys, 1, ttl) == []  # nothing left to do


async def test_ledgers_idempotency_records_open_batches_and_live_results_expire(
    handler: JobHandler, fleet_api: httpx.AsyncClient, fleet_settings: Settings
) -> None:
    keys, s = Keys(fleet_settings.redis_prefix), fleet_settings
    opened = (await fleet_api.post("/api/batches")).json()["batch_id"]
    assert 0 < handler.redis.ttl(keys.batch(opened)) <= s.open_batch_ttl_s  # empty: brief
    await fleet_api.post("/beta_recommend", json={"user_ids": [1], "batch_id": opened})
    assert s.open_batch_ttl_s < handler.redis.ttl(keys.batch(opened)) <= s.batch_ttl_s

    headers = {"Idempotency-Key": "retention-1"}
    plain = await fleet_api.post("/beta_recommend", json={"user_ids": [2]}, headers=headers)
    assert 0 < handler.redis.ttl(keys.batch(plain.json()["batch_id"])) <= s.batch_ttl_s
    (idem,) = handler.redis.scan_iter(match=keys.idempotency("*"))
    assert 0 < handler.redis.ttl(idem) <= s.idempotency_window_s

    handle_queued(handler, s)  # no generation yet: ad-hoc results go to live
    handler.handle(_sync_job([3]))
    live = {keys.result_bucket(BASE, uid) for uid in (1, 2, 3)}
    assert all(0 < handler.redis.ttl(key) <= s.batch_ttl_s for key in live)

    run_batch(handler, "run", list(range(300)))  # a run's keyspace lives until pruned
    handler.handle(_sync_job([4]))
    assert handler.redis.ttl(keys.result_bucket("run", 4)) == -1


def test_usage_and_the_generations_cli(
    handler: JobHandler, fleet_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = Keys(fleet_settings.redis_prefix)
    handler.handle(_sync_job([5000, 5001]))
    run_batch(handler, "big", list(range(1000)))
    found = usage(handler.redis, keys)
    assert (found["big"].users, found["big"].keys) == (1000, 8)
    assert found[BASE].users == 2 and found["big"].bytes > found[BASE].bytes > 0

    for name, value in settings_env(fleet_settings).items():
        if name.startswith("RECFLEET_"):
            monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        listed = CliRunner().invoke(cli, ["generations", "list"])
        pruned = CliRunner().invoke(cli, ["generations", "prune", "--keep", "1"])
    finally:
        get_settings.cache_clear()
    assert listed.exit_code == 0, listed.output
    assert "* big" in listed.output and "users       1000" in listed.output
    assert "live  base" in listed.output and "users          2" in listed.output
    assert pruned.exit_code == 0 and "deleted the results of 0 runs" in pruned.output


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis of this test alone, so that used_memory measures only what the test wrote."""
    with redis_server(tmp_path, free_port()) as url:
        yield url


def _used_memory(client: redis.Redis) -> int:
    """used_memory once lazy frees (UNLINK) have finished."""
    for _ in range(200):
        info = client.info("memory")
        if not info.get("lazyfree_pending_objects"):
            return int(info["used_memory"])
        time.sleep(0.01)
    raise AssertionError("lazy frees did not finish")


def test_ten_days_of_runs_ad_hoc_batches_and_prune_stay_flat(
    fleet_settings: Settings, private_redis: str
) -> None:
    s = fleet_settings.model_copy(
        update={"redis_url": RedisDsn(private_redis), "gate_max_cold_fraction": 1.0}
    )  # the small artifacts know 6 000 users: the other 14 000 get the cold fallback
    client = redis.Redis.from_url(private_redis)
    handler = JobHandler(s, ModelStore(s.artifacts, k=s.top_k), client)
    keys, rng = Keys(s.redis_prefix), random.Random(0)
    users = list(range(20_000))
    handler.handle(_sync_job([1, 2]))  # before the first run: into live
    curve = []
    for day in range(1, 11):
        run_batch(handler, f"day{day}", users, job_size=1000)
        for i in range(3):
            run_batch(handler, f"adhoc{day}-{i}", rng.sample(users, 50), run=False)
        handler.handle(_sync_job(rng.sample(users, 5)))
        prune(client, keys, 2, s.batch_ttl_s)
        curve.append(_used_memory(client))
    kept = _generations_with_results(client, keys)
    client.close()
    print("used_memory by day:", curve)  # the figure quoted in the docs
    assert kept == {"day9", "day10", BASE}
    assert abs(curve[9] - curve[2]) <= 0.10 * curve[2], curve
