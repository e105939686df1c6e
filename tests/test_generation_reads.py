"""Reads never lose a user: ad-hoc batches update the users they name and hide no one;
a read falls through every active generation (no fixed depth)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import httpx
import pytest
import redis
from pydantic import RedisDsn

from recfleet.cli.client import submit, wait
from recfleet.cli.fleet import LocalFleet
from recfleet.shared.messages import Job, new_id
from recfleet.shared.settings import Settings
from recfleet.worker.handler import JobHandler
from tests.support.generations import generations_of, handle_queued, private_redis, run_batch
from tests.support.net import free_port


async def test_a_list_split_over_plain_requests_leaves_every_user_readable(
    handler: JobHandler, fleet_api: httpx.AsyncClient, fleet_settings: Settings
) -> None:
    users = list(range(1500))
    for start in range(0, 1500, 300):  # five requests, each its own ad-hoc batch
        part = {"user_ids": users[start : start + 300]}
        assert (await fleet_api.post("/api/playlist/beta_recommend/", json=part)).status_code == 202
    assert handle_queued(handler, fleet_settings) == 5
    assert set((await generations_of(fleet_api, users)).values()) == {"live"}

    run_batch(handler, "run1", users)  # a declared run replaces them all at once
    others = list(range(1500, 3000))
    for start in range(0, 1500, 300):
        part = {"user_ids": others[start : start + 300]}
        assert (await fleet_api.post("/api/playlist/beta_recommend/", json=part)).status_code == 202
    handle_queued(handler, fleet_settings)
    # Ad-hoc results now go into the current generation; nobody is hidden.
    assert set((await generations_of(fleet_api, users + others)).values()) == {"run1"}


async def test_tiny_batches_after_a_run_hide_no_one(
    handler: JobHandler, fleet_api: httpx.AsyncClient, fleet_settings: Settings
) -> None:
    users = list(range(400))
    run_batch(handler, "daily", users)
    before = {u: (await fleet_api.get(f"/api/playlist/{u}")).json() for u in (3, 4, 5)}
    time.sleep(1.1)  # results carry whole seconds: let the new ones differ
    for uid in (3, 4):  # an engineer checking users, one POST each
        resp = await fleet_api.post("/api/playlist/beta_recommend/", json={"user_ids": [uid]})
        assert resp.status_code == 202
    handle_queued(handler, fleet_settings)
    sync = Job(job_id=f"sync-{new_id()}", batch_id=f"sync-{new_id()}", user_ids=[5],
               created_at=time.time())  # fmt: skip
    handler.handle(sync)  # what POST /api/playlist/recommend/ sends a worker

    assert set((await generations_of(fleet_api, users)).values()) == {"daily"}
    for uid in (3, 4, 5):
        after = (await fleet_api.get(f"/api/playlist/{uid}")).json()
        assert after["generated_at"] > before[uid]["generated_at"]  # updated in place
    status = (await fleet_api.get("/api/batches/daily")).json()
    assert status["gen_state"] == "active"


async def test_five_declared_runs_with_disjoint_users_leave_the_oldest_readable(
    handler: JobHandler, fleet_api: httpx.AsyncClient
) -> None:
    for day in range(5):
        run_batch(handler, f"day{day}", list(range(day * 200, (day + 1) * 200)))
    served = await generations_of(fleet_api, [0, 199, 200, 599, 999])
    assert served == {0: "day0", 199: "day0", 200: "day1", 599: "day2", 999: "day4"}


@pytest.mark.e2e
def test_over_http_with_worker_processes_nobody_is_hidden(
    fleet_settings: Settings, tmp_path: Path
) -> None:
    users = list(range(6000))
    sample = random.Random(1).sample(users, 300)
    with LocalFleet(fleet_settings, processes=1, log_dir=tmp_path) as fleet:
        fleet.wait_workers_consuming()
        with httpx.Client(base_url=fleet.base_url, timeout=60) as client:
            # A daily list longer than one request, POSTed in five plain requests.
            batches = []
            for start in range(0, 6000, 1200):
                resp = client.post(
                    "/api/playlist/beta_recommend/",
                    json={"user_ids": users[start : start + 1200]},
                )
                assert resp.status_code == 202, resp.text
                batches.append(resp.json()["batch_id"])
            wait(client, batches, 6000, show=False)
            assert _served(client, sample) == {"live"}

            run = submit(client, users, chunk=2000, run=True)
            (status,) = wait(client, run.batch_ids, run.users, show=False)
            assert status["gen_state"] == "active", status
            for uid in sample[:3]:  # three one-user POSTs, then a sync call
                resp = client.post("/api/playlist/beta_recommend/", json={"user_ids": [uid]})
                wait(client, [resp.json()["batch_id"]], 1, show=False)
            assert (
                client.post("/api/playlist/recommend/", json={"user_ids": [7]}).status_code == 200
            )
            time.sleep(1.5)  # past the gateway's generation-list refresh
            assert _served(client, sample) == {run.batch_ids[0]}


def _served(client: httpx.Client, users: list[int]) -> set[str | None]:
    out: set[str | None] = set()
    for uid in users:
        resp = client.get(f"/api/playlist/{uid}")
        out.add(resp.json()["generation"] if resp.status_code == 200 else None)
    return out


async def test_a_read_is_one_redis_call_whatever_the_number_of_generations(
    fleet_settings: Settings, tmp_path: Path
) -> None:
    """Counted on a private Redis: one EVALSHA per read, the generation list not re-read
    within the refresh interval. (The gateway's monitor may run its own commands.)"""
    from recfleet.api.app import create_app
    from recfleet.worker.models import ModelStore

    with private_redis(tmp_path, free_port()) as url:
        s = fleet_settings.model_copy(update={"redis_url": RedisDsn(url)})
        client = redis.Redis.from_url(url)
        handler = JobHandler(s, ModelStore(s.artifacts, k=s.top_k), client)
        for day in range(4):
            run_batch(handler, f"day{day}", list(range(day * 100, day * 100 + 100)))
        app = create_app(s.model_copy(update={"generation_refresh_s": 3600.0}))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as api:
                await api.get("/api/playlist/0")  # warm: the list and the model version
                client.config_resetstat()
                served = await generations_of(api, [0, 150, 399, 10**6])
        stats = client.info("commandstats")
        client.close()
    assert served == {0: "day0", 150: "day1", 399: "day3", 10**6: None}
    calls = {name.removeprefix("cmdstat_"): v["calls"] for name, v in stats.items()}
    assert calls["evalsha"] == 4, calls  # one per read: HGETs run inside the script
    assert "zrevrange" not in calls, calls  # the generation list is cached


@pytest.mark.e2e
def test_submit_all_is_a_declared_run_and_a_users_file_is_ad_hoc(
    fleet_settings: Settings, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from recfleet.cli.main import cli
    from recfleet.shared.keys import Keys

    users_file = tmp_path / "users.txt"
    users_file.write_text("1\n2\n3\n")
    keys = Keys(fleet_settings.redis_prefix)
    client = redis.Redis.from_url(str(fleet_settings.redis_url))
    with LocalFleet(fleet_settings, 0, tmp_path / "logs"):  # a gateway, no workers
        kinds = {}
        for args in (["submit", str(users_file)], ["submit", "--all"]):
            result = CliRunner().invoke(cli, [*args, "--no-wait"], obj=fleet_settings)
            assert result.exit_code == 0, result.output
            batch_id = result.output.split("batches:")[1].split()[0]
            kinds[args[1]] = client.hget(keys.batch(batch_id), "run")
    client.close()
    assert kinds == {str(users_file): b"0", "--all": b"1"}
