"""Sharded models: the shard map and its checks, shard loading, routing, and a batch and
sync requests through the gateway and one worker per shard."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from click.testing import CliRunner

from recfleet.api.app import create_app
from recfleet.api.routing import ShardRouter
from recfleet.cli.main import cli
from recfleet.shared.artifacts import CURRENT, SHARD_MAP, load_artifacts
from recfleet.shared.codec import decode_result
from recfleet.shared.errors import ArtifactError
from recfleet.shared.keys import Keys
from recfleet.shared.settings import Settings
from recfleet.shared.shards import load_model, read_shard_map
from recfleet.worker.consumer import Consumer
from recfleet.worker.handler import JobHandler
from recfleet.worker.models import ModelStore
from recfleet.worker.ranking import Ranker
from tests.support.settings import make_settings, purge

UNKNOWN = 10**12  # beyond every trained user: owned by the last shard, ranked cold


def _edit_map(src: Path, dst: Path, edit: object) -> Path:
    shutil.copytree(src, dst)
    doc = json.loads((dst / SHARD_MAP).read_text())
    edit(doc)  # type: ignore[operator]
    (dst / SHARD_MAP).write_text(json.dumps(doc))
    return dst


def test_shards_hold_every_user_once_and_share_one_playlist_table(
    small_artifacts: Path, sharded_artifacts: Path
) -> None:
    whole = load_artifacts(small_artifacts)
    smap = read_shard_map(sharded_artifacts)
    parts = [load_model(sharded_artifacts, k) for k in range(smap.count)]
    assert smap.count == 2 and [s.lo for s in smap.shards] == [0, int(parts[1].user_ids[0])]
    assert np.array_equal(np.concatenate([p.user_ids for p in parts]), whole.user_ids)
    for p in parts:
        mapped = p.playlist_embeddings.base  # the np.memmap behind the plain view
        assert Path(mapped.filename).parent.name == "shared"  # type: ignore[union-attr]
        assert np.array_equal(p.fallback, whole.fallback)
        direct = Ranker.from_artifacts(whole, k=10).rank(whole.user_rows(p.user_ids))
        ranked = Ranker.from_artifacts(p, k=10).rank(p.user_rows(p.user_ids))
        assert np.array_equal(ranked.playlists, direct.playlists)
    check = CliRunner().invoke(cli, ["artifacts", "check", str(sharded_artifacts)])
    assert check.exit_code == 0 and "6000 users in 2 shard(s)" in check.output


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["shards"][1].update(lo=d["shards"][1]["lo"] + 5),
            "gap between shards 0 and 1",
        ),
        (lambda d: d["shards"][0].update(hi=d["shards"][0]["hi"] + 5), "shards 0 and 1 overlap"),
        (lambda d: d["shards"].pop(), "the last shard ends at"),
        (lambda d: d["shards"][1].update(index=2), "missing [1]"),
        (lambda d: d["shards"][1].update(dir="shard-9"), "directory shard-9 of shard 1 is missing"),
        (lambda d: d["shards"][0].update(lo=3), "shard 0 starts at 3, not 0"),
    ],
)
def test_a_bad_shard_map_is_refused_naming_the_problem(
    sharded_artifacts: Path, tmp_path: Path, edit: object, message: str
) -> None:
    bad = _edit_map(sharded_artifacts, tmp_path / "bad", edit)
    with pytest.raises(ArtifactError) as err:
        load_model(bad, 0)
    assert message in str(err.value)


def test_a_corrupt_shard_file_and_a_missing_shard_index_are_refused(
    sharded_artifacts: Path, small_artifacts: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(sharded_artifacts, bad)
    with (bad / "shard-1" / "user_ids.npy").open("r+b") as fh:
        fh.seek(-1, 2)
        fh.write(b"\x7f")
    load_model(bad, 0)  # the other shard is fine
    with pytest.raises(ArtifactError, match=r"shard-1/user_ids\.npy: checksum mismatch"):
        load_model(bad, 1)
    with pytest.raises(ArtifactError, match=r"split into 2 shards; give a shard 0\.\.1"):
        load_model(bad, None)
    with pytest.raises(ArtifactError, match="not sharded; there is no shard 1"):
        load_model(small_artifacts, 1)


def test_router_splits_by_range_into_small_jobs_on_shard_queues(
    sharded_artifacts: Path, small_artifacts: Path, tmp_path: Path
) -> None:
    settings = Settings(environment="test", artifacts=sharded_artifacts, job_size=2)
    router = ShardRouter(settings)
    first_of_1 = read_shard_map(sharded_artifacts).shards[1].lo
    users = [first_of_1, 1, UNKNOWN, 2, 0, first_of_1 + 1]
    parts = router.split(users)
    assert [(p.shard, p.user_ids) for p in parts] == [
        (0, [1, 2, 0]),
        (1, [first_of_1, UNKNOWN, first_of_1 + 1]),
    ]
    jobs, queues = router.jobs("b", parts, first_index=7)
    assert [len(j.user_ids) for j in jobs] == [2, 1, 2, 1]
    assert [j.job_id for j in jobs] == ["b-7", "b-8", "b-9", "b-10"]
    assert queues == [f"{settings.jobs_queue}.shard-{k}" for k in (0, 0, 1, 1)]

    # An unsharded model, or none at all: one shard, the plain queue names.
    for artifacts in (small_artifacts, tmp_path / "nothing"):
        plain = ShardRouter(settings.model_copy(update={"artifacts": artifacts}))
        assert [p.shard for p in plain.split(users)] == [0] and plain.shards == 1
        assert set(plain.jobs("b", plain.split(users))[1]) == {settings.jobs_queue}


def test_router_follows_current_to_a_sharded_model(
    sharded_artifacts: Path, small_artifacts: Path, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    root.mkdir()
    (root / "whole").symlink_to(small_artifacts)
    (root / "sharded").symlink_to(sharded_artifacts)
    (root / CURRENT).write_text("whole\n")
    router = ShardRouter(Settings(environment="test", artifacts=root))
    assert router.shards == 1
    (root / CURRENT).write_text("sharded\n")
    router._checked_at = -1e9  # the next look reads CURRENT again (normally after 1 s)
    assert router.shards == 2


@pytest.fixture
def sharded_settings(services: None, sharded_artifacts: Path) -> Iterator[Settings]:
    s = make_settings(sharded_artifacts)
    yield s
    purge(s)


@pytest.fixture
def shard_consumers(sharded_settings: Settings) -> Iterator[list[Consumer]]:
    """One real consumer per shard, on threads, each loading only its own shard."""
    consumers, threads, clients = [], [], []
    for k in range(2):
        settings = sharded_settings.model_copy(update={"shard": k})
        client = redis.Redis.from_url(str(settings.redis_url))
        models = ModelStore(settings.artifacts, k=settings.top_k, shard=k)
        consumer = Consumer(settings, JobHandler(settings, models, client))
        thread = threading.Thread(target=consumer.run, daemon=True)
        thread.start()
        consumers.append(consumer)
        threads.append(thread)
        clients.append(client)
    deadline = time.monotonic() + 30
    while not all(c.healthy for c in consumers):
        assert time.monotonic() < deadline, "consumers did not start"
        time.sleep(0.05)
    yield consumers
    for c in consumers:
        c.stop()
    for t in threads:
        t.join(timeout=60)
    for client in clients:
        client.close()


async def test_batch_and_sync_through_the_gateway_and_one_worker_per_shard(
    shard_consumers: list[Consumer], sharded_settings: Settings, small_artifacts: Path
) -> None:
    assert [c.handler.models.current().artifacts.n_users for c in shard_consumers] == [3000, 3000]
    users = [*range(0, 6000, 3), UNKNOWN]
    app = create_app(sharded_settings.model_copy(update={"generation_refresh_s": 0.001}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as api:
            resp = await api.post(
                "/api/playlist/beta_recommend/", json={"user_ids": users, "run": True}
            )
            assert resp.status_code == 202, resp.text
            accepted = resp.json()
            assert accepted["users"] == len(users) and accepted["jobs"] == 3  # 1000 + 1001 users
            batch_id = accepted["batch_id"]
            deadline = time.monotonic() + 60
            while (status := (await api.get(f"/api/batches/{batch_id}")).json())["state"] != "done":
                assert time.monotonic() < deadline, status
                time.sleep(0.1)
            assert status["users_done"] == len(users) and status["gen_state"] == "active"
            cold = (await api.get(f"/api/playlist/{UNKNOWN}")).json()
            sync = await api.post("/api/playlist/recommend/", json={"user_ids": [5997, 3, UNKNOWN]})
            assert sync.status_code == 200, sync.text

    whole = load_artifacts(small_artifacts)
    direct = Ranker.from_artifacts(whole, k=sharded_settings.top_k).rank(
        whole.user_rows(np.array(users))
    )
    keys = Keys(sharded_settings.redis_prefix)
    client = redis.Redis.from_url(str(sharded_settings.redis_url))
    with client.pipeline(transaction=False) as pipe:
        for uid in users:
            pipe.hget(keys.result_bucket(batch_id, uid), keys.result_field(uid))
        stored = pipe.execute()
    client.close()
    expected = {
        uid: whole.playlist_ids[row[row >= 0]].tolist()
        for uid, row in zip(users, direct.playlists, strict=True)
    }
    for uid, raw in zip(users, stored, strict=True):
        assert raw is not None and decode_result(raw).playlists == expected[uid], uid
    assert cold["cold"] is True and cold["playlists"] == expected[UNKNOWN]
    assert [row["user_id"] for row in sync.json()] == [5997, 3, UNKNOWN]
    assert [row["playlists"] for row in sync.json()] == [expected[u] for u in (5997, 3, UNKNOWN)]


def test_bench_memory_figures_come_from_proc(tmp_path: Path) -> None:
    import os

    from recfleet.cli.bench_shards import model_resident_mb, process_memory_mb

    np.save(tmp_path / "model.npy", np.ones(1 << 20, dtype=np.float32))  # 4 MB
    mapped = np.load(tmp_path / "model.npy", mmap_mode="r")
    assert float(mapped.sum()) == 1 << 20  # touch every page
    assert 3.9 <= model_resident_mb(os.getpid(), tmp_path) <= 4.1
    assert model_resident_mb(os.getpid(), tmp_path / "elsewhere") == 0
    mem = process_memory_mb(os.getpid())
    assert mem["rss_mb"] >= mem["private_mb"] > 0 and mem["pss_mb"] > 0


def test_submit_all_counts_the_users_of_every_shard(
    sharded_artifacts: Path, small_artifacts: Path
) -> None:
    from recfleet.cli.submit import all_user_ids

    whole = all_user_ids(Settings(environment="test", artifacts=small_artifacts))
    assert whole == list(range(6000))
    sharded = all_user_ids(Settings(environment="test", artifacts=sharded_artifacts))
    assert sorted(sharded) == whole
    assert sharded[:4] == [0, 3000, 1, 3001]  # every request feeds both shards


def test_bench_submits_every_shard_from_the_first_request() -> None:
    from recfleet.cli.bench_shards import interleaved

    assert interleaved(7, 2) == [0, 4, 1, 5, 2, 6, 3]
    order = interleaved(200_000, 2)
    assert sorted(order) == list(range(200_000))
    assert {u >= 100_000 for u in order[:1000]} == {False, True}


def test_dlq_replay_returns_a_job_to_the_shard_queue_it_died_in(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pika

    from recfleet.cli.fleet import settings_env
    from recfleet.shared.messages import make_jobs
    from recfleet.shared.settings import get_settings
    from recfleet.shared.topology import (
        HEADER_BATCH_ID,
        HEADER_USERS,
        declare_blocking,
        delete_blocking,
        jobs_queue,
        topology,
    )

    for name, value in settings_env(settings).items():
        if name.startswith("RECFLEET_"):
            monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    shard_1 = jobs_queue(settings, 1, 2)
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_urls[0]))
    try:
        channel = conn.channel()
        declare_blocking(channel, topology(settings, 2))
        channel.confirm_delivery()
        (job,) = make_jobs("batchS", [5000, 5001], 10)
        death = {"queue": shard_1, "reason": "delivery_limit", "count": 5}
        headers = {"x-death": [death], HEADER_BATCH_ID: "batchS", HEADER_USERS: 2}
        props = pika.BasicProperties(message_id=job.job_id, headers=headers)
        channel.basic_publish(
            settings.dead_letter_exchange, settings.dead_letter_queue, job.encode(), props
        )
        result = CliRunner().invoke(cli, ["dlq", "replay", "--batch", "batchS"])
        assert result.exit_code == 0, result.output
        assert f"replayed 1 jobs onto {shard_1}" in result.output
        deadline = time.monotonic() + 10
        while channel.queue_declare(shard_1, passive=True).method.message_count != 1:
            assert time.monotonic() < deadline, "the job did not reach its shard's queue"
            time.sleep(0.05)
    finally:
        delete_blocking(conn.channel(), topology(settings, 2))
        conn.close()
        get_settings.cache_clear()
