"""Feedback against the real PostgreSQL, Redis and RabbitMQ: migrations, impressions, likes,
PostgreSQL outages, the CTR gauge, and the ``recfleet feedback`` commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np
import psycopg
import pytest
import redis
from click.testing import CliRunner
from fastapi import FastAPI
from psycopg import sql
from pydantic import PostgresDsn

from recfleet.api.app import create_app
from recfleet.cli.fleet import LocalFleet
from recfleet.cli.main import cli
from recfleet.shared.codec import encode_results, model_tag
from recfleet.shared.keys import Keys, bucket_mappings
from recfleet.shared.migrate import MIGRATIONS_DIR, MigrationError, upgrade
from recfleet.shared.settings import Settings
from tests.support.net import free_port
from tests.support.settings import database_url_for

GENERATED_AT = 1_750_000_000
GENERATION = "gen1"


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
    """Write one user's result into the current generation, the way the workers do."""
    keys = Keys(settings.redis_prefix)
    gen_keys = Keys(settings.redis_prefix)
    (raw,) = encode_results(
        np.array([playlists]), np.array([cold]), GENERATED_AT, model_tag(version)
    )
    client = redis.Redis.from_url(str(settings.redis_url))
    for key, mapping in bucket_mappings(gen_keys, GENERATION, [user_id], [raw]).items():
        client.hset(key, mapping=mapping)  # type: ignore[arg-type]
    client.hset(keys.models, str(model_tag(version)), version)
    client.zadd(gen_keys.history, {GENERATION: 1.0})
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
    assert "applied 0002_generation_is_a_batch_id" in first.output
    again = runner.invoke(cli, ["db", "upgrade", "--database-url", empty_database])
    assert again.exit_code == 0 and "up to date" in again.output
    status = runner.invoke(cli, ["db", "status", "--database-url", empty_database])
    assert "applied  0001_feedback" in status.output
    with psycopg.connect(empty_database) as conn:
        rows = conn.execute("SELECT version, name FROM schema_migrations").fetchall()
        assert rows == [(1, "feedback"), (2, "generation_is_a_batch_id")]
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
    assert sorted(results) == [[], [], [1, 2]]


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
    assert body["generation"] == GENERATION
    row = db.execute(
        "SELECT user_id, playlists, generation, model_version, cold, shown_at IS NOT NULL "
        "FROM impressions WHERE impression_id = %s",
        (uuid.UUID(body["impression_id"]),),
    ).fetchone()
    assert row == (42, [7, 3, 9], GENERATION, "bpr-a", False, True)
    # The read contract is unchanged.
    read = (await client.get("/api/playlist/42")).json()
    assert {"user_id", "playlists", "model_version", "generated_at", "cold"} <= set(read)


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
    (error,) = not_shown.json()["detail"]
    assert error["msg"].startswith("playlist 1 was not shown to user 42")
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

    await app.state.db.refresh_ctr()
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


# --- simulated users: the trained model against the popularity fallback -----------------


