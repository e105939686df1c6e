"""Fixtures that talk to the real RabbitMQ, Redis and PostgreSQL on localhost.

A service that does not answer is a test failure, never a skip. Each test session
uses its own queue names and Redis prefix, and deletes them afterwards. Helpers the tests
share live in tests/support; this file holds fixtures only.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import redis

from recfleet.shared.messages import new_id
from recfleet.shared.redis import redis_client as connect_redis
from recfleet.shared.settings import Settings
from tests.support.settings import database_url_for, make_settings, purge

if TYPE_CHECKING:
    from recfleet.worker.consumer import Consumer
    from recfleet.worker.handler import JobHandler


@pytest.fixture(scope="session")
def services() -> None:
    """Fail loudly when a service the tests need is not running."""
    for name, port in (("RabbitMQ", 5672), ("Redis", 6379), ("PostgreSQL", 5432)):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=3).close()
        except OSError as exc:
            pytest.fail(
                f"{name} is not answering on 127.0.0.1:{port} ({exc}); ./run setup starts it"
            )


@pytest.fixture(scope="session")
def small_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small but real artifact directory (synthetic data, kNN pairing, BPR training)."""
    from recfleet.offline.build import build_artifacts

    out = tmp_path_factory.mktemp("artifacts") / "small"
    build_artifacts(out, n_users=6000, n_playlists=1000, seed=7, epochs=3)
    return out


@pytest.fixture(scope="session")
def sharded_artifacts(small_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small artifacts split into 2 shards by ``recfleet artifacts shard``."""
    from click.testing import CliRunner

    from recfleet.cli.main import cli

    out = tmp_path_factory.mktemp("sharded") / "two"
    args = ["artifacts", "shard", str(small_artifacts), "--shards", "2", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def settings(services: None, tmp_path: Path) -> Iterator[Settings]:
    """Private settings for tests that need no model (the gateway alone)."""
    s = make_settings(tmp_path / "no-artifacts")
    yield s
    purge(s)


@pytest.fixture
def fleet_settings(services: None, small_artifacts: Path) -> Iterator[Settings]:
    """Private settings pointing at the small artifacts, for tests that run workers."""
    s = make_settings(small_artifacts)
    yield s
    purge(s)


@pytest.fixture
def redis_client(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(str(settings.redis_url))
    yield client
    client.close()


@pytest.fixture(scope="session")
def database_url(services: None) -> Iterator[str]:
    """A fresh PostgreSQL database of this test session, migrated; dropped afterwards."""
    import psycopg
    from psycopg import sql

    from recfleet.shared.migrate import upgrade

    name = f"rftest_{new_id()[:12]}"
    admin = str(Settings().database_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = database_url_for(name)
    try:
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def handler(fleet_settings: Settings) -> Iterator[JobHandler]:
    """A real job handler: the small artifacts, real Redis."""
    from recfleet.worker.handler import JobHandler
    from recfleet.worker.models import ModelStore

    client = connect_redis(fleet_settings)
    models = ModelStore(fleet_settings.artifacts, k=fleet_settings.top_k)
    yield JobHandler(fleet_settings, models, client)
    client.close()


@pytest.fixture
def running_consumer(handler: JobHandler, fleet_settings: Settings) -> Iterator[Consumer]:
    """A real consumer on a thread, consuming from the real broker until the test ends."""
    from recfleet.worker.consumer import Consumer

    consumer = Consumer(fleet_settings, handler)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not consumer.healthy:
        assert time.monotonic() < deadline, "consumer did not start"
        time.sleep(0.05)
    yield consumer
    consumer.stop()
    thread.join(timeout=60)
    assert not thread.is_alive()


@pytest.fixture
async def fleet_api(fleet_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway app in-process (real broker and Redis), re-reading generations at once."""
    from recfleet.api.app import create_app

    app = create_app(fleet_settings.model_copy(update={"generation_refresh_s": 0.001}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            yield c
