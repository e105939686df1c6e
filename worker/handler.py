"""Turns one decoded job into results in Redis: candidate lookup, ranking, one pipelined write.

The consumer calls ``JobHandler.handle``; nothing here knows about RabbitMQ.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import redis

from shared.artifacts import Artifacts
from shared.drift import POPULARITY_EDGES, POPULARITY_LABELS
from shared.errors import TransientError
from shared.messages import Job
from shared.settings import Settings
from shared.store import PROGRESS_SCRIPT, Keys, encode_results, model_tag, popularity_args
from worker import metrics
from worker.ranking import Ranker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobSummary:
    users: int
    cold: int
    rank_s: float
    write_s: float


def popularity_buckets(popularity: np.ndarray) -> np.ndarray:
    """Bucket index (into POPULARITY_LABELS) of each playlist row by its popularity rank."""
    order = np.argsort(-popularity, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return np.searchsorted(np.array(POPULARITY_EDGES), rank, side="right").astype(np.int8)


class JobHandler:
    """Ranks jobs against one loaded model and writes their results."""

    def __init__(self, settings: Settings, artifacts: Artifacts, client: redis.Redis) -> None:
        self.settings = settings
        self.artifacts = artifacts
        self.ranker = Ranker.from_artifacts(artifacts, k=settings.top_k)
        self.redis = client
        self.keys = Keys(settings.redis_prefix)
        self.model_version = artifacts.model_version
        self.tag = model_tag(self.model_version)
        self._progress = client.register_script(PROGRESS_SCRIPT)
        self._pop_bucket = popularity_buckets(np.asarray(artifacts.playlist_popularity))
        metrics.MODEL_INFO.labels(self.model_version).set(1)

    def register_model(self) -> None:
        """Record this model's tag so readers can name the version. Raises TransientError."""
        try:
            self.redis.hset(self.keys.models, str(self.tag), self.model_version)
        except redis.RedisError as exc:
            raise TransientError(f"Redis unavailable: {exc}") from exc

    def handle(self, job: Job) -> JobSummary:
        """Rank every user of the job and write all results and the job's progress at once.

        Writing is idempotent: a redelivered job writes the same bytes and counts once.
        Raises TransientError when Redis cannot be reached.
        """
        start = time.perf_counter()
        user_ids = np.asarray(job.user_ids, dtype=np.int64)
        ranked = self.ranker.rank(self.artifacts.user_rows(user_ids))
        rows = ranked.playlists
        external = np.where(rows >= 0, self.artifacts.playlist_ids[np.maximum(rows, 0)], -1)
        values = encode_results(external, ranked.cold, int(job.created_at), self.tag)
        recommended = self.recommended_by_bucket(rows)
        rank_s = time.perf_counter() - start

        write_start = time.perf_counter()
        self._write(job, user_ids, values, int(ranked.cold.sum()), recommended)
        write_s = time.perf_counter() - write_start

        cold = int(ranked.cold.sum())
        self._observe(recommended, ranked.n_candidates, len(user_ids), cold, rank_s, write_s)
        return JobSummary(users=len(user_ids), cold=cold, rank_s=rank_s, write_s=write_s)

    def recommended_by_bucket(self, rows: np.ndarray) -> dict[str, int]:
        """How many of the recommended playlist rows fall in each popularity-rank bucket."""
        shown = rows[rows >= 0]
        hist = np.bincount(self._pop_bucket[shown], minlength=len(POPULARITY_LABELS))
        return dict(zip(POPULARITY_LABELS, hist.tolist(), strict=True))

    def _write(
        self,
        job: Job,
        user_ids: np.ndarray,
        values: list[bytes],
        cold: int,
        recommended: dict[str, int],
    ) -> None:
        by_bucket: dict[str, dict[int, bytes]] = defaultdict(dict)
        for uid, value in zip(user_ids.tolist(), values, strict=True):
            by_bucket[self.keys.bucket_of(uid)][uid] = value
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for key, mapping in by_bucket.items():
                    pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
                self._progress(
                    keys=[self.keys.batch(job.batch_id), self.keys.batch_done(job.batch_id)],
                    args=[
                        job.job_id,
                        len(user_ids),
                        cold,
                        f"{time.time():.3f}",
                        self.settings.batch_ttl_s,
                        "done",
                        *popularity_args(recommended),
                    ],
                    client=pipe,
                )
                # Lets monitoring find recent batches without scanning the keyspace.
                pipe.zadd(self.keys.batches, {job.batch_id: time.time()})
                pipe.execute()
        except redis.RedisError as exc:
            raise TransientError(f"Redis unavailable: {exc}") from exc

    def _observe(
        self,
        recommended: dict[str, int],
        n_candidates: np.ndarray,
        users: int,
        cold: int,
        rank_s: float,
        write_s: float,
    ) -> None:
        metrics.USERS.inc(users)
        metrics.COLD_USERS.inc(cold)
        metrics.RANK_DURATION.observe(rank_s)
        metrics.REDIS_WRITE_DURATION.observe(write_s)
        # Per-user observations would cost a Python call per user; the per-job mean and
        # the running total carry the same signal at a fixed cost.
        if users:
            metrics.CANDIDATES.observe(float(n_candidates.mean()))
            metrics.CANDIDATES_TOTAL.inc(int(n_candidates.sum()))
        for label, n in recommended.items():
            if n:
                metrics.RECOMMENDED.labels(label).inc(n)

    def record_dead(self, batch_id: str, job_id: str, users: int) -> None:
        """Count a dead-lettered job in its batch ledger (once). Raises TransientError."""
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                self._progress(
                    keys=[self.keys.batch(batch_id), self.keys.batch_dead(batch_id)],
                    args=[
                        job_id,
                        users,
                        0,
                        f"{time.time():.3f}",
                        self.settings.batch_ttl_s,
                        "dead",
                    ],
                    client=pipe,
                )
                pipe.zadd(self.keys.batches, {batch_id: time.time()})
                pipe.execute()
        except redis.RedisError as exc:
            raise TransientError(f"Redis unavailable: {exc}") from exc
