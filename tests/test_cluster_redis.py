"""recfleet on a real Redis Cluster (6 redis-server processes on loopback: 3 primaries,
3 replicas): the end-to-end path, the generation tests, and a primary killed mid-batch.

The cluster starts once per session and every node is stopped by its pid at the end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from recfleet.api.app import create_app
from recfleet.shared.artifacts import load_artifacts
from recfleet.shared.codec import decode_result
from recfleet.shared.keys import Keys
from recfleet.shared.redis import redis_client
from recfleet.shared.settings import Settings
from recfleet.worker.consumer import Consumer
from recfleet.worker.handler import JobHandler
from recfleet.worker.models import ModelStore
from recfleet.worker.ranking import Ranker
from tests.support.clusters import RedisClusterNodes
from tests.support.reports import report
from tests.support.settings import make_settings, purge

# The generation tests, run again here with the fixtures below (a cluster underneath).
from tests.test_generations import (  # noqa: F401
    test_a_failed_gate_leaves_the_old_generation_current,
    test_a_run_covering_far_fewer_users_than_the_current_one_is_rejected,
    test_a_whole_run_in_one_request,
    test_finalize_is_idempotent,
    test_open_append_seal_a_declared_run_over_http,
    test_readers_see_the_old_generation_until_the_new_one_is_complete,
    test_rollback,
    test_users_left_out_keep_their_last_result,
)

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterNodes]:
    nodes = RedisClusterNodes()
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
def fleet_settings(
    services: None, small_artifacts: Path, redis_cluster: RedisClusterNodes
) -> Iterator[Settings]:
    """Private settings whose Redis is the cluster (reached through any one node)."""
    s = make_settings(small_artifacts, redis_url=redis_cluster.url, redis_cluster=True)
    yield s
    purge(s)


def _consumers(settings: Settings, n: int) -> tuple[list[Consumer], list[threading.Thread]]:
    consumers, threads = [], []
    for _ in range(n):
        client = redis_client(settings, socket_timeout=2, socket_connect_timeout=2)
        handler = JobHandler(settings, ModelStore(settings.artifacts, k=settings.top_k), client)
        consumer = Consumer(settings, handler)
        thread = threading.Thread(target=consumer.run, daemon=True)
        thread.start()
        consumers.append(consumer)
        threads.append(thread)
    deadline = time.monotonic() + 30
    while not all(c.healthy for c in consumers):
        assert time.monotonic() < deadline, "consumers did not start"
        time.sleep(0.05)
    return consumers, threads


async def test_a_primary_killed_mid_batch_loses_nothing(
    fleet_settings: Settings, redis_cluster: RedisClusterNodes
) -> None:
    """kill -9 the primary holding the batch's ledger while workers write: a replica is
    promoted, workers retry their writes until the cluster heals, every user's result
    equals direct ranking and the batch completes with nothing dead."""
    settings = fleet_settings.model_copy(update={"prefetch": 1, "gate_max_cold_fraction": 1.0})
    users = list(range(6000)) + list(range(10**9, 10**9 + 24000))  # known and cold
    consumers, threads = _consumers(settings, 2)
    app = create_app(settings.model_copy(update={"generation_refresh_s": 0.001}))
    keys = Keys(settings.redis_prefix)
    victim_port: int | None = None
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as api:
                resp = await api.post(
                    "/api/playlist/beta_recommend/", json={"user_ids": users, "run": True}
                )
                assert resp.status_code == 202, resp.text
                batch_id = resp.json()["batch_id"]
                victim = redis_cluster.primary_of(keys.batch(batch_id))
                probe = redis_client(settings)
                while int(probe.hget(keys.batch(batch_id), "jobs_done") or 0) < 3:
                    time.sleep(0.01)
                done_at_kill = int(probe.hget(keys.batch(batch_id), "jobs_done") or 0)
                probe.close()
                redis_cluster.kill(victim)
                victim_port = victim
                killed = time.monotonic()
                deadline = killed + 120
                while True:
                    got = await api.get(f"/api/batches/{batch_id}")
                    if got.status_code == 200 and got.json()["state"] == "done":
                        break
                    assert time.monotonic() < deadline, got.text
                    time.sleep(0.2)
                status = got.json()
                healed_s = time.monotonic() - killed
                sample = (await api.get("/api/playlist/1234")).json()
    finally:
        for c in consumers:
            c.stop()
        for t in threads:
            t.join(timeout=60)
        if victim_port is not None:
            redis_cluster.restart(victim_port)  # 6 nodes again for whatever runs next

    art = load_artifacts(settings.artifacts)
    direct = Ranker.from_artifacts(art, k=settings.top_k).rank(art.user_rows(np.array(users)))
    gen_keys = Keys(settings.redis_prefix)
    client = redis_client(settings)
    with client.pipeline(transaction=False) as pipe:
        for uid in users:
            pipe.hget(gen_keys.result_bucket(batch_id, uid), gen_keys.result_field(uid))
        stored = pipe.execute()
    client.close()
    results = sum(raw is not None for raw in stored)
    report(
        "redis-cluster-primary-killed",
        users=len(users),
        accepted=len(users),
        results=results,
        lost=len(users) - results,
        dlq=status["users_dead"],
        jobs_done_at_kill=done_at_kill,
        batch_done_after_kill_s=round(healed_s, 1),
    )
    assert results == len(users) and status["users_dead"] == 0
    assert status["users_done"] == len(users) and status["gen_state"] == "active"
    for i, raw in enumerate(stored):
        rows = direct.playlists[i][direct.playlists[i] >= 0]
        assert decode_result(raw).playlists == art.playlist_ids[rows].tolist(), users[i]
    assert sample["playlists"] == decode_result(stored[1234]).playlists
    primaries = redis_cluster.primaries()
    assert len(primaries) == 3 and victim not in primaries  # its replica took over
