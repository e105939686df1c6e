"""The gateway against the real RabbitMQ and Redis: validation, publishing, progress, reads."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pika
import pytest
import redis
from pydantic import RedisDsn
from redis.asyncio import Redis as AsyncRedis

from recfleet.api.app import create_app
from recfleet.api.idempotency import IdempotencyStore, digest
from recfleet.shared.codec import encode_results, model_tag
from recfleet.shared.keys import Keys
from recfleet.shared.messages import decode_job
from recfleet.shared.settings import Settings
from recfleet.shared.topology import HEADER_BATCH_ID, HEADER_USERS
from tests.support.net import free_port
from tests.support.services import PrivateRedis


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            yield c


def _get_all(settings: Settings) -> list[tuple[pika.spec.BasicProperties, bytes]]:
    conn = pika.BlockingConnection(pika.URLParameters(str(settings.amqp_url)))
    channel = conn.channel()
    out = []
    while True:
        method, props, body = channel.basic_get(settings.jobs_queue, auto_ack=True)
        if method is None:
            break
        out.append((props, body))
    conn.close()
    return out


async def test_batch_is_split_published_and_recorded(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    ids = [*range(2500), 7, 7]
    resp = await client.post("/api/playlist/beta_recommend/", json={"user_ids": ids})
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["jobs"] == 3 and body["users"] == 2500 and body["duplicates"] == 2

    messages = _get_all(settings)
    assert len(messages) == 3
    jobs = sorted((decode_job(b) for _, b in messages), key=lambda j: j.job_id)
    assert [u for j in jobs for u in j.user_ids] == list(range(2500))
    for props, _ in messages:
        assert props.content_type == "application/json"
        assert props.delivery_mode == 2
        assert props.headers[HEADER_BATCH_ID] == body["batch_id"]
        assert props.message_id.startswith(body["batch_id"])
        assert props.headers[HEADER_USERS] == len(decode_job(_).user_ids)

    status = (await client.get(f"/api/batches/{body['batch_id']}")).json()
    assert status["state"] == "queued"
    assert status["jobs_total"] == 3 and status["users_total"] == 2500


async def test_alias_used_by_the_client(client: httpx.AsyncClient) -> None:
    resp = await client.post("/beta_recommend", json={"user_ids": [1, 2, 3]})
    assert resp.status_code == 202 and resp.json()["jobs"] == 1


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"user_ids": []}, "at least 1 item"),
        ({"user_ids": ["1"]}, "valid integer"),
        ({"user_ids": [1.5]}, "valid integer"),
        ({"user_ids": [True]}, "valid integer"),
        ({"user_ids": [-1]}, "greater than or equal to 0"),
        ({"user_ids": [2**63]}, "less than or equal"),
        # JSON integers beyond 64 bits parse as floats, which an id never is.
        ({"user_ids": [2**64]}, "valid integer"),
        ({"user_ids": [[1]]}, "valid integer"),
        ({"users": [1]}, "user_ids"),
        ({"user_ids": [1], "extra": 1}, "Extra inputs"),
    ],
)
async def test_bad_input_is_422_with_the_reason(
    client: httpx.AsyncClient, settings: Settings, body: dict, fragment: str
) -> None:
    resp = await client.post("/api/playlist/beta_recommend/", json=body)
    assert resp.status_code == 422
    assert fragment in resp.text
    assert _get_all(settings) == []


async def test_broken_json_is_422(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        "/api/playlist/beta_recommend/",
        content=b'{"user_ids": [1,',
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 422


async def test_too_many_users_is_413(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"max_users_per_request": 10}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            resp = await c.post("/beta_recommend", json={"user_ids": list(range(11))})
    assert resp.status_code == 413 and "at most 10" in resp.text
    assert _get_all(settings) == []


async def test_reads_one_users_result(
    client: httpx.AsyncClient, settings: Settings, redis_client: redis.Redis
) -> None:
    keys = Keys(settings.redis_prefix)
    gen_keys = Keys(settings.redis_prefix)
    (raw,) = encode_results(
        np.array([[9, 8, 7]]), np.array([True]), 1_700_000_000, model_tag("bpr-x")
    )
    redis_client.hset(gen_keys.result_bucket("gen1", 4242), gen_keys.result_field(4242), raw)
    redis_client.hset(keys.models, str(model_tag("bpr-x")), "bpr-x")
    redis_client.zadd(gen_keys.history, {"gen1": 1.0})
    resp = await client.get("/api/playlist/4242")
    assert resp.status_code == 200
    assert resp.json() == {
        "user_id": 4242,
        "playlists": [9, 8, 7],
        "model_version": "bpr-x",
        "generated_at": 1_700_000_000,
        "cold": True,
        "generation": "gen1",
    }
    assert (await client.get("/api/playlist/4243")).status_code == 404
    assert (await client.get("/api/playlist/-1")).status_code == 422
    assert (await client.get("/api/playlist/abc")).status_code == 422


async def test_unknown_or_malformed_batch_ids(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/batches/nope")).status_code == 404
    assert (await client.get("/api/batches/a:b*")).status_code == 422


async def test_health_readiness_metrics_docs(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"broker": True, "redis": True}
    await client.post("/beta_recommend", json={"user_ids": [1]})
    text = (await client.get("/metrics")).text
    assert (
        'recfleet_http_requests_total{method="POST",route="/beta_recommend",status="202"}' in text
    )
    assert "recfleet_jobs_published_total" in text
    assert (await client.get("/openapi.json")).status_code == 200


async def test_oversized_body_is_413_before_it_is_read(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"max_body_bytes": 2048}))
    body = orjson.dumps({"user_ids": list(range(1000))})

    async def chunked() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 512):
            yield body[i : i + 512]

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            declared = await c.post(
                "/beta_recommend", content=body, headers={"content-type": "application/json"}
            )
            streamed = await c.post(
                "/beta_recommend", content=chunked(), headers={"content-type": "application/json"}
            )
    for resp in (declared, streamed):
        assert resp.status_code == 413 and "larger than 2048 bytes" in resp.text
    assert _get_all(settings) == []


async def test_idempotency_key_returns_the_same_batch(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    headers = {"Idempotency-Key": "daily-2026-11-24"}
    first = await client.post("/beta_recommend", json={"user_ids": [1, 2]}, headers=headers)
    again = await client.post("/beta_recommend", json={"user_ids": [1, 2]}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    assert len(_get_all(settings)) == 1

    other = await client.post("/beta_recommend", json={"user_ids": [3]}, headers=headers)
    assert other.status_code == 409 and "different body" in other.text
    bad = await client.post(
        "/beta_recommend", json={"user_ids": [3]}, headers={"Idempotency-Key": "a b"}
    )
    assert bad.status_code == 422


async def test_idempotency_key_expires_after_its_window(settings: Settings) -> None:
    headers = {"Idempotency-Key": "window-test"}
    app = create_app(settings.model_copy(update={"idempotency_window_s": 1}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            first = await c.post("/beta_recommend", json={"user_ids": [1]}, headers=headers)
            other = await c.post("/beta_recommend", json={"user_ids": [2]}, headers=headers)
            await asyncio.sleep(1.2)
            later = await c.post("/beta_recommend", json={"user_ids": [2]}, headers=headers)
    assert (first.status_code, other.status_code, later.status_code) == (202, 409, 202)
    assert first.json()["batch_id"] != later.json()["batch_id"]


async def test_idempotency_key_is_released_after_a_503(settings: Settings) -> None:
    no_broker = settings.model_copy(
        update={"amqp_url": f"amqp://guest:guest@127.0.0.1:{free_port()}/"}
    )
    headers = {"Idempotency-Key": "retry-after-503"}
    app = create_app(no_broker)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            answers = [
                await c.post("/beta_recommend", json={"user_ids": [1]}, headers=headers)
                for _ in range(2)
            ]
    for resp in answers:  # the second is not "409 still running": the key was released
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "5", resp.text
        assert "not accepted" in resp.json()["detail"]


async def test_a_claim_left_by_a_dead_gateway_is_a_lease_that_runs_out(
    settings: Settings, redis_client: redis.Redis
) -> None:
    quick = settings.model_copy(update={"publish_timeout_s": 0.3})  # a lease of 0.9 s
    headers = {"Idempotency-Key": "claimed-by-a-dead-gateway"}
    # The claim a gateway makes before publishing, as it stays when that gateway dies.
    store = IdempotencyStore(
        AsyncRedis.from_url(str(settings.redis_url)), settings.redis_prefix, 3600, 0.9
    )
    assert await store.begin(headers["Idempotency-Key"], digest(b"[null,[1]]")) is None
    await store.redis.aclose()
    app = create_app(quick)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            held = await c.post("/beta_recommend", json={"user_ids": [1]}, headers=headers)
            await asyncio.sleep(1.0)
            retried = await c.post("/beta_recommend", json={"user_ids": [1]}, headers=headers)
    assert held.status_code == 409 and "still running" in held.text
    assert retried.status_code == 202


async def test_a_batch_whose_publisher_died_ends_failed_with_the_reason(
    client: httpx.AsyncClient, settings: Settings, redis_client: redis.Redis
) -> None:
    run = {"user_ids": [1, 2], "run": True}  # a declared run: it could become current
    accepted = await client.post("/beta_recommend", json=run)
    batch_id = accepted.json()["batch_id"]
    ledger = Keys(settings.redis_prefix).batch(batch_id)
    assert redis_client.hget(ledger, "publishing") == b"0"  # released once confirmed
    # What a gateway killed between its ledger write and its confirms leaves behind.
    redis_client.hset(ledger, mapping={"publishing": 1, "publish_lease_until": time.time() - 1})
    status = (await client.get(f"/api/batches/{batch_id}")).json()
    assert status["state"] == "failed" and status["gen_state"] == "rejected"
    assert "stopped before the broker confirmed" in status["gen_reason"]


async def test_reads_answer_503_while_redis_is_down(settings: Settings, tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        private = settings.model_copy(update={"redis_url": RedisDsn(server.url)})
        app = create_app(private)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
                deadline = time.monotonic() + 10
                while (await c.get("/readyz")).json()["checks"]["redis"] is not True:
                    assert time.monotonic() < deadline, "private redis-server did not start"
                    await asyncio.sleep(0.05)
                assert (await c.get("/api/playlist/7")).status_code == 404
                server.stop()
                down = await c.get("/api/playlist/7")
                status = await c.get("/api/batches/abc")
    finally:
        server.kill()
    for resp in (down, status):
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "5"
        assert resp.json() == {"detail": "Redis is unavailable; retry later"}


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ({"RECFLEET_REDIS_URL": "redis://redis:6379/0"}, "RECFLEET_REDIS_URL has no password"),
        (
            {"RECFLEET_DATABASE_URL": "postgresql://recfleet@db:5432/recfleet"},
            "RECFLEET_DATABASE_URL has no password",
        ),
        ({"RECFLEET_AMQP_URL": "amqp://guest:guest@mq:5672/"}, "guest/guest"),
        ({"RECFLEET_API_KEYS": ""}, "no API keys"),
        ({"RECFLEET_PAGE_SECRET": "short"}, "RECFLEET_PAGE_SECRET"),
    ],
)
def test_production_refuses_default_credentials_and_missing_keys(
    monkeypatch: pytest.MonkeyPatch, override: dict[str, str], problem: str
) -> None:
    good = {
        "RECFLEET_ENVIRONMENT": "production",
        "RECFLEET_AMQP_URL": "amqp://recfleet:s3cret@mq:5672/",
        "RECFLEET_REDIS_URL": "redis://:s3cret@redis:6379/0",
        "RECFLEET_DATABASE_URL": "postgresql://recfleet:s3cret@db:5432/recfleet",
        "RECFLEET_API_KEYS": f"ops:{'0' * 64}:operator",
        "RECFLEET_PAGE_SECRET": "a-page-secret-of-enough-length",
    }
    for name, value in good.items():
        monkeypatch.setenv(name, value)
    assert Settings().environment == "production"
    monkeypatch.setenv(*next(iter(override.items())))
    with pytest.raises(ValueError, match=problem):
        Settings()
