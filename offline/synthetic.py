"""Synthetic interactions shaped like the Million Playlist Dataset, with known ground truth.

The generative model: every playlist belongs to one of ``n_clusters`` taste clusters and has
a Zipf-like popularity weight ``w_j = (rank_j + 1) ** -zipf_exponent`` (ranks are a random
permutation, so popular playlists are spread across clusters). Every user has
``tastes_per_user`` taste clusters with Dirichlet mixing weights. Each interaction is drawn
by picking one of the user's clusters by its weight and then a playlist in that cluster by
popularity; with probability ``noise`` it is instead a playlist drawn by global popularity.
Users have a log-normal number of draws (median ``median_interactions``); repeated draws
collapse, so the interaction matrix is binary.

So the true probability that user ``u``'s next draw is playlist ``j`` is::

    (1 - noise) * sum_t user_weights[u, t] * [playlist_cluster[j] == user_clusters[u, t]]
                                         * playlist_weight[j] / cluster_weight[cluster of j]
    + noise * playlist_weight[j] / playlist_weight.sum()

(``preference`` computes it). ``synthetic_truth.npz`` in an artifact directory holds the
arrays of ``SyntheticTruth``:

    playlist_cluster  int32   [n_playlists]           taste cluster of each playlist row
    playlist_weight   float64 [n_playlists]           Zipf popularity weight (unnormalised)
    cluster_weight    float64 [n_clusters]            sum of playlist_weight per cluster
    user_clusters     int32   [n_users, n_tastes]     each user row's taste clusters
    user_weights      float32 [n_users, n_tastes]     their mixing weights (rows sum to 1)
    noise             float64 []                      probability of a global-popularity draw

A simulator reads it with ``SyntheticTruth.load(path)`` and scores shown playlists with
``preference(truth, user_rows, playlist_rows)`` (e.g. the user likes the shown playlist
with the highest preference, or one drawn in proportion to it). It is about 24 bytes per
user plus 12 per playlist (some 25 MB for a million users) and not part of the format.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

logger = logging.getLogger("offline")


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape of the synthetic data; the defaults resemble the Million Playlist Dataset."""

    n_clusters: int = 48
    tastes_per_user: int = 3
    taste_concentration: float = 0.5
    zipf_exponent: float = 0.9
    noise: float = 0.1
    median_interactions: float = 25.0
    interactions_sigma: float = 0.7
    min_draws: int = 5
    max_draws: int = 500


