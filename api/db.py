"""The gateway's feedback database: a psycopg connection pool, the writes of impressions and
likes, and the click-through-rate gauge refreshed from PostgreSQL.

The pool opens without waiting, so the gateway starts (and serves recommendations) while
PostgreSQL is down; feedback requests then fail fast with ``DatabaseUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import psycopg
from prometheus_client import Counter, Gauge
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from recfleet.api.metrics import REGISTRY
from recfleet.shared import metrics as names
from recfleet.shared.errors import Conflict, PermanentError, TransientError
from recfleet.shared.feedback import CTR_BY_MODEL, Impression, Like, LikeRequest, to_ctr_rows
from recfleet.shared.settings import Settings

log = logging.getLogger(__name__)

POOL_MAX_SIZE = 8
POOL_TIMEOUT_S = 3.0  # how long a request waits for a connection before answering 503
# A reconnection attempt backs off exponentially and gives up after this long; the next
# request starts a new one. Short, so the gateway is back soon after a long outage.
RECONNECT_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 3
STATEMENT_TIMEOUT_MS = 5000
CTR_WINDOW = timedelta(hours=24)
CTR_REFRESH_S = 60.0

CTR = Gauge(
    names.FEEDBACK_CTR,
    "Share of impressions of the last 24 h that got a like",
    ["model_version"],
    registry=REGISTRY,
)
WINDOW_IMPRESSIONS = Gauge(
    names.FEEDBACK_WINDOW_IMPRESSIONS,
    "Impressions of the last 24 h (the CTR's denominator)",
    ["model_version"],
    registry=REGISTRY,
)
IMPRESSIONS = Counter(
    names.FEEDBACK_IMPRESSIONS, "Impressions recorded", ["model_version"], registry=REGISTRY
)
LIKES = Counter(names.FEEDBACK_LIKES, "New likes recorded", ["model_version"], registry=REGISTRY)
FAILURES = Counter(
    names.FEEDBACK_FAILURES,
    "Feedback requests refused or failed",
    ["reason"],
    registry=REGISTRY,
)


class DatabaseUnavailable(TransientError):
    """PostgreSQL cannot be reached, or its schema is not there; nothing was written."""


class LikeRefused(PermanentError):
    """The like does not answer a list shown to that user."""


class LikeConflict(Conflict):
    """The like id is already taken by a different like."""


INSERT_IMPRESSION = """
INSERT INTO impressions (impression_id, user_id, playlists, generation, model_version, cold)
VALUES (%(impression_id)s, %(user_id)s, %(playlists)s, %(generation)s, %(model_version)s,
        %(cold)s)
