"""Simulated users for ``recfleet feedback simulate``, driven by the synthetic ground truth.

A simulated user fetches their list through ``POST /api/impressions`` (recording an
impression), then listens ``draws`` times, each listen drawn from their true taste
(``offline.synthetic.preference``: the probability that their next draw is a given
playlist). A listen of a shown playlist that is not already in their library (their
synthetic interactions) is a like, posted to ``POST /api/feedback``. Liking only what is
new to the user is what a recommendation is for, and it is how the offline evaluation
scores models too (held-out playlists, never training ones).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click
import httpx
import numpy as np

from recfleet.shared.artifacts import MANIFEST, read_manifest
from recfleet.shared.errors import ArtifactError

if TYPE_CHECKING:
    from recfleet.offline.synthetic import SyntheticTruth

TRUTH_FILE = "synthetic_truth.npz"
CURRENT = "CURRENT"  # in a model root, names the artifact directory serving new batches


@dataclass
class World:
    """The synthetic ground truth of an artifact directory, by external id."""

    truth: SyntheticTruth
    user_ids: np.ndarray
    playlist_ids: np.ndarray
    playlist_order: np.ndarray
    library_indptr: np.ndarray  # CSR over user rows: playlist rows each user already has
    library_indices: np.ndarray

    @classmethod
    def load(cls, artifacts: Path) -> World:
        """The truth of an artifact directory (or of the one a model root's ``CURRENT``
        names), with every user's library regenerated from the manifest's seed.

        Raises click.ClickException when there is no synthetic ground truth, or the seed
        does not reproduce it.
        """
        from recfleet.offline.synthetic import SyntheticConfig, SyntheticTruth, generate

        if not (artifacts / MANIFEST).is_file() and (artifacts / CURRENT).is_file():
            artifacts = artifacts / (artifacts / CURRENT).read_text().strip()
        try:
            truth = SyntheticTruth.load(artifacts / TRUTH_FILE)
            manifest = read_manifest(artifacts)
            params = manifest["params"]
            user_ids = np.load(artifacts / "user_ids.npy", mmap_mode="r")
            playlist_ids = np.load(artifacts / "playlist_ids.npy", mmap_mode="r")
            shape = (int(manifest["n_users"]), int(manifest["n_playlists"]))
            seed = int(params["seed"])
            config = SyntheticConfig(**params.get("synthetic", {}))
        except (OSError, KeyError, TypeError, ValueError, ArtifactError) as exc:
            raise click.ClickException(
                f"{artifacts}: no synthetic ground truth to simulate users with ({exc})"
            ) from exc
        interactions, regenerated = generate(*shape, seed, config)
        if not np.array_equal(regenerated.playlist_cluster, truth.playlist_cluster):
            raise click.ClickException(f"{artifacts}: seed {seed} does not reproduce its truth")
        indptr = np.searchsorted(interactions.users, np.arange(shape[0] + 1))
        return cls(
            truth,
            user_ids,
            playlist_ids,
            np.argsort(playlist_ids, kind="stable"),
            indptr.astype(np.int64),
            interactions.playlists,
        )

    def user_row(self, user_id: int) -> int | None:
        row = int(np.searchsorted(self.user_ids, user_id))
        return row if row < len(self.user_ids) and self.user_ids[row] == user_id else None

    def playlist_rows(self, ids: list[int]) -> np.ndarray:
        pos = np.searchsorted(self.playlist_ids, ids, sorter=self.playlist_order)
        return self.playlist_order[np.minimum(pos, len(self.playlist_order) - 1)]

    def in_library(self, user_row: int, playlist_rows: np.ndarray) -> np.ndarray:
        library = self.library_indices[
            self.library_indptr[user_row] : self.library_indptr[user_row + 1]
        ]
        return np.isin(playlist_rows, library)


@dataclass
class Arm:
    """What one model version's lists earned in the simulation."""

    impressions: int = 0
    likes: int = 0
    expected_likes: float = 0.0
    ranks: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        n = self.impressions
        return {
            "impressions": n,
            "likes": self.likes,
            "ctr": self.likes / n if n else 0.0,
            "expected_ctr": self.expected_likes / n if n else 0.0,
            "mean_liked_rank": float(np.mean(self.ranks)) if self.ranks else None,
        }


def like_probabilities(world: World, user_row: int, playlists: list[int], draws: int) -> np.ndarray:
    """Probability that the user likes each shown playlist on this visit.

    The user's next ``draws`` listens come from their true taste (``preference``: the
    probability that their next draw is a given playlist); the visit is a like when one
    of them is a shown playlist new to the user, and the liked playlist is the first
    such listen.
    """
    from recfleet.offline.synthetic import preference

    rows = world.playlist_rows(playlists)
    p = preference(world.truth, np.array(user_row), rows)
    p = np.where(world.in_library(user_row, rows), 0.0, p)
    shown = min(float(p.sum()), 1.0)
    p_any = 1.0 - (1.0 - shown) ** draws
    return p * (p_any / shown) if shown > 0 else p


def post_like(client: httpx.Client, body: dict) -> dict:
    """Post a like, retrying transport errors with the same like id (recorded once)."""
    for attempt in range(3):
        try:
            resp = client.post("/api/feedback", json=body)
        except httpx.TransportError:
            if attempt == 2:
                raise
            continue
        if resp.status_code not in (200, 201):
            raise click.ClickException(f"like refused: {resp.status_code} {resp.text[:300]}")
        return dict(resp.json())
    raise AssertionError("unreachable")


def visit(
    client: httpx.Client,
    world: World,
    user_id: int,
    rng: np.random.Generator,
    draws: int,
    arms: dict[str, Arm],
) -> bool:
    """One simulated visit: fetch the list (an impression), maybe like one. False when the
    user has no result yet."""
    resp = client.post("/api/impressions", json={"user_id": user_id})
    if resp.status_code == 404:
        return False
    if resp.status_code != 201:
        raise click.ClickException(f"impression failed: {resp.status_code} {resp.text[:300]}")
    shown = resp.json()
    arm = arms[shown["model_version"]]
    arm.impressions += 1
    row = world.user_row(user_id)
    if row is None or not shown["playlists"]:
        return True
    p = like_probabilities(world, row, shown["playlists"], draws)
    arm.expected_likes += float(p.sum())
    if rng.random() >= p.sum():
        return True
    pick = int(rng.choice(len(p), p=p / p.sum()))
    like = post_like(
        client,
        {
            "like_id": str(uuid.uuid4()),
            "impression_id": shown["impression_id"],
            "user_id": user_id,
            "playlist_id": shown["playlists"][pick],
        },
    )
    arm.likes += 1
    arm.ranks.append(int(like["rank"]))
    return True
