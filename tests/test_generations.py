"""Generations: the atomic switch, gates, rollback, prune, Cluster-safe keys, open batches."""

from __future__ import annotations

import httpx
import pytest
from redis.crc import key_slot

from recfleet.shared.generations import (
    activate,
    finalize_steps,
    history,
    prune,
    run_steps,
)
from recfleet.shared.keys import Keys
from recfleet.shared.ledger import new_batch_fields
from recfleet.shared.messages import make_jobs
from recfleet.shared.settings import Settings
from recfleet.worker.handler import JobHandler


def run_batch(handler: JobHandler, batch_id: str, users: list[int], *, last: bool = True) -> None:
    """Create a sealed batch and handle its jobs (all, or all but the last)."""
    jobs = make_jobs(batch_id, users, 100)
    handler.redis.hset(
        Keys(handler.settings.redis_prefix).batch(batch_id),
        mapping=new_batch_fields(len(jobs), len(users)),
    )
    for job in jobs if last else jobs[:-1]:
        handler.handle(job)


async def test_readers_see_the_old_generation_until_the_new_one_is_complete(
    handler: JobHandler, fleet_api: httpx.AsyncClient, fleet_settings: Settings
) -> None:
    run_batch(handler, "day1", list(range(300)))
    first = (await fleet_api.get("/api/playlist/5")).json()
    assert first["generation"] == "day1"

    run_batch(handler, "day2", list(range(300)), last=False)  # two of three jobs done
    for uid in (5, 150, 299):
        assert (await fleet_api.get(f"/api/playlist/{uid}")).json()["generation"] == "day1"
    status = (await fleet_api.get("/api/batches/day2")).json()
    assert status["state"] == "running" and status["gen_state"] == "pending"

    (last_job,) = make_jobs("day2", list(range(300)), 100)[2:]
    handler.handle(last_job)
    for uid in (5, 150, 299):
        assert (await fleet_api.get(f"/api/playlist/{uid}")).json()["generation"] == "day2"
    status = (await fleet_api.get("/api/batches/day2")).json()
    assert status["gen_state"] == "active" and status["model_version"]


async def test_users_left_out_keep_their_last_result(
    handler: JobHandler, fleet_api: httpx.AsyncClient
) -> None:
    run_batch(handler, "full", list(range(300)))
    run_batch(handler, "partial", list(range(100)))
    assert (await fleet_api.get("/api/playlist/50")).json()["generation"] == "partial"
    assert (await fleet_api.get("/api/playlist/250")).json()["generation"] == "full"
    assert (await fleet_api.get("/api/playlist/999999")).status_code == 404


async def test_a_failed_gate_leaves_the_old_generation_current(
    handler: JobHandler, fleet_api: httpx.AsyncClient, fleet_settings: Settings
) -> None:
    run_batch(handler, "good", list(range(200)))
    unknown = list(range(10**9, 10**9 + 200))  # every user cold
    run_batch(handler, "cold", unknown)
    status = (await fleet_api.get("/api/batches/cold")).json()
    assert status["state"] == "done" and status["gen_state"] == "rejected"
    assert "cold" in status["gen_reason"]
    assert (await fleet_api.get("/api/playlist/10")).json()["generation"] == "good"
    assert (await fleet_api.get(f"/api/playlist/{10**9}")).status_code == 404
    keys = Keys(fleet_settings.redis_prefix)
    assert [name for name, _ in history(handler.redis, keys)] == ["good"]


async def test_rollback_and_prune(
    handler: JobHandler, fleet_api: httpx.AsyncClient, fleet_settings: Settings
) -> None:
    keys = Keys(fleet_settings.redis_prefix)
    for name in ("g1", "g2", "g3"):
        run_batch(handler, name, list(range(200)))
    assert [n for n, _ in history(handler.redis, keys)] == ["g3", "g2", "g1"]

    assert activate(handler.redis, keys, "g2") == ["g3"]
    assert [n for n, _ in history(handler.redis, keys)] == ["g2", "g1"]
    assert (await fleet_api.get("/api/playlist/7")).json()["generation"] == "g2"
    assert handler.redis.hget(keys.batch("g3"), "gen_state") == b"retired"

    assert prune(handler.redis, keys, keep=1) == ["g1"]
    gen_keys = Keys(fleet_settings.redis_prefix)
    assert list(handler.redis.scan_iter(match=gen_keys.result_pattern("g1"))) == []
    assert list(handler.redis.scan_iter(match=gen_keys.result_pattern("g2")))
    assert (await fleet_api.get("/api/playlist/7")).json()["generation"] == "g2"
    with pytest.raises(ValueError, match="no batch"):
        activate(handler.redis, keys, "nope")


async def test_open_append_seal_over_http(
    handler: JobHandler, fleet_api: httpx.AsyncClient, fleet_settings: Settings
) -> None:
    batch_id = (await fleet_api.post("/api/batches")).json()["batch_id"]
    for part in (list(range(0, 150)), list(range(150, 250))):
        resp = await fleet_api.post(
            "/beta_recommend", json={"user_ids": part, "batch_id": batch_id}
        )
        assert resp.status_code == 202 and resp.json()["batch_id"] == batch_id
    status = (await fleet_api.get(f"/api/batches/{batch_id}")).json()
    assert status["sealed"] is False and status["jobs_total"] == 2  # job size 1000

    # The workers finish everything before the seal: the seal itself runs the switch.
    from recfleet.shared.messages import decode_job
    from tests.test_api import _get_all

    for _, body in _get_all(fleet_settings):
        handler.handle(decode_job(body))
    assert (await fleet_api.get(f"/api/batches/{batch_id}")).json()["state"] == "running"
    sealed = (await fleet_api.post(f"/api/batches/{batch_id}/seal")).json()
    assert sealed["state"] == "done" and sealed["gen_state"] == "active"
    assert (await fleet_api.get("/api/playlist/200")).json()["generation"] == batch_id

    late = await fleet_api.post("/beta_recommend", json={"user_ids": [1], "batch_id": batch_id})
    assert late.status_code == 409
    missing = await fleet_api.post("/beta_recommend", json={"user_ids": [1], "batch_id": "nope"})
    assert missing.status_code == 404


def test_finalize_is_idempotent(handler: JobHandler, fleet_settings: Settings) -> None:
    run_batch(handler, "once", list(range(100)))
    keys = Keys(fleet_settings.redis_prefix)
    before = history(handler.redis, keys)
    assert run_steps(handler.redis, finalize_steps("once", fleet_settings, keys)) is None
    assert history(handler.redis, keys) == before


def test_multi_key_operations_stay_in_one_cluster_slot() -> None:
    keys = Keys("rf")
    for batch in ("a", "0123456789abcdef0123456789abcdef"):
        slots = {
            key_slot(k.encode())
            for k in (keys.batch(batch), keys.batch_done(batch), keys.batch_dead(batch))
        }
        assert len(slots) == 1
    gen = Keys("rf")
    result_slots = {
        key_slot(gen.result_bucket("g", uid).encode()) for uid in range(0, 128 * 500, 128)
    }
    assert len(result_slots) > 400  # result buckets spread over the cluster