@dataclass(frozen=True)
class SyntheticTruth:
    """The ground truth the interactions were drawn from (see the module docstring)."""

    playlist_cluster: np.ndarray
    playlist_weight: np.ndarray
    cluster_weight: np.ndarray
    user_clusters: np.ndarray
    user_weights: np.ndarray
    noise: float

    def save(self, path: Path) -> None:
        """Write the arrays to ``path`` as an uncompressed .npz."""
        arrays = {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}
        with path.open("wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy stubs take **kwds as bool

    @classmethod
    def load(cls, path: Path) -> SyntheticTruth:
        """Read a file written by ``save``.

        Raises OSError if it cannot be read, KeyError if an array is missing.
        """
        with np.load(path, allow_pickle=False) as data:
            values = {f.name: data[f.name] for f in fields(cls)}
        values["noise"] = float(values["noise"])
        return cls(**values)


@dataclass(frozen=True)
class Interactions:
    """Distinct (user row, playlist row) pairs, sorted by user then playlist."""

    users: np.ndarray  # int32
    playlists: np.ndarray  # int32
    n_users: int
    n_playlists: int


def preference(truth: SyntheticTruth, users: np.ndarray, playlists: np.ndarray) -> np.ndarray:
    """True probability that each user's next draw is the paired playlist (broadcasting)."""
    users = np.asarray(users)
    playlists = np.asarray(playlists)
    cluster = truth.playlist_cluster[playlists]
    weight = truth.playlist_weight[playlists]
    in_taste = np.zeros(np.broadcast_shapes(users.shape, playlists.shape), dtype=np.float64)
    for t in range(truth.user_clusters.shape[1]):
        match = truth.user_clusters[users, t] == cluster
        in_taste += np.where(match, truth.user_weights[users, t], 0.0)
    taste_part = in_taste * weight / truth.cluster_weight[cluster]
    global_part = weight / truth.playlist_weight.sum()
    return (1.0 - truth.noise) * taste_part + truth.noise * global_part


def make_truth(
    n_users: int, n_playlists: int, rng: np.random.Generator, config: SyntheticConfig
) -> SyntheticTruth:
    """Draw playlist clusters and popularity, and user tastes.

    A catalogue smaller than ``n_clusters`` gets one cluster per playlist.
    Raises ValueError for fewer than one user or playlist.
    """
    if n_users < 1 or n_playlists < 1:
        raise ValueError(f"need at least one user and one playlist, got {n_users}, {n_playlists}")
    n_clusters = min(config.n_clusters, n_playlists)
    rank = rng.permutation(n_playlists)
    weight = (rank + 1.0) ** -config.zipf_exponent
    # Round-robin over a second permutation: every cluster gets playlists, sizes stay even.
    cluster = (rng.permutation(n_playlists) % n_clusters).astype(np.int32)
    cluster_weight = np.bincount(cluster, weights=weight, minlength=n_clusters)
    user_clusters = rng.integers(0, n_clusters, size=(n_users, config.tastes_per_user))
    alpha = np.full(config.tastes_per_user, config.taste_concentration)
    user_weights = rng.dirichlet(alpha, size=n_users).astype(np.float32)
    return SyntheticTruth(
        playlist_cluster=cluster,
        playlist_weight=weight,
        cluster_weight=cluster_weight,
        user_clusters=user_clusters.astype(np.int32),
        user_weights=user_weights,
        noise=config.noise,
    )


def _draw_counts(n_users: int, rng: np.random.Generator, config: SyntheticConfig) -> np.ndarray:
    draws = rng.lognormal(np.log(config.median_interactions), config.interactions_sigma, n_users)
    return np.clip(np.rint(draws), config.min_draws, config.max_draws).astype(np.int64)


def _sample_in_clusters(
    truth: SyntheticTruth, clusters: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """One playlist per entry of ``clusters``, by popularity within that cluster."""
    order = np.argsort(truth.playlist_cluster, kind="stable")
    sorted_cluster = truth.playlist_cluster[order]
    cum = np.cumsum(truth.playlist_weight[order])
    start = np.searchsorted(sorted_cluster, np.arange(len(truth.cluster_weight)))
    before = np.where(start > 0, cum[np.maximum(start - 1, 0)], 0.0)
    # Key of playlist i is cluster + its cumulative share of the cluster, in (cluster, cluster+1].
    key = sorted_cluster + (cum - before[sorted_cluster]) / truth.cluster_weight[sorted_cluster]
    pos = np.searchsorted(key, clusters + rng.random(len(clusters)), side="right")
    return order[np.minimum(pos, len(order) - 1)]


def _sample_global(truth: SyntheticTruth, n: int, rng: np.random.Generator) -> np.ndarray:
    cum = np.cumsum(truth.playlist_weight)
    pos = np.searchsorted(cum, rng.random(n) * cum[-1], side="right")
    return np.minimum(pos, len(cum) - 1)


def sample_interactions(
    truth: SyntheticTruth, rng: np.random.Generator, config: SyntheticConfig
) -> Interactions:
    """Draw every user's interactions from ``truth``; duplicates collapse."""
    n_users, n_tastes = truth.user_clusters.shape
    n_playlists = len(truth.playlist_cluster)
    users = np.repeat(np.arange(n_users, dtype=np.int32), _draw_counts(n_users, rng, config))
    cum_weights = np.cumsum(truth.user_weights, axis=1)
    slot = (rng.random(len(users))[:, None] > cum_weights[users]).sum(axis=1)
    slot = np.minimum(slot, n_tastes - 1)
    playlists = _sample_in_clusters(truth, truth.user_clusters[users, slot], rng)
    noisy = np.flatnonzero(rng.random(len(users)) < truth.noise)
    playlists[noisy] = _sample_global(truth, len(noisy), rng)
    keys = np.sort(users.astype(np.int64) * n_playlists + playlists)
    keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
    return Interactions(
        users=(keys // n_playlists).astype(np.int32),
        playlists=(keys % n_playlists).astype(np.int32),
        n_users=n_users,
        n_playlists=n_playlists,
    )


def generate(
    n_users: int, n_playlists: int, seed: int, config: SyntheticConfig | None = None
) -> tuple[Interactions, SyntheticTruth]:
    """Ground truth and the interactions drawn from it, deterministic for ``seed``.

    Raises ValueError for fewer than one user or playlist.
    """
    config = config or SyntheticConfig()
    rng = np.random.default_rng(seed)
    truth = make_truth(n_users, n_playlists, rng, config)
    interactions = sample_interactions(truth, rng, config)
    logger.info(
        "synthetic: %d users, %d playlists, %d interactions",
        n_users,
        n_playlists,
        len(interactions.users),
    )
    return interactions, truth