RETURNING shown_at
"""
SELECT_IMPRESSION = """
SELECT user_id, playlists, model_version FROM impressions WHERE impression_id = %s
"""
INSERT_LIKE = """
INSERT INTO feedback (like_id, impression_id, user_id, playlist_id, rank)
VALUES (%(like_id)s, %(impression_id)s, %(user_id)s, %(playlist_id)s, %(rank)s)
ON CONFLICT DO NOTHING
RETURNING like_id, impression_id, user_id, playlist_id, rank, liked_at
"""
# A retried like: the row with this like id, else the like of the same shown playlist.
SELECT_LIKE = """
SELECT like_id, impression_id, user_id, playlist_id, rank, liked_at
FROM feedback
WHERE like_id = %(like_id)s OR (impression_id = %(impression_id)s AND playlist_id = %(playlist_id)s)
ORDER BY like_id = %(like_id)s DESC
LIMIT 1
"""
LIKE_FIELDS = ("like_id", "impression_id", "user_id", "playlist_id", "rank", "liked_at")


class Database:
    """The connection pool and the CTR refresher; opened and closed by the lifespan."""

    def __init__(self, settings: Settings, ctr_refresh_s: float = CTR_REFRESH_S) -> None:
        self.pool: AsyncConnectionPool = AsyncConnectionPool(
            str(settings.database_url),
            open=False,
            min_size=1,
            max_size=POOL_MAX_SIZE,
            timeout=POOL_TIMEOUT_S,
            reconnect_timeout=RECONNECT_TIMEOUT_S,
            name="feedback",
            check=AsyncConnectionPool.check_connection,
            kwargs={
                "connect_timeout": CONNECT_TIMEOUT_S,
                "application_name": "recfleet-gateway",
                "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
            },
        )
        self.ctr_refresh_s = ctr_refresh_s
        self._refresher: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Start connecting in the background and start the CTR refresher; never waits."""
        await self.pool.open(wait=False)
        self._refresher = asyncio.create_task(self._refresh_forever(), name="ctr-refresher")

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        await self.pool.close()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A connection in a transaction: committed when the block ends, rolled back if it
        raises.

        Raises DatabaseUnavailable when no connection comes within POOL_TIMEOUT_S, the
        connection fails, or the tables are missing.
        """
        try:
            async with self.pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise DatabaseUnavailable(
                f"feedback database unreachable (no connection within {POOL_TIMEOUT_S:g} s)"
            ) from exc
        except psycopg.errors.UndefinedTable as exc:
            raise DatabaseUnavailable(
                "feedback tables are missing; run `recfleet db upgrade`"
            ) from exc
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"feedback database failed: {exc}".strip()) from exc

    async def record_impression(
        self,
        user_id: int,
        playlists: list[int],
        model_version: str,
        generated_at: float,
        generation: str,
        cold: bool,
    ) -> Impression:
        """Record that ``user_id`` was shown ``playlists``. Raises DatabaseUnavailable."""
        impression_id = uuid.uuid4()
        row = {
            "impression_id": impression_id,
            "user_id": user_id,
            "playlists": playlists,
            "generation": generation,
            "model_version": model_version,
            "cold": cold,
        }
        async with self.transaction() as conn:
            cur = await conn.execute(INSERT_IMPRESSION, row)
            returned = await cur.fetchone()
        assert returned is not None  # INSERT ... RETURNING yields the row it wrote
        IMPRESSIONS.labels(model_version).inc()
        return Impression(
            impression_id=impression_id,
            user_id=user_id,
            playlists=playlists,
            model_version=model_version,
            generated_at=generated_at,
            generation=generation,
            cold=cold,
            shown_at=returned[0],
        )

    async def record_like(self, like: LikeRequest) -> tuple[Like, bool]:
        """Record a like once; return it and whether it is new (False for a retry).

        Raises LikeRefused when the impression does not exist, was shown to another user,
        or did not show the playlist; LikeConflict when ``like_id`` names another like;
        DatabaseUnavailable.
        """
        async with self.transaction() as conn:
            cur = await conn.execute(SELECT_IMPRESSION, (like.impression_id,))
            shown = await cur.fetchone()
            rank = _rank_in(shown, like)
            params = {**like.model_dump(), "rank": rank}
            cur = await conn.execute(INSERT_LIKE, params)
            row = await cur.fetchone()
            created = row is not None
            if row is None:
                cur = await conn.execute(SELECT_LIKE, params)
                row = await cur.fetchone()
        if row is None:  # the conflicting row vanished; nothing deletes likes
            raise DatabaseUnavailable("feedback database changed under the request; retry")
        recorded = Like(**dict(zip(LIKE_FIELDS, row, strict=True)))
        if recorded.like_id == like.like_id and (
            recorded.impression_id,
            recorded.playlist_id,
        ) != (like.impression_id, like.playlist_id):
            raise LikeConflict(f"like_id {like.like_id} already names another like")
        if created:
            assert shown is not None
            LIKES.labels(shown[2]).inc()
        return recorded, created

    async def refresh_ctr(self) -> None:
        """Set the CTR gauges from the impressions of the last 24 h.

        Raises DatabaseUnavailable.
        """
        since = datetime.now(UTC) - CTR_WINDOW
        async with self.transaction() as conn:
            cur = await conn.execute(CTR_BY_MODEL, {"since": since})
            rows = to_ctr_rows(await cur.fetchall())
        CTR.clear()
        WINDOW_IMPRESSIONS.clear()
        for r in rows:
            CTR.labels(r.model_version).set(r.ctr)
            WINDOW_IMPRESSIONS.labels(r.model_version).set(r.impressions)

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh_ctr()
            except DatabaseUnavailable as exc:
                log.warning("CTR not refreshed: %s", exc)
            except Exception:  # keep refreshing; a bug here must not stop the gateway
                log.exception("CTR refresh failed")
            await asyncio.sleep(self.ctr_refresh_s)


def _rank_in(shown: tuple | None, like: LikeRequest) -> int:
    """Position (1 = first) of the liked playlist in the impression.

    Raises LikeRefused when the like does not answer that impression.
    """
    if shown is None:
        raise LikeRefused(f"no impression {like.impression_id}")
    user_id, playlists, _ = shown
    if user_id != like.user_id:
        raise LikeRefused(f"impression {like.impression_id} was not shown to user {like.user_id}")
    if like.playlist_id not in playlists:
        raise LikeRefused(
            f"playlist {like.playlist_id} was not shown to user {like.user_id} "
            f"in impression {like.impression_id}"
        )
    return int(playlists.index(like.playlist_id)) + 1
