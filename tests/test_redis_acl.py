"""``deploy/redis/users.acl``: the gateway and worker users can do their work and no more.

A private Redis loads the shipped file (its users switched on with fresh passwords). The
real gateway, connected as ``gateway``, accepts, appends, seals and reports batches and
serves results; the real job handler, connected as ``worker``, ranks the jobs and
records a dead one. Neither can flush, configure, list keys or touch keys outside
recfleet's prefix.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pika
import pytest
import redis
from pydantic import RedisDsn

from recfleet.api.app import create_app
from recfleet.shared.messages import Job, decode_job
from recfleet.shared.settings import Settings
from recfleet.shared.topology import delete_blocking, topology
from recfleet.worker.handler import JobHandler
from recfleet.worker.models import ModelStore
from tests.support.queues import read_queue
from tests.support.services import PrivateRedis
from tests.support.settings import make_settings

ACL_FILE = Path(__file__).resolve().parents[1] / "deploy" / "redis" / "users.acl"
USERS = ("admin", "gateway", "worker")
FORBIDDEN = [
    ("FLUSHALL",),
    ("FLUSHDB",),
    ("CONFIG", "GET", "*"),
    ("CONFIG", "SET", "appendonly", "no"),
    ("KEYS", "*"),
    ("SCAN", "0"),
    ("SHUTDOWN", "NOSAVE"),
    ("BGREWRITEAOF",),
    ("CLIENT", "KILL", "TYPE", "normal"),
    ("ACL", "LIST"),
    ("SCRIPT", "FLUSH"),
    ("SET", "other:key", "1"),
    ("HGETALL", "other:key"),
]


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[tuple[PrivateRedis, dict[str, str]]]:
    """A private Redis with the shipped ACL file, each user on with a fresh password."""
    text = ACL_FILE.read_text()
    passwords = {user: secrets.token_hex(16) for user in USERS}
    for user, password in passwords.items():
        disabled = f"user {user} off resetpass "
        assert disabled in text, f"{ACL_FILE.name} should ship user {user} switched off"
        digest = hashlib.sha256(password.encode()).hexdigest()
        text = text.replace(disabled, f"user {user} on #{digest} ")
    aclfile = tmp_path / "users.acl"
    aclfile.write_text(text)
    server = PrivateRedis(tmp_path / "redis", extra_args=("--aclfile", str(aclfile)))
    server.start()
    try:
        yield server, passwords
    finally:
        server.stop()


def redis_url(server: PrivateRedis, user: str, password: str) -> RedisDsn:
    return RedisDsn(f"redis://{user}:{password}@127.0.0.1:{server.port}/0")


@pytest.fixture
def acl_settings(
    services: None, small_artifacts: Path, acl_redis: tuple[PrivateRedis, dict[str, str]]
) -> Iterator[Settings]:
    """Private queue names on the standard broker; the ACL file's prefix on the private Redis."""
    server, passwords = acl_redis
    s = make_settings(
        small_artifacts,
        redis_prefix="rf",
        redis_url=redis_url(server, "admin", passwords["admin"]),
        gate_max_dead_fraction=1.0,
        gate_max_cold_fraction=1.0,
    )
    yield s
    conn = pika.BlockingConnection(pika.URLParameters(str(s.amqp_url)))
    channel = conn.channel()
    delete_blocking(channel, topology(s))
    conn.close()


