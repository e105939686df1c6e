"""Feedback: the validated bodies of impressions and likes, and the SQL read back from them.

The page at ``/`` and every other client post the same ``LikeRequest`` to
``POST /api/feedback``. Click-through rate and training triplets are computed here with
a plain (sync) psycopg connection, for the CLI; the gateway runs the same SQL async.

Tables (``shared/migrations/0001_feedback.sql``)::

    impressions  impression_id, user_id, playlists bigint[] (best first), generation,
                 model_version, cold, shown_at
    feedback     like_id, impression_id, user_id, playlist_id, rank (1 = first shown),
                 liked_at; one row per (impression, playlist)

An impression's ``generation`` is the generation the list was read from: the id of the
batch whose run produced it (``live`` for a synchronous result served before any
generation was current).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated
from uuid import UUID

import numpy as np
import psycopg
from pydantic import BaseModel, Field, StrictInt

from recfleet.shared.messages import MAX_USER_ID, ClosedModel, UserId

PlaylistId = Annotated[StrictInt, Field(ge=0, le=MAX_USER_ID)]


class ImpressionRequest(ClosedModel):
    """Show this user their current list and record that it was shown."""

    user_id: UserId


class Impression(BaseModel):
    """A list as shown: the user's current result plus the id a like must answer."""

    impression_id: UUID
    user_id: int
    playlists: list[int] = Field(description="playlist ids, best first; rank 1 is the first")
    model_version: str
    generated_at: float
    generation: str = Field(description="the generation (batch id) the list was read from")
    cold: bool
    shown_at: datetime


class LikeRequest(ClosedModel):
    """A like of one shown playlist. ``like_id`` is chosen by the client: a retry with the
    same id is recorded once."""

    like_id: UUID
    impression_id: UUID
    user_id: UserId
    playlist_id: PlaylistId


class Like(BaseModel):
    """A recorded like."""

    like_id: UUID
    impression_id: UUID
    user_id: int
    playlist_id: int
    rank: int = Field(description="position of the playlist in the impression, 1 = first")
    liked_at: datetime


def start_of_day(day: date) -> datetime:
    """Midnight UTC of ``day``."""
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


# An impression counts as clicked when it got at least one like.
_CTR = """
WITH liked AS (
    SELECT impression_id, count(*) AS likes
    FROM feedback
    WHERE liked_at >= %(since)s
    GROUP BY impression_id
)
SELECT i.model_version, {day} AS day, count(*) AS impressions,
       count(liked.impression_id) AS clicked, coalesce(sum(liked.likes), 0) AS likes
FROM impressions AS i
LEFT JOIN liked USING (impression_id)
WHERE i.shown_at >= %(since)s
GROUP BY 1, 2
ORDER BY 2 NULLS FIRST, 1
"""
CTR_BY_MODEL = _CTR.format(day="NULL::date")
CTR_BY_MODEL_AND_DAY = _CTR.format(day="(i.shown_at AT TIME ZONE 'UTC')::date")

# Every like paired with each playlist of its impression that was not liked.
TRIPLETS = """
SELECT f.user_id, f.playlist_id, shown.playlist_id
FROM feedback AS f
JOIN impressions AS i USING (impression_id)
CROSS JOIN LATERAL unnest(i.playlists) WITH ORDINALITY AS shown (playlist_id, position)
WHERE f.liked_at >= %(since)s
  AND NOT EXISTS (
      SELECT 1 FROM feedback AS other
      WHERE other.impression_id = f.impression_id AND other.playlist_id = shown.playlist_id
  )
ORDER BY f.liked_at, f.like_id, shown.position
"""


@dataclass(frozen=True)
class CtrRow:
    model_version: str
    day: date | None
    impressions: int
    clicked: int
    likes: int

    @property
    def ctr(self) -> float:
        """Share of impressions that got at least one like."""
        return self.clicked / self.impressions if self.impressions else 0.0


def to_ctr_rows(rows: list[tuple]) -> list[CtrRow]:
    return [CtrRow(str(m), d, int(n), int(c), int(k)) for m, d, n, c, k in rows]


def click_through(conn: psycopg.Connection, since: datetime, *, by_day: bool) -> list[CtrRow]:
    """CTR per model version (and per UTC day of the impression when ``by_day``).

    Raises psycopg.Error when the query fails.
    """
    query = CTR_BY_MODEL_AND_DAY if by_day else CTR_BY_MODEL
    return to_ctr_rows(conn.execute(query, {"since": since}).fetchall())


def export_triplets(conn: psycopg.Connection, since: datetime, chunk: int = 100_000) -> np.ndarray:
    """BPR triplets ``(user_id, liked playlist_id, shown-but-not-liked playlist_id)`` from the
    likes since ``since``, as int64 ``[n, 3]`` of external ids, streamed from a server-side
    cursor.

    Raises psycopg.Error when the query fails.
    """
    parts = [np.empty((0, 3), dtype=np.int64)]
    with conn.transaction(), conn.cursor(name="recfleet_triplets") as cur:
        cur.execute(TRIPLETS, {"since": since})
        while rows := cur.fetchmany(chunk):
            parts.append(np.asarray(rows, dtype=np.int64).reshape(-1, 3))
    return np.concatenate(parts)


def save_triplets(path: Path, triplets: np.ndarray) -> None:
    """Write ``triplets`` as ``.npy`` through a temporary file, so a reader never sees half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, np.ascontiguousarray(triplets, dtype=np.int64))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
