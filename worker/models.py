"""The models a worker can rank with, and how it follows a rollout between jobs.

``RECFLEET_ARTIFACTS`` names either one artifact directory, or a root holding several
(one sub-directory per model version) and a ``CURRENT`` file naming the one to use
for new batches. Workers look at ``CURRENT`` between jobs, at most once a second, so
a new version is picked up without a restart. A batch is pinned to the version that
ranked its first job, so one generation never mixes versions.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recfleet.shared.artifacts import MANIFEST, SHARD_MAP, Artifacts, current_dir
from recfleet.shared.codec import model_tag
from recfleet.shared.drift import POPULARITY_EDGES
from recfleet.shared.errors import ArtifactError, TransientError
from recfleet.shared.shards import load_model, read_shard_map
from recfleet.worker import metrics
from recfleet.worker.ranking import Ranker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Model:
    artifacts: Artifacts
    ranker: Ranker
    version: str
    tag: int
    popularity_bucket: np.ndarray

    @property
    def shards(self) -> int:
        """How many shards the model is split into (1: unsharded)."""
        return int(self.artifacts.manifest.get("shards", 1))


def popularity_buckets(popularity: np.ndarray) -> np.ndarray:
    """Bucket index of each playlist row by its popularity rank (see shared.drift)."""
    order = np.argsort(-popularity, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return np.searchsorted(np.array(POPULARITY_EDGES), rank, side="right").astype(np.int8)


class ModelStore:
    """Loads models on demand, keeps the ``keep`` most recently used, follows ``CURRENT``."""

    def __init__(
        self,
        root: Path,
        k: int,
        *,
        keep: int = 2,
        check_every_s: float = 1.0,
        shard: int | None = None,
    ) -> None:
        self.root = Path(root)
        # Which shard of a sharded model this worker serves (None: an unsharded model).
        self.shard = shard
        self.k = k
        self.keep = keep
        self.check_every_s = check_every_s
        self._models: OrderedDict[str, Model] = OrderedDict()
        self._current: Model | None = None
        self._current_dir: Path | None = None
        self._checked_at = 0.0

    def current(self) -> Model:
        """The model for new batches; reloads when ``CURRENT`` names another directory.

        Raises ArtifactError when the first load fails; a bad rollout later is logged and
        the running model kept.
        """
        now = time.monotonic()
        if self._current is not None and now - self._checked_at < self.check_every_s:
            return self._current
        self._checked_at = now
        try:
            directory = current_dir(self.root)
            if directory != self._current_dir:
                model = self._load(directory)
                if self._current is not None:
                    log.info("rolled out model %s (was %s)", model.version, self._current.version)
                self._current, self._current_dir = model, directory
        except ArtifactError:
            if self._current is None:
                raise
            log.exception("new artifacts refused; keeping model %s", self._current.version)
        assert self._current is not None
        return self._current

    def get(self, version: str) -> Model:
        """The model of ``version``. Raises TransientError when this worker cannot find it."""
        model = self._models.get(version)
        if model is not None:
            self._models.move_to_end(version)
            return model
        for directory in self._candidates():
            try:
                if read_shard_map(directory).model_version == version:
                    return self._load(directory)
            except ArtifactError:
                continue
        raise TransientError(f"model {version} is not available under {self.root}")

    def _candidates(self) -> list[Path]:
        if (self.root / MANIFEST).is_file() or (self.root / SHARD_MAP).is_file():
            return [self.root]
        return sorted(p for p in self.root.iterdir() if p.is_dir())

    def _load(self, directory: Path) -> Model:
        artifacts = load_model(directory, self.shard)
        version = artifacts.model_version
        if version in self._models:
            return self._models[version]
        model = Model(
            artifacts=artifacts,
            ranker=Ranker.from_artifacts(artifacts, k=self.k),
            version=version,
            tag=model_tag(version),
            popularity_bucket=popularity_buckets(np.asarray(artifacts.playlist_popularity)),
        )
        self._models[version] = model
        while len(self._models) > self.keep:
            old, _ = self._models.popitem(last=False)
            metrics.MODEL_INFO.remove(old)
        metrics.MODEL_INFO.labels(version).set(1)
        log.info("loaded model %s from %s", version, directory)
        return model
