"""The worker's job handling against real Redis and RabbitMQ (no gateway)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pika
import redis

from recfleet.shared.artifacts import load_artifacts
from recfleet.shared.codec import decode_result
from recfleet.shared.keys import BASE, Keys
from recfleet.shared.ledger import new_batch_fields
from recfleet.shared.messages import make_jobs
from recfleet.shared.settings import Settings
from recfleet.shared.topology import HEADER_BATCH_ID, HEADER_USERS, declare_blocking, topology
from recfleet.worker.consumer import Consumer
from recfleet.worker.handler import JobHandler
from recfleet.worker.lanes import BATCH, PriorityLane
from recfleet.worker.ranking import Ranker


def _snapshot(client: redis.Redis, prefix: str) -> dict[bytes, object]:
    out: dict[bytes, object] = {}
    for key in sorted(client.scan_iter(match=f"{prefix}:*")):
        kind = client.type(key)
        if kind == b"hash":
            out[key] = client.hgetall(key)
        elif kind == b"set":
            out[key] = client.smembers(key)
    return out


def test_results_equal_direct_ranking_and_cold_users_get_the_fallback(
    handler: JobHandler, fleet_settings: Settings
) -> None:
    art = load_artifacts(fleet_settings.artifacts)
    users = [0, 1, 2, 500, art.n_users - 1, 10**12]
    (job,) = make_jobs("b1", users, 1000)  # no ledger: ad-hoc, into live (none current)
    summary = handler.handle(job)
    assert summary.users == 6 and summary.cold >= 1
    assert summary.model_version == art.model_version

    direct = Ranker.from_artifacts(art, k=fleet_settings.top_k).rank(art.user_rows(np.array(users)))
    keys = Keys(fleet_settings.redis_prefix)
    for i, uid in enumerate(users):
        raw = handler.redis.hget(keys.result_bucket(BASE, uid), keys.result_field(uid))
        assert raw is not None
        result = decode_result(raw)
        rows = direct.playlists[i][direct.playlists[i] >= 0]
        assert result.playlists == art.playlist_ids[rows].tolist()
        assert result.cold == bool(direct.cold[i])
        assert result.generated_at == int(job.created_at)
    unknown = decode_result(
        handler.redis.hget(keys.result_bucket(BASE, 10**12), keys.result_field(10**12)) or b""
    )
    assert unknown.cold
    assert unknown.playlists == art.playlist_ids[art.fallback[: fleet_settings.top_k]].tolist()


def test_a_redelivered_job_changes_nothing(handler: JobHandler, fleet_settings: Settings) -> None:
    keys = Keys(fleet_settings.redis_prefix)
    jobs = make_jobs("b2", list(range(1500)), 1000)
    handler.redis.hset(keys.batch("b2"), mapping=new_batch_fields(len(jobs), 1500, run=True))
    for job in jobs:
        handler.handle(job)
    before = _snapshot(handler.redis, fleet_settings.redis_prefix)
    handler.handle(jobs[0])
    handler.handle(jobs[1])
    assert _snapshot(handler.redis, fleet_settings.redis_prefix) == before
    ledger = handler.redis.hgetall(keys.batch("b2"))
    assert ledger[b"jobs_done"] == b"2" and ledger[b"users_done"] == b"1500"


def _wait_for(predicate, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_consumer_ranks_jobs_and_dead_letters_bad_messages(
    running_consumer: Consumer, handler: JobHandler, fleet_settings: Settings
) -> None:
    keys = Keys(fleet_settings.redis_prefix)
    jobs = make_jobs("b3", list(range(2000)), 1000)
    handler.redis.hset(keys.batch("b3"), mapping=new_batch_fields(len(jobs) + 1, 2100, run=True))
    conn = pika.BlockingConnection(pika.URLParameters(str(fleet_settings.amqp_url)))
    channel = conn.channel()
    declare_blocking(channel, topology(fleet_settings))
    channel.confirm_delivery()
    for job in jobs:
        channel.basic_publish("", fleet_settings.jobs_queue, job.encode())
    bad_props = pika.BasicProperties(
        message_id="b3-9", headers={HEADER_BATCH_ID: "b3", HEADER_USERS: 100}
    )
    channel.basic_publish("", fleet_settings.jobs_queue, b"\x00garbage", bad_props)

    def ledger() -> dict[bytes, bytes]:
        return handler.redis.hgetall(keys.batch("b3"))  # type: ignore[return-value]

    _wait_for(lambda: ledger().get(b"jobs_done") == b"2" and ledger().get(b"jobs_dead") == b"1")
    _wait_for(
        lambda: (
            channel.queue_declare(
                fleet_settings.dead_letter_queue, passive=True
            ).method.message_count
            == 1
        )
    )
    method, _props, body = channel.basic_get(fleet_settings.dead_letter_queue, auto_ack=True)
    assert method is not None and body == b"\x00garbage"
    assert ledger()[b"users_dead"] == b"100"
    conn.close()


async def test_users_of_dead_lettered_jobs_are_listed_on_request(
    running_consumer: Consumer, handler: JobHandler, fleet_settings: Settings
) -> None:
    import httpx

    from recfleet.api.app import create_app

    keys = Keys(fleet_settings.redis_prefix)
    jobs = make_jobs("b4", list(range(1500)), 1000)
    handler.redis.hset(keys.batch("b4"), mapping=new_batch_fields(len(jobs), 1500, run=True))
    conn = pika.BlockingConnection(pika.URLParameters(str(fleet_settings.amqp_url)))
    channel = conn.channel()
    channel.confirm_delivery()
    channel.basic_publish("", fleet_settings.jobs_queue, jobs[0].encode())
    # The second job reaches the dead-letter exchange as the broker's delivery limit
    # would send it: its copy on the dead-events queue is what the worker counts.
    props = pika.BasicProperties(
        message_id=jobs[1].job_id, headers={HEADER_BATCH_ID: "b4", HEADER_USERS: 500}
    )
    channel.basic_publish(
        fleet_settings.dead_letter_exchange,
        fleet_settings.dead_letter_queue,
        jobs[1].encode(),
        props,
    )
    conn.close()
    _wait_for(lambda: handler.redis.hget(keys.batch("b4"), "jobs_dead") == b"1")
    _wait_for(lambda: handler.redis.hget(keys.batch("b4"), "jobs_done") == b"1")

    app = create_app(fleet_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            plain = (await c.get("/api/batches/b4")).json()
            listed = (await c.get("/api/batches/b4", params={"failed_users": "true"})).json()
    assert plain["state"] == "failed" and plain["failed_user_ids"] is None
    assert listed["failed_user_ids"] == list(range(1000, 1500))
    assert listed["failed_user_ids_truncated"] is False
    assert listed["gen_state"] == "rejected"  # 33 % of users dead-lettered: over the gate


def test_worker_http_probes_tell_consuming_from_alive(running_consumer: Consumer) -> None:
    import httpx

    from recfleet.worker.server import serve

    server = serve("127.0.0.1", 0, lambda: running_consumer.healthy, lambda: running_consumer.alive)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert httpx.get(f"{base}/healthz").status_code == 200
        assert httpx.get(f"{base}/livez").status_code == 200
        assert "recfleet_worker_jobs_total" in httpx.get(f"{base}/metrics").text
        running_consumer.stop()
        _wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 503)
        assert httpx.get(f"{base}/nope").status_code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_the_lane_settles_held_work_when_nothing_is_queued_and_before_it_stops() -> None:
    """The consumer confirms a job's write after ranking the next one, or, through the
    lane's idle hook, as soon as no job waits: the hook runs while the lane still counts
    itself busy (so a draining consumer waits for the ack), and once more as it stops."""
    seen: list[object] = []
    lanes: list[PriorityLane] = []
    lane = PriorityLane(on_idle=lambda: seen.append(("idle", lanes[0].idle)))
    lanes.append(lane)
    gate = threading.Event()
    lane.submit(BATCH, gate.wait)
    lane.submit(BATCH, lambda: seen.append("a"))
    lane.submit(BATCH, lambda: seen.append("b"))
    gate.set()
    deadline = time.monotonic() + 10
    while not lane.idle:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert seen == ["a", "b", ("idle", False)]
    lane.shutdown()
    assert seen == ["a", "b", ("idle", False), ("idle", False)]
