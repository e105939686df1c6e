"""Generation tests: batches written through the real job handler, a private Redis."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pika
import redis

from recfleet.shared.keys import Keys
from recfleet.shared.ledger import new_batch_fields
from recfleet.shared.messages import decode_job, make_jobs
from recfleet.shared.settings import Settings
from recfleet.worker.handler import JobHandler


def run_batch(
    handler: JobHandler,
    batch_id: str,
    users: list[int],
    *,
    last: bool = True,
    run: bool = True,
    job_size: int = 100,
) -> None:
    """Create a sealed batch (a declared run unless ``run`` is False) and handle its jobs
    (all, or all but the last)."""
    jobs = make_jobs(batch_id, users, job_size)
    handler.redis.hset(
        Keys(handler.settings.redis_prefix).batch(batch_id),
        mapping=new_batch_fields(len(jobs), len(users), run=run),
    )
    for job in jobs if last else jobs[:-1]:
        handler.handle(job)


def handle_queued(handler: JobHandler, settings: Settings) -> int:
    """Take every job waiting on the jobs queue and handle it here. Returns jobs handled."""
    conn = pika.BlockingConnection(pika.URLParameters(str(settings.amqp_url)))
    handled = 0
    try:
        channel = conn.channel()
        while True:
            method, _props, body = channel.basic_get(settings.jobs_queue, auto_ack=True)
            if method is None:
                return handled
            handler.handle(decode_job(body))
            handled += 1
    finally:
        conn.close()


async def generations_of(api: httpx.AsyncClient, users: list[int]) -> dict[int, str | None]:
    """Each user's generation as the gateway serves it (None: 404)."""
    out: dict[int, str | None] = {}
    for uid in users:
        resp = await api.get(f"/api/playlist/{uid}")
        assert resp.status_code in (200, 404), resp.text
        out[uid] = resp.json()["generation"] if resp.status_code == 200 else None
    return out


@contextmanager
def private_redis(directory: Path, port: int) -> Iterator[str]:
    """A Redis of one test alone (its figures and command counts are the test's only);
    stopped by its pid afterwards. Yields its URL."""
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "private redis-server did not start"
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
