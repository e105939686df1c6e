"""recfleet on a real 3-node RabbitMQ cluster on loopback, with quorum queues of 3
replicas: batches through the gateway and one worker per shard while the node that
leads a shard's jobs queue is stopped mid-batch.

The invariant of the fault suite: every accepted user has a result or sits in the
dead-letter queue, and no request gets 202 for a job the broker did not confirm.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from recfleet.api.app import create_app
from recfleet.shared.keys import Keys
from recfleet.shared.settings import Settings
from recfleet.shared.topology import jobs_queue
from recfleet.worker.consumer import Consumer
from recfleet.worker.handler import JobHandler
from recfleet.worker.models import ModelStore
from tests.support.clusters import RabbitCluster
from tests.support.reports import report
from tests.support.settings import make_settings, purge

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="session")
def rabbit_cluster() -> Iterator[RabbitCluster]:
    cluster = RabbitCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_settings(
    services: None, sharded_artifacts: Path, rabbit_cluster: RabbitCluster
) -> Iterator[Settings]:
    """Private settings: every broker node in the URL list, quorum queues on 3 nodes."""
    s = make_settings(
        sharded_artifacts,
        amqp_url=rabbit_cluster.urls,
        quorum_replicas=3,
        heartbeat_s=5,
        publish_timeout_s=5.0,
        gate_max_cold_fraction=1.0,
        prefetch=2,
    )
    yield s
    purge(s)


def _shard_workers(settings: Settings) -> tuple[list[Consumer], list[threading.Thread]]:
    consumers, threads = [], []
    for k in range(2):
        s = settings.model_copy(update={"shard": k})
        client = redis.Redis.from_url(str(s.redis_url))
        consumer = Consumer(s, JobHandler(s, ModelStore(s.artifacts, k=s.top_k, shard=k), client))
        thread = threading.Thread(target=consumer.run, daemon=True)
        thread.start()
        consumers.append(consumer)
        threads.append(thread)
    deadline = time.monotonic() + 60
    while not all(c.healthy for c in consumers):
        assert time.monotonic() < deadline, "consumers did not start"
        time.sleep(0.05)
    return consumers, threads


async def test_stopping_the_leader_of_a_jobs_queue_mid_batch_loses_nothing(
    cluster_settings: Settings, rabbit_cluster: RabbitCluster
) -> None:
    settings = cluster_settings
    consumers, threads = _shard_workers(settings)
    keys = Keys(settings.redis_prefix)
    probe = redis.Redis.from_url(str(settings.redis_url))
    accepted: dict[str, list[int]] = {}
    refused = 0
    submitted = 0
    app = create_app(settings.model_copy(update={"generation_refresh_s": 0.001}))
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as api:

                async def submit(users: list[int]) -> None:
                    nonlocal refused, submitted
                    submitted += len(users)
                    resp = await api.post(
                        "/api/playlist/beta_recommend/", json={"user_ids": users, "run": True}
                    )
                    if resp.status_code == 202:
                        accepted[resp.json()["batch_id"]] = users
                    else:
                        assert resp.status_code == 503, resp.text
                        refused += len(users)

                # A first batch of 36 jobs over both shards (known users, then cold ones).
                await submit([*range(6000), *range(10**9, 10**9 + 30000)])
                (first,) = accepted
                while int(probe.hget(keys.batch(first), "jobs_done") or 0) < 4:
                    await asyncio.sleep(0.01)
                queue = jobs_queue(settings, 0, 2)
                leader = rabbit_cluster.leader(queue)
                stopping = asyncio.create_task(asyncio.to_thread(rabbit_cluster.stop_node, leader))
                # Keep submitting while the node goes away and the others take over.
                n = 0
                while not stopping.done() or n < 10:
                    start = 2 * 10**9 + n * 3000
                    await submit([*range(n * 300, n * 300 + 300), *range(start, start + 2700)])
                    n += 1
                    await asyncio.sleep(0.2)
                await stopping
                new_leader = rabbit_cluster.leader(queue, via=(leader + 1) % 3)

                deadline = time.monotonic() + 180
                for batch_id in accepted:
                    while (got := await api.get(f"/api/batches/{batch_id}")).json()[
                        "state"
                    ] not in ("done", "failed"):
                        assert time.monotonic() < deadline, got.text
                        await asyncio.sleep(0.2)
    finally:
        for c in consumers:
            c.stop()
        for t in threads:
            t.join(timeout=60)

    gen_keys = Keys(settings.redis_prefix)
    results = dead = users = 0
    for batch_id, batch_users in accepted.items():
        users += len(batch_users)
        with probe.pipeline(transaction=False) as pipe:
            for uid in batch_users:
                pipe.hexists(gen_keys.result_bucket(batch_id, uid), gen_keys.result_field(uid))
            results += sum(pipe.execute())
        dead += int(probe.hget(keys.batch(batch_id), "users_dead") or 0)
    probe.close()
    lost = users - results - dead
    report(
        "rabbit-cluster-leader-stopped",
        users=submitted,
        accepted=users,
        results=results,
        lost=lost,
        dlq=dead,
        refused_503=refused,
        batches=len(accepted),
        leader=f"n{leader}->n{new_leader}",
    )
    assert lost == 0
    assert new_leader != leader
    assert len(accepted) > 1  # the gateway accepted batches after the node went away