@pytest.fixture
async def gateway(
    acl_settings: Settings, acl_redis: tuple[PrivateRedis, dict[str, str]]
) -> AsyncIterator[httpx.AsyncClient]:
    server, passwords = acl_redis
    settings = acl_settings.model_copy(
        update={"redis_url": redis_url(server, "gateway", passwords["gateway"])}
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client


@pytest.fixture
def worker_redis(acl_redis: tuple[PrivateRedis, dict[str, str]]) -> Iterator[redis.Redis]:
    server, passwords = acl_redis
    client = redis.Redis.from_url(str(redis_url(server, "worker", passwords["worker"])))
    yield client
    client.close()


def take_jobs(settings: Settings) -> list[Job]:
    return [decode_job(body) for body, _ in read_queue(settings, settings.jobs_queue, take=True)]


async def test_gateway_and_worker_do_their_work_as_their_acl_users(
    gateway: httpx.AsyncClient, worker_redis: redis.Redis, acl_settings: Settings
) -> None:
    assert (await gateway.get("/readyz")).status_code == 200
    # A whole batch, twice with the same Idempotency-Key.
    headers = {"Idempotency-Key": "acl-test-1"}
    body = {"user_ids": list(range(2500))}
    first = await gateway.post("/api/playlist/beta_recommend/", json=body, headers=headers)
    again = await gateway.post("/api/playlist/beta_recommend/", json=body, headers=headers)
    assert first.status_code == 202 and again.json() == first.json(), first.text
    whole = first.json()["batch_id"]
    # An open batch: opened, appended to, sealed.
    opened = (await gateway.post("/api/batches", json={"run": True})).json()["batch_id"]
    appended = await gateway.post(
        "/api/playlist/beta_recommend/", json={"user_ids": [7, 8, 9], "batch_id": opened}
    )
    assert appended.status_code == 202, appended.text
    assert (await gateway.post(f"/api/batches/{opened}/seal")).status_code == 200

    handler = JobHandler(
        acl_settings, ModelStore(acl_settings.artifacts, k=acl_settings.top_k), worker_redis
    )
    jobs = take_jobs(acl_settings)
    assert len(jobs) == 4
    dead = next(job for job in jobs if job.job_id == f"{whole}-2")
    for job in jobs:
        if job is not dead:
            handler.handle(job)
    handler.handle(jobs[0])  # a redelivery
    # The last job is dead-lettered: that completes its batch.
    handler.record_dead(dead.batch_id, dead.job_id, len(dead.user_ids), dead.user_ids)

    for batch_id, state, gen_state in ((whole, "failed", "ad-hoc"), (opened, "done", "active")):
        status = (await gateway.get(f"/api/batches/{batch_id}")).json()
        assert status["state"] == state and status["gen_state"] == gen_state, status
    failed = await gateway.get(f"/api/batches/{whole}", params={"failed_users": "true"})
    assert failed.json()["failed_user_ids"] == dead.user_ids
    handler.handle(dead)  # replayed from the dead-letter queue
    status = (await gateway.get(f"/api/batches/{whole}")).json()
    assert (status["state"], status["jobs_done"], status["jobs_dead"]) == ("done", 3, 0), status
    result = await gateway.get("/api/playlist/8")
    assert result.status_code == 200 and result.json()["generation"] in (whole, opened)
    assert (await gateway.put("/api/drift/reference", json={"batch_id": opened})).status_code == 200
    assert (await gateway.get("/api/drift/reference")).status_code == 200
    assert (await gateway.delete("/api/drift/reference")).status_code == 204
    drift = await gateway.get(f"/api/batches/{opened}/drift")
    assert drift.status_code == 200, drift.text


@pytest.mark.parametrize("user", ["gateway", "worker"])
def test_neither_user_can_flush_configure_or_leave_the_prefix(
    acl_redis: tuple[PrivateRedis, dict[str, str]], user: str
) -> None:
    server, passwords = acl_redis
    client = redis.Redis.from_url(str(redis_url(server, user, passwords[user])))
    try:
        assert client.ping()
        for command in FORBIDDEN:
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)
        # Nor through a script: the ACL applies to what a script calls.
        with pytest.raises(redis.exceptions.ResponseError, match="can't run this command"):
            client.eval("return redis.call('FLUSHALL')", 0)
    finally:
        client.close()


def test_the_default_user_is_off(acl_redis: tuple[PrivateRedis, dict[str, str]]) -> None:
    server, _ = acl_redis
    client = redis.Redis(port=server.port)
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            client.ping()
    finally:
        client.close()