@pytest.mark.e2e
def test_simulated_users_like_the_trained_model_more_than_the_fallback(
    fleet_settings: Settings, database_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    """Serve the trained model, simulate users; roll out the popularity baseline, simulate
    the same users; the CTR per model version says which one they liked more."""
    from recfleet.cli.client import submit, wait
    from recfleet.shared.artifacts import read_manifest

    trained_version = read_manifest(fleet_settings.artifacts)["model_version"]
    baseline_version = f"{trained_version}-popularity"
    root = tmp_path / "models"  # a model root: workers follow its CURRENT file
    root.mkdir()
    (root / "trained").symlink_to(fleet_settings.artifacts)
    runner = CliRunner()
    made = runner.invoke(
        cli, ["feedback", "baseline", str(fleet_settings.artifacts), "--out", str(root / "popular")]
    )
    assert made.exit_code == 0, made.output
    (root / "CURRENT").write_text("trained\n")
    settings = fleet_settings.model_copy(
        update={
            "database_url": PostgresDsn(database_url),
            "artifacts": root,
            "gate_max_cold_fraction": 1.0,  # the baseline's users are all cold by design
        }
    )
    users = list(range(int(read_manifest(fleet_settings.artifacts)["n_users"])))
    simulate = ["feedback", "simulate", "--users", "1000", "--seed", "3", "--json"]
    reports = []
    with LocalFleet(settings, processes=1, log_dir=tmp_path / "logs") as fleet:
        fleet.wait_workers_consuming()
        simulate += ["--artifacts", str(root), "--api-url", fleet.base_url]
        with httpx.Client(base_url=fleet.base_url, timeout=60) as http:
            for current, version in (("trained", trained_version), ("popular", baseline_version)):
                (root / "CURRENT").write_text(current + "\n")
                time.sleep(1.5)  # workers look at CURRENT between jobs, once a second
                sub = submit(http, users, chunk=len(users), run=True)
                (status,) = wait(http, sub.batch_ids, sub.users, show=False)
                assert status["gen_state"] == "active", status
                wait_for_model(http, users[-1], version)
                result = runner.invoke(cli, simulate)
                assert result.exit_code == 0, result.output
                reports.append(json.loads(result.stdout)["models"])

    assert list(reports[0]) == [trained_version] and list(reports[1]) == [baseline_version]
    trained, baseline = reports[0][trained_version], reports[1][baseline_version]
    assert trained["impressions"] == baseline["impressions"] == 1000
    assert trained["expected_ctr"] > baseline["expected_ctr"]
    report = runner.invoke(cli, ["feedback", "ctr", "--json", "--database-url", database_url])
    ctr = json.loads(report.stdout)["models"]
    assert ctr[trained_version]["likes"] == trained["likes"]
    assert ctr[baseline_version]["likes"] == baseline["likes"]
    assert ctr[trained_version]["ctr"] > ctr[baseline_version]["ctr"]


def wait_for_model(http: httpx.Client, user_id: int, version: str, timeout: float = 10) -> None:
    """Wait until the gateway serves ``user_id`` a result of ``version``."""
    deadline = time.monotonic() + timeout
    while True:
        served = http.get(f"/api/playlist/{user_id}").json().get("model_version")
        if served == version:
            return
        assert time.monotonic() < deadline, f"still serving {served}, not {version}"
        time.sleep(0.2)


class TcpProxy:
    """A TCP forwarder to the PostgreSQL server: stopping it is PostgreSQL going away for
    the gateway, without touching the server other tests use."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port = port
        self.target = target
        self.server: asyncio.Server | None = None
        self.transports: list[asyncio.WriteTransport] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def stop(self) -> None:
        """Stop listening and cut every open connection, like a crashed server."""
        assert self.server is not None
        self.server.close()
        for transport in self.transports:
            transport.abort()
        self.transports.clear()
        await self.server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.transports += [writer.transport, up_writer.transport]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


async def test_postgres_going_away_and_coming_back(
    settings: Settings, database_url: str, db: psycopg.Connection
) -> None:
    real = urlsplit(database_url)
    proxy = TcpProxy(free_port(), (real.hostname or "127.0.0.1", real.port or 5432))
    via_proxy = urlunsplit(real._replace(netloc=f"{real.username}@127.0.0.1:{proxy.port}"))
    app = create_app(settings.model_copy(update={"database_url": PostgresDsn(via_proxy)}))
    store_result(settings, 42, [7, 3, 9], "bpr-a")
    async for client in started(app):  # PostgreSQL is down when the gateway starts
        assert (await client.post("/api/impressions", json={"user_id": 42})).status_code == 503
        await proxy.start()
        shown = await eventually_201(client, "/api/impressions", {"user_id": 42})
        await proxy.stop()  # down again, with connections open in the pool
        like = like_body(shown, 3)
        down = await client.post("/api/feedback", json=like)
        assert down.status_code == 503, down.text
        await proxy.start()
        again = await eventually_201(client, "/api/feedback", like)
        assert again["rank"] == 2
        await proxy.stop()
    assert count(db, "impressions") == 1 and count(db, "feedback") == 1


async def eventually_201(client: httpx.AsyncClient, path: str, body: dict) -> dict:
    """Post until the gateway answers 201 (it reconnects on its own); fail after 30 s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        resp = await client.post(path, json=body)
        if resp.status_code == 201 or loop.time() > deadline:
            break
        assert resp.status_code == 503, resp.text
        await asyncio.sleep(0.5)
    assert resp.status_code == 201, f"{path} still {resp.status_code} after 30 s: {resp.text}"
    return dict(resp.json())
