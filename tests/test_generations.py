"""Generations: the atomic switch, gates, rollback, open batches, Cluster-safe keys."""

from __future__ import annotations

import httpx
import pytest
from redis.crc import key_slot

from recfleet.shared.generations import activate, finalize_steps, history, run_steps
from recfleet.shared.keys import Keys
from recfleet.shared.messages import make_jobs
from recfleet.shared.settings import Settings
from recfleet.worker.handler import JobHandler
from tests.support.generations import handle_queued, run_batch


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
    assert status["state"] == "running" and status["gen_state"] == "pending" and status["run"]

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
    run_batch(handler, "most", list(range(280)))  # 93 % of the current generation: passes
    assert (await fleet_api.get("/api/playlist/50")).json()["generation"] == "most"
    assert (await fleet_api.get("/api/playlist/290")).json()["generation"] == "full"
    assert (await fleet_api.get("/api/playlist/999999")).status_code == 404


async def test_a_run_covering_far_fewer_users_than_the_current_one_is_rejected(
    handler: JobHandler, fleet_api: httpx.AsyncClient, fleet_settings: Settings
) -> None:
    run_batch(handler, "big", list(range(500)))
    run_batch(handler, "small", list(range(100)))  # 20 % of the current generation
    status = (await fleet_api.get("/api/batches/small")).json()
    assert status["gen_state"] == "rejected"
    assert "covers 100 users" in status["gen_reason"] and "gate 90%" in status["gen_reason"]
    assert (await fleet_api.get("/api/playlist/50")).json()["generation"] == "big"
    # The operator may still decide otherwise.
    keys = Keys(fleet_settings.redis_prefix)
    assert activate(handler.redis, keys, "small", fleet_settings.batch_ttl_s) == []
    assert (await fleet_api.get("/api/playlist/50")).json()["generation"] == "small"
    assert (await fleet_api.get("/api/playlist/400")).json()["generation"] == "big"


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


async def test_rollback(
    handler: JobHandler, fleet_api: httpx.AsyncClient, fleet_settings: Settings
) -> None:
    keys = Keys(fleet_settings.redis_prefix)
    ttl = fleet_settings.batch_ttl_s
    for name in ("g1", "g2", "g3"):
        run_batch(handler, name, list(range(200)))
    assert [n for n, _ in history(handler.redis, keys)] == ["g3", "g2", "g1"]
    assert handler.redis.ttl(keys.batch("g3")) == -1  # an active generation's ledger stays

    assert activate(handler.redis, keys, "g2", ttl) == ["g3"]
    assert [n for n, _ in history(handler.redis, keys)] == ["g2", "g1"]
    assert (await fleet_api.get("/api/playlist/7")).json()["generation"] == "g2"
    assert handler.redis.hget(keys.batch("g3"), "gen_state") == b"retired"
    assert 0 < handler.redis.ttl(keys.batch("g3")) <= ttl  # a retired one expires
    assert activate(handler.redis, keys, "g3", ttl) == []  # and forward again
    assert (await fleet_api.get("/api/playlist/7")).json()["generation"] == "g3"
    with pytest.raises(ValueError, match="no batch"):
        activate(handler.redis, keys, "nope", ttl)


async def test_open_append_seal_a_declared_run_over_http(
    handler: JobHandler, fleet_api: httpx.AsyncClient, fleet_settings: Settings
) -> None:
    opened = await fleet_api.post("/api/batches", json={"run": True})
    assert opened.status_code == 201 and opened.json()["run"] is True
    batch_id = opened.json()["batch_id"]
    for part in (list(range(0, 150)), list(range(150, 250))):
        resp = await fleet_api.post(
            "/beta_recommend", json={"user_ids": part, "batch_id": batch_id}
        )
        assert resp.status_code == 202 and resp.json()["batch_id"] == batch_id
    status = (await fleet_api.get(f"/api/batches/{batch_id}")).json()
    assert status["sealed"] is False and status["jobs_total"] == 2  # job size 1000

    # The workers finish everything before the seal: the seal itself runs the switch.
    handle_queued(handler, fleet_settings)
    assert (await fleet_api.get(f"/api/batches/{batch_id}")).json()["state"] == "running"
    assert (await fleet_api.get("/api/playlist/200")).status_code == 404  # not yet visible
    sealed = (await fleet_api.post(f"/api/batches/{batch_id}/seal")).json()
    assert sealed["state"] == "done" and sealed["gen_state"] == "active"
    assert (await fleet_api.get("/api/playlist/200")).json()["generation"] == batch_id

    late = await fleet_api.post("/beta_recommend", json={"user_ids": [1], "batch_id": batch_id})
    assert late.status_code == 409
    missing = await fleet_api.post("/beta_recommend", json={"user_ids": [1], "batch_id": "nope"})
    assert missing.status_code == 404
    bad = await fleet_api.post("/api/batches", json={"run": "often"})
    assert bad.status_code == 422
    late_run = {"user_ids": [1], "batch_id": batch_id, "run": True}  # declared when opened
    assert (await fleet_api.post("/beta_recommend", json=late_run)).status_code == 422


async def test_a_whole_run_in_one_request(
    handler: JobHandler, fleet_api: httpx.AsyncClient, fleet_settings: Settings
) -> None:
    resp = await fleet_api.post("/beta_recommend", json={"user_ids": list(range(300)), "run": True})
    batch_id = resp.json()["batch_id"]
    handle_queued(handler, fleet_settings)
    status = (await fleet_api.get(f"/api/batches/{batch_id}")).json()
    assert status["run"] and status["gen_state"] == "active"
    assert (await fleet_api.get("/api/playlist/299")).json()["generation"] == batch_id


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
    # Every generation's copy of one bucket shares a slot: the read script's keys.
    for uid in (0, 127, 128, 10**12):
        gens = ("live", "a", "0123456789abcdef0123456789abcdef")
        assert len({key_slot(keys.result_bucket(g, uid).encode()) for g in gens}) == 1
    result_slots = {
        key_slot(keys.result_bucket("g", uid).encode()) for uid in range(0, 128 * 500, 128)
    }
    assert len(result_slots) > 400  # result buckets spread over the cluster
