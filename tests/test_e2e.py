"""End to end: HTTP -> gateway -> RabbitMQ -> worker processes -> Redis -> HTTP."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from recfleet.cli.client import submit, wait
from recfleet.cli.fleet import LocalFleet
from recfleet.shared.artifacts import load_artifacts
from recfleet.shared.codec import decode_result
from recfleet.shared.keys import Keys
from recfleet.shared.settings import Settings
from recfleet.worker.ranking import Ranker

pytestmark = pytest.mark.e2e


def test_5000_users_over_http_each_result_equals_direct_ranking(
    fleet_settings: Settings, tmp_path: Path
) -> None:
    user_ids = list(range(5000))
    with LocalFleet(fleet_settings, processes=2, log_dir=tmp_path) as fleet:
        fleet.wait_workers_consuming()
        with httpx.Client(base_url=fleet.base_url, timeout=60) as client:
            sub = submit(client, user_ids, chunk=5000, run=True)
            assert sub.users == 5000 and sub.jobs == 5
            (status,) = wait(client, sub.batch_ids, sub.users, show=False)
            assert status["state"] == "done"
            assert status["users_done"] == 5000 and status["jobs_done"] == 5
            assert status["gen_state"] == "active"
            sample = client.get("/api/playlist/1234").json()
            metrics = httpx.get(f"http://127.0.0.1:{fleet.worker_metrics_ports()[0]}/metrics").text

    art = load_artifacts(fleet_settings.artifacts)
    direct = Ranker.from_artifacts(art, k=fleet_settings.top_k).rank(
        art.user_rows(np.array(user_ids))
    )
    keys = Keys(fleet_settings.redis_prefix)
    client = redis.Redis.from_url(str(fleet_settings.redis_url))
    with client.pipeline(transaction=False) as pipe:
        for uid in user_ids:
            pipe.hget(keys.result_bucket(status["batch_id"], uid), keys.result_field(uid))
        stored = pipe.execute()
    client.close()
    assert all(raw is not None for raw in stored)
    for i, raw in enumerate(stored):
        rows = direct.playlists[i][direct.playlists[i] >= 0]
        assert decode_result(raw).playlists == art.playlist_ids[rows].tolist(), f"user {i}"

    assert sample["user_id"] == 1234 and sample["model_version"] == art.model_version
    assert sample["generation"] == status["batch_id"]
    assert sample["playlists"] == decode_result(stored[1234]).playlists
    assert "recfleet_worker_users_total" in metrics
    assert f'recfleet_model_info{{model_version="{art.model_version}"}} 1.0' in metrics


def test_worker_refuses_corrupt_artifacts_with_a_clear_message(
    fleet_settings: Settings, tmp_path: Path
) -> None:
    import shutil
    import subprocess
    import sys

    from recfleet.cli.fleet import settings_env

    broken = tmp_path / "broken"
    shutil.copytree(fleet_settings.artifacts, broken)
    with (broken / "candidates_indices.npy").open("r+b") as fh:
        fh.seek(-3, 2)
        fh.write(b"\xff\xff\xff")
    env = settings_env(fleet_settings.model_copy(update={"artifacts": broken}))
    proc = subprocess.run(
        [sys.executable, "-m", "recfleet.cli.main", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "candidates_indices.npy: checksum mismatch" in proc.stderr


def test_fleet_benchmark_run_counts_every_user_and_the_cpu_of_each_part(
    fleet_settings: Settings, tmp_path: Path
) -> None:
    from recfleet.cli.measure import measure

    # Enough jobs that the gateway's CPU time exceeds the clock tick it is counted in.
    run = measure(fleet_settings, list(range(100_000)), 1, tmp_path, show=False)
    figures = run.figures()
    assert (run.users, run.jobs, run.dead_users) == (100_000, 100, 0)
    assert figures["users_per_s"] > 0 and figures["total_s"] >= figures["submit_s"] > 0
    cpu = figures["cpu_s"]
    parts = {"gateway", "workers", "redis", "client"}
    assert parts <= set(cpu) and set(cpu) - parts <= {"broker"}  # broker: a local RabbitMQ
    assert all(seconds >= 0 for seconds in cpu.values())
    assert cpu["workers"] > 0 and cpu["gateway"] > 0  # they ranked and answered
