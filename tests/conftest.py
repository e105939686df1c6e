"""Fixtures that talk to the real RabbitMQ, Redis and PostgreSQL on localhost.

A service that does not answer is a test failure, never a skip. Each test session
uses its own queue names and Redis prefix, and deletes them afterwards.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
import redis

from shared.messages import new_id
from shared.settings import Settings
from shared.topology import queue_names


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_settings(artifacts: Path, **overrides: object) -> Settings:
    """Settings with private queue names, Redis prefix and ports."""
    run = new_id()[:10]
    values: dict[str, object] = {
        "environment": "test",
        "jobs_queue": f"rftest-{run}.jobs",
        "dead_letter_queue": f"rftest-{run}.dlq",
        "dead_letter_exchange": f"rftest-{run}.dlx",
        "dead_events_queue": f"rftest-{run}.dead-events",
        "sync_queue": f"rftest-{run}.sync",
        "redis_prefix": f"rftest-{run}",
        "artifacts": artifacts,
        "api_port": free_port(),
        "metrics_port": free_port(),
        "heartbeat_s": 10,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def purge(settings: Settings) -> None:
    """Delete the Redis keys and broker objects of one settings object."""
    client = redis.Redis.from_url(str(settings.redis_url))
    keys = list(client.scan_iter(match=f"{settings.redis_prefix}:*", count=1000))
    for i in range(0, len(keys), 1000):
        client.unlink(*keys[i : i + 1000])
    client.close()
    conn = pika.BlockingConnection(pika.URLParameters(str(settings.amqp_url)))
    channel = conn.channel()
    for queue in queue_names(settings):
        channel.queue_delete(queue)
    channel.exchange_delete(settings.dead_letter_exchange)
    conn.close()


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
    from offline.build import build_artifacts

    out = tmp_path_factory.mktemp("artifacts") / "small"
    build_artifacts(out, n_users=6000, n_playlists=1000, seed=7, epochs=3)
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


def database_url_for(name: str) -> str:
    """The configured PostgreSQL server's URL with another database name."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(str(Settings().database_url))
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def database_url(services: None) -> Iterator[str]:
    """A fresh PostgreSQL database of this test session, migrated; dropped afterwards."""
    import psycopg
    from psycopg import sql

    from shared.migrate import upgrade

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
