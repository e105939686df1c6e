"""Feedback against the real PostgreSQL, Redis and RabbitMQ: migrations, impressions, likes,
PostgreSQL outages, the CTR gauge, and the ``recfleet feedback`` commands."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import psycopg
import pytest
import redis
from click.testing import CliRunner
from fastapi import FastAPI
from psycopg import sql
from pydantic import PostgresDsn

from api.app import create_app
from cli.main import cli
from shared.feedback import generation_of
from shared.migrate import MIGRATIONS_DIR, MigrationError, upgrade
from shared.settings import Settings
from shared.store import Keys, encode_results, model_tag
from tests.conftest import database_url_for, free_port

GENERATED_AT = 1_750_000_000


@pytest.fixture
def empty_database(services: None) -> Iterator[str]:
    """A database of its own, without any table; dropped afterwards."""
    name = f"rftest_{uuid.uuid4().hex[:12]}"
    admin = str(Settings().database_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield database_url_for(name)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    """The session's feedback database, emptied before the test."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("TRUNCATE feedback, impressions")
        yield conn


@pytest.fixture
def feedback_settings(settings: Settings, database_url: str, db: psycopg.Connection) -> Settings:
    return settings.model_copy(update={"database_url": PostgresDsn(database_url)})


async def started(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            yield c


@pytest.fixture
async def app(feedback_settings: Settings) -> FastAPI:
    return create_app(feedback_settings)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async for c in started(app):
        yield c


def store_result(
    settings: Settings, user_id: int, playlists: list[int], version: str, cold: bool = False
) -> None:
    """Write one user's result the way the workers do."""
    keys = Keys(settings.redis_prefix)
    (raw,) = encode_results(
        np.array([playlists]), np.array([cold]), GENERATED_AT, model_tag(version)
    )
    client = redis.Redis.from_url(str(settings.redis_url))
    client.hset(keys.bucket_of(user_id), str(user_id), raw)
    client.hset(keys.models, str(model_tag(version)), version)
    client.close()


def like_body(impression: dict, playlist_id: int, like_id: str | None = None) -> dict:
    return {
        "like_id": like_id or str(uuid.uuid4()),
        "impression_id": impression["impression_id"],
        "user_id": impression["user_id"],
        "playlist_id": playlist_id,
    }


def count(conn: psycopg.Connection, table: str) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()
    assert row is not None
    return int(row[0])


# --- migrations -------------------------------------------------------------------------


def test_db_upgrade_applies_each_migration_once(empty_database: str) -> None:
    runner = CliRunner()
    first = runner.invoke(cli, ["db", "upgrade", "--database-url", empty_database])
    assert first.exit_code == 0, first.output
    assert "applied 0001_feedback" in first.output
    again = runner.invoke(cli, ["db", "upgrade", "--database-url", empty_database])
    assert again.exit_code == 0 and "up to date" in again.output
    status = runner.invoke(cli, ["db", "status", "--database-url", empty_database])
    assert "applied  0001_feedback" in status.output
    with psycopg.connect(empty_database) as conn:
        rows = conn.execute("SELECT version, name FROM schema_migrations").fetchall()
        assert rows == [(1, "feedback")]
        assert count(conn, "impressions") == 0 and count(conn, "feedback") == 0


def test_concurrent_upgrades_apply_once(empty_database: str) -> None:
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append([m.version for m in upgrade(empty_database)])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == [[], [], [1]]


def test_a_failing_migration_applies_nothing(empty_database: str, tmp_path: Path) -> None:
    (tmp_path / "0001_feedback.sql").write_text((MIGRATIONS_DIR / "0001_feedback.sql").read_text())
    (tmp_path / "0002_broken.sql").write_text("ALTER TABLE impressions ADD COLUMN x nosuchtype;")
    result = CliRunner().invoke(
        cli, ["db", "upgrade", "--database-url", empty_database, "--dir", str(tmp_path)]
    )
    assert result.exit_code != 0 and "nothing applied" in result.output
    with psycopg.connect(empty_database) as conn:
        assert conn.execute("SELECT to_regclass('impressions')").fetchone() == (None,)
        assert conn.execute("SELECT to_regclass('schema_migrations')").fetchone() == (None,)


def test_an_edited_migration_is_refused(empty_database: str, tmp_path: Path) -> None:
    original = (MIGRATIONS_DIR / "0001_feedback.sql").read_text()
    (tmp_path / "0001_feedback.sql").write_text(original)
    upgrade(empty_database, tmp_path)
    (tmp_path / "0001_feedback.sql").write_text(original + "\n-- edited\n")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        upgrade(empty_database, tmp_path)
    (tmp_path / "0001_feedback.sql").write_text(original)
    (tmp_path / "1_bad-name.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"NNNN_name\.sql"):
        upgrade(empty_database, tmp_path)


# --- impressions and likes --------------------------------------------------------------


async def test_an_impression_records_what_was_served(
    client: httpx.AsyncClient, feedback_settings: Settings, db: psycopg.Connection
) -> None:
    store_result(feedback_settings, 42, [7, 3, 9], "bpr-a")
    resp = await client.post("/api/impressions", json={"user_id": 42})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["playlists"] == [7, 3, 9] and body["model_version"] == "bpr-a"
    assert body["generated_at"] == GENERATED_AT and body["cold"] is False
    assert body["generation"] == generation_of(GENERATED_AT) == "2025-06-15T15:06:40Z"
    row = db.execute(
        "SELECT user_id, playlists, generation, model_version, cold, shown_at IS NOT NULL "
        "FROM impressions WHERE impression_id = %s",
        (uuid.UUID(body["impression_id"]),),
    ).fetchone()
    assert row == (42, [7, 3, 9], "2025-06-15T15:06:40Z", "bpr-a", False, True)
    # The read contract is unchanged.
    read = (await client.get("/api/playlist/42")).json()
    assert set(read) == {"user_id", "playlists", "model_version", "generated_at", "cold"}


async def test_no_result_is_404_and_bad_bodies_are_422(
    client: httpx.AsyncClient, db: psycopg.Connection
) -> None:
    resp = await client.post("/api/impressions", json={"user_id": 5})
    assert resp.status_code == 404 and "no recommendations for user 5" in resp.text
    for body in ({"user_id": "5"}, {"user_id": -1}, {"user_id": 5, "x": 1}, {}):
        assert (await client.post("/api/impressions", json=body)).status_code == 422
    assert count(db, "impressions") == 0


async def test_a_like_is_recorded_once_with_its_rank(
    client: httpx.AsyncClient, feedback_settings: Settings, db: psycopg.Connection
) -> None:
    store_result(feedback_settings, 42, [7, 3, 9], "bpr-a")
    shown = (await client.post("/api/impressions", json={"user_id": 42})).json()
    body = like_body(shown, 3)
    first = await client.post("/api/feedback", json=body)
    assert first.status_code == 201, first.text
    assert first.json()["rank"] == 2 and first.json()["like_id"] == body["like_id"]
    retry = await client.post("/api/feedback", json=body)
    assert retry.status_code == 200 and retry.json() == first.json()
    # The same shown playlist liked again under a new id is still one like.
    twice = await client.post("/api/feedback", json=like_body(shown, 3))
    assert twice.status_code == 200 and twice.json()["like_id"] == body["like_id"]
    # A like id reused for another like is a conflict.
    reused = await client.post("/api/feedback", json={**body, "playlist_id": 9})
    assert reused.status_code == 409
    rows = db.execute("SELECT user_id, playlist_id, rank, impression_id FROM feedback").fetchall()
    assert rows == [(42, 3, 2, uuid.UUID(shown["impression_id"]))]
    other = await client.post("/api/feedback", json=like_body(shown, 7))
    assert other.status_code == 201 and other.json()["rank"] == 1
    assert count(db, "feedback") == 2


async def test_a_like_of_a_playlist_not_shown_is_refused(
    client: httpx.AsyncClient, feedback_settings: Settings, db: psycopg.Connection
) -> None:
    store_result(feedback_settings, 42, [7, 3, 9], "bpr-a")
    store_result(feedback_settings, 43, [1, 2], "bpr-a")
    shown = (await client.post("/api/impressions", json={"user_id": 42})).json()
    not_shown = await client.post("/api/feedback", json=like_body(shown, 1))
    assert not_shown.status_code == 422
    assert not_shown.json()["detail"].startswith("playlist 1 was not shown to user 42")
    other_user = await client.post("/api/feedback", json={**like_body(shown, 7), "user_id": 43})
    assert other_user.status_code == 422 and "was not shown to user 43" in other_user.text
    unknown = await client.post(
        "/api/feedback", json={**like_body(shown, 7), "impression_id": str(uuid.uuid4())}
    )
    assert unknown.status_code == 422 and "no impression" in unknown.text
    for bad in (
        {**like_body(shown, 7), "like_id": "not-a-uuid"},
        {**like_body(shown, 7), "playlist_id": "7"},
        {**like_body(shown, 7), "rank": 1},
        {k: v for k, v in like_body(shown, 7).items() if k != "like_id"},
    ):
        assert (await client.post("/api/feedback", json=bad)).status_code == 422
    assert count(db, "feedback") == 0


async def test_postgres_down_is_503_with_a_reason(
    settings: Settings, database_url: str, db: psycopg.Connection
) -> None:
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    app = create_app(settings.model_copy(update={"database_url": PostgresDsn(closed)}))
    store_result(settings, 42, [7, 3, 9], "bpr-a")
    async for client in started(app):  # the gateway starts without PostgreSQL
        shown = await client.post("/api/impressions", json={"user_id": 42})
        assert shown.status_code == 503 and shown.headers["retry-after"]
        assert "feedback database unreachable" in shown.json()["detail"]
        fake = {"impression_id": str(uuid.uuid4()), "user_id": 42}
        like = await client.post("/api/feedback", json=like_body(fake, 7))
        assert like.status_code == 503 and "unreachable" in like.json()["detail"]
        # Recommendations are still served from Redis.
        assert (await client.get("/api/playlist/42")).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'recfleet_feedback_failures_total{reason="database"}' in metrics
    assert count(db, "impressions") == 0 and count(db, "feedback") == 0


async def test_missing_tables_are_503(settings: Settings, empty_database: str) -> None:
    app = create_app(settings.model_copy(update={"database_url": PostgresDsn(empty_database)}))
    store_result(settings, 42, [7], "bpr-a")
    async for client in started(app):
        resp = await client.post("/api/impressions", json={"user_id": 42})
    assert resp.status_code == 503 and "recfleet db upgrade" in resp.json()["detail"]


async def test_connections_lost_under_the_pool_are_replaced(
    client: httpx.AsyncClient, feedback_settings: Settings, db: psycopg.Connection
) -> None:
    store_result(feedback_settings, 42, [7, 3, 9], "bpr-a")
    shown = (await client.post("/api/impressions", json={"user_id": 42})).json()
    # Kill the gateway's connections server-side, as a PostgreSQL restart would.
    killed = db.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = 'recfleet-gateway'"
    ).fetchone()
    assert killed is not None and killed[0] >= 1
    resp = await client.post("/api/feedback", json=like_body(shown, 9))
    assert resp.status_code == 201 and resp.json()["rank"] == 3


# --- CTR, metrics and export ------------------------------------------------------------


async def test_ctr_gauge_cli_and_export(
    app: FastAPI,
    client: httpx.AsyncClient,
    feedback_settings: Settings,
    database_url: str,
    tmp_path: Path,
) -> None:
    store_result(feedback_settings, 1, [10, 11, 12], "bpr-a")
    store_result(feedback_settings, 2, [10, 13, 14], "bpr-a")
    store_result(feedback_settings, 3, [20, 21], "popular", cold=True)
    shown = {}
    for user in (1, 2, 3, 3):
        shown[user] = (await client.post("/api/impressions", json={"user_id": user})).json()
    assert (await client.post("/api/feedback", json=like_body(shown[1], 11))).status_code == 201
    assert (await client.post("/api/feedback", json=like_body(shown[1], 12))).status_code == 201
    assert (await client.post("/api/feedback", json=like_body(shown[3], 21))).status_code == 201

    await app.state.clients.db.refresh_ctr()
    metrics = (await client.get("/metrics")).text
    assert 'recfleet_feedback_ctr{model_version="bpr-a"} 0.5' in metrics
    assert 'recfleet_feedback_ctr{model_version="popular"} 0.5' in metrics
    assert 'recfleet_feedback_window_impressions{model_version="popular"} 2.0' in metrics
    assert 'recfleet_feedback_likes_total{model_version="bpr-a"} ' in metrics

    runner = CliRunner()
    out = runner.invoke(cli, ["feedback", "ctr", "--json", "--database-url", database_url])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["models"]["bpr-a"] == {"impressions": 2, "clicked": 1, "likes": 2, "ctr": 0.5}
    assert report["models"]["popular"]["ctr"] == 0.5
    assert {d["model_version"] for d in report["days"]} == {"bpr-a", "popular"}
    table = runner.invoke(cli, ["feedback", "ctr", "--database-url", database_url])
    assert "bpr-a" in table.output and "50.0%" in table.output

    path = tmp_path / "triplets.npy"
    today = report["since"]  # any date up to today includes every like
    exp = runner.invoke(
        cli,
        [
            "feedback",
            "export",
            "--since",
            today,
            "--out",
            str(path),
            "--database-url",
            database_url,
        ],
    )
    assert exp.exit_code == 0, exp.output
    triplets = np.load(path)
    assert triplets.dtype == np.int64 and triplets.shape == (3, 3)
    # Each like against every playlist of its impression that was not liked.
    assert sorted(map(tuple, triplets.tolist())) == [(1, 11, 10), (1, 12, 10), (3, 21, 20)]
    later = runner.invoke(
        cli,
        [
            "feedback",
            "export",
            "--since",
            "2999-01-01",
            "--out",
            str(path),
            "--database-url",
            database_url,
        ],
    )
    assert later.exit_code == 0 and np.load(path).shape == (0, 3)
