"""Shard routing in the gateway: which queue each user's job goes to.

The ranges come from the shard map of the model in use (``RECFLEET_ARTIFACTS``, which
may be a root with a ``CURRENT`` pointer); the map is read once and read again when
``CURRENT`` names another directory or the map file changes (checked at most once a
second). Without a model directory the gateway routes everything to the one jobs queue,
as it does for an unsharded model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recfleet.shared.artifacts import SHARD_MAP, current_dir
from recfleet.shared.errors import ArtifactError
from recfleet.shared.messages import Job, make_jobs
from recfleet.shared.settings import Settings
from recfleet.shared.shards import ShardMap, read_shard_map
from recfleet.shared.topology import jobs_queue, sync_queue

log = logging.getLogger(__name__)
CHECK_EVERY_S = 1.0


@dataclass(frozen=True)
class Part:
    """The users of one request that one shard ranks, in the request's order."""

    shard: int
    shards: int
    user_ids: list[int]


class ShardRouter:
    """Splits users by shard, following the model directory's shard map."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._map: ShardMap | None = None
        self._seen: tuple[Path, float] | None = None
        self._checked_at = -CHECK_EVERY_S

    @property
    def shards(self) -> int:
        """How many shards the model in use has (1 when unsharded or absent)."""
        self._refresh()
        return self._map.count if self._map is not None else 1

    def split(self, user_ids: list[int]) -> list[Part]:
        """Group ``user_ids`` by shard (ascending), keeping their order within a shard."""
        self._refresh()
        if self._map is None or self._map.count == 1:
            return [Part(0, 1, user_ids)] if user_ids else []
        owner = self._map.shard_of(np.asarray(user_ids, dtype=np.int64))
        ids = np.asarray(user_ids, dtype=np.int64)
        n = self._map.count
        return [Part(k, n, ids[owner == k].tolist()) for k in range(n) if bool(np.any(owner == k))]

    def count_jobs(self, parts: list[Part]) -> int:
        """How many jobs ``jobs`` makes of these parts."""
        size = self._settings.job_size
        return sum(-(-len(p.user_ids) // size) for p in parts)

    def jobs(
        self, batch_id: str, parts: list[Part], first_index: int = 0
    ) -> tuple[list[Job], list[str]]:
        """Jobs of at most ``job_size`` users, none spanning two shards, and the queue of
        each. Job indices continue from ``first_index`` across shards."""
        jobs: list[Job] = []
        queues: list[str] = []
        size = self._settings.job_size
        for part in parts:
            made = make_jobs(batch_id, part.user_ids, size, first_index + len(jobs))
            jobs += made
            queues += [jobs_queue(self._settings, part.shard, part.shards)] * len(made)
        return jobs, queues

    def sync_queue(self, part: Part) -> str:
        return sync_queue(self._settings, part.shard, part.shards)

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < CHECK_EVERY_S:
            return
        self._checked_at = now
        try:
            directory = current_dir(self._settings.artifacts)
            stamp = (
                (directory / SHARD_MAP).stat().st_mtime
                if (directory / SHARD_MAP).is_file()
                else 0.0
            )
        except (ArtifactError, OSError):
            if self._map is None:
                return  # no model directory here: one shard, the plain queue names
            log.warning("model directory unreadable; keeping the shard map of %s", self._map.path)
            return
        if self._seen == (directory, stamp):
            return
        try:
            self._map = read_shard_map(directory)
        except ArtifactError:
            log.exception("shard map of %s refused; keeping the previous one", directory)
            return
        self._seen = (directory, stamp)
        log.info("routing users over %d shard(s) of %s", self._map.count, directory)
