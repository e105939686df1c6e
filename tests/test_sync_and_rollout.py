"""The synchronous path through the fleet, and model rollout between jobs."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import pika
import redis

from recfleet.api.app import create_app
from recfleet.shared.artifacts import CURRENT, load_artifacts
from recfleet.shared.keys import Keys
from recfleet.shared.ledger import new_batch_fields
from recfleet.shared.messages import make_jobs
from recfleet.shared.settings import Settings
from recfleet.shared.topology import declare_blocking, topology
from recfleet.worker.consumer import Consumer
from recfleet.worker.handler import JobHandler
from recfleet.worker.models import ModelStore
from recfleet.worker.ranking import Ranker


async def test_sync_answers_through_the_fleet_and_writes_results(
    running_consumer: Consumer, fleet_api: httpx.AsyncClient, fleet_settings: Settings
) -> None:
    users = [3, 1, 4, 10**15]
    resp = await fleet_api.post("/api/playlist/recommend/", json={"user_ids": [*users, 3]})
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert [row["user_id"] for row in answer] == users

    art = load_artifacts(fleet_settings.artifacts)
    direct = Ranker.from_artifacts(art, k=10).rank(art.user_rows(np.array(users)))
    for row, ranked in zip(answer, direct.playlists, strict=True):
        assert row["playlists"] == art.playlist_ids[ranked[ranked >= 0]].tolist()
    stored = (await fleet_api.get("/api/playlist/4")).json()
    assert stored["playlists"] == answer[2]["playlists"] and stored["generation"] == "live"


async def test_sync_requests_go_ahead_of_queued_batch_jobs(
    running_consumer: Consumer, fleet_api: httpx.AsyncClient, fleet_settings: Settings
) -> None:
    keys = Keys(fleet_settings.redis_prefix)
    jobs = make_jobs("backlog", list(range(6000)) * 10, 1000)  # 60 jobs
    client = redis.Redis.from_url(str(fleet_settings.redis_url))
    client.hset(keys.batch("backlog"), mapping=new_batch_fields(len(jobs), 60000, run=True))  # type: ignore[arg-type]
    conn = pika.BlockingConnection(pika.URLParameters(str(fleet_settings.amqp_url)))
    channel = conn.channel()
    declare_blocking(channel, topology(fleet_settings))
    channel.confirm_delivery()
    for job in jobs:
        channel.basic_publish("", fleet_settings.jobs_queue, job.encode())
    conn.close()

    resp = await fleet_api.post("/api/playlist/recommend/", json={"user_ids": [7]})
    assert resp.status_code == 200
    done = int(client.hget(keys.batch("backlog"), "jobs_done") or 0)
    client.close()
    assert done < len(jobs), "the sync answer waited for the whole backlog"


async def test_sync_without_workers_is_504(fleet_settings: Settings) -> None:
    app = create_app(fleet_settings.model_copy(update={"sync_timeout_s": 0.5}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            resp = await c.post("/api/playlist/recommend/", json={"user_ids": [1]})
            too_many = await c.post("/api/playlist/recommend/", json={"user_ids": list(range(101))})
    assert resp.status_code == 504 and "no worker answered" in resp.text
    assert too_many.status_code == 413


def test_rollout_between_jobs_never_mixes_versions_in_a_batch(
    fleet_settings: Settings, small_artifacts: Path, tmp_path: Path
) -> None:
    from recfleet.offline.build import build_artifacts

    root = tmp_path / "models"
    shutil.copytree(small_artifacts, root / "v1")
    build_artifacts(root / "v2", n_users=6000, n_playlists=1000, seed=8, epochs=2)
    (root / CURRENT).write_text("v1\n")
    v1 = load_artifacts(root / "v1").model_version
    v2 = load_artifacts(root / "v2").model_version
    assert v1 != v2

    settings = fleet_settings.model_copy(update={"artifacts": root})
    client = redis.Redis.from_url(str(settings.redis_url))
    handler = JobHandler(settings, ModelStore(root, k=10, check_every_s=0), client)
    keys = Keys(settings.redis_prefix)
    old_jobs = make_jobs("old", list(range(300)), 100)
    client.hset(keys.batch("old"), mapping=new_batch_fields(3, 300, run=True))  # type: ignore[arg-type]
    assert handler.handle(old_jobs[0]).model_version == v1

    (root / CURRENT).write_text("v2\n")  # the rollout, while batch "old" is half done
    new_jobs = make_jobs("new", list(range(100)), 100)
    client.hset(keys.batch("new"), mapping=new_batch_fields(1, 100, run=True))  # type: ignore[arg-type]
    assert handler.handle(new_jobs[0]).model_version == v2
    assert {handler.handle(job).model_version for job in old_jobs[1:]} == {v1}
    assert client.hget(keys.batch("old"), "model_version") == v1.encode()
    assert client.hget(keys.batch("new"), "model_version") == v2.encode()
    client.close()
