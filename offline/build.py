"""``recfleet artifacts build``: synthetic data → user pairing → BPR → a checked artifact dir.

The directory is written next to ``out`` under a temporary name and renamed into place
at the end, so a half-built directory is never seen by a worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from offline.bpr import BPRConfig, TrainingData, check_triplets, train_bpr
from offline.evaluate import (
    Scorer,
    candidate_recall,
    evaluation_users,
    expected_ranks,
    rank_metrics,
    split_holdout,
)
from offline.pairing import build_candidates, nearest_neighbours, popularity_rank, user_embeddings
from offline.synthetic import generate
from shared.artifacts import EMBEDDINGS, NPY_FILES, load_artifacts, write_manifest

logger = logging.getLogger("offline")

N_NEIGHBOURS = 30
PAIRING_RANK = 64
N_FALLBACK = 100
EVAL_USERS = 20_000
TRUTH_FILE = "synthetic_truth.npz"


def _model_version(params: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    return f"bpr-{datetime.now(UTC):%Y%m%d}-{digest}"


def _load_feedback(path: Path | None, n_users: int, n_playlists: int) -> np.ndarray:
    """Training triplets exported from feedback, or none. Raises ValueError if malformed."""
    if path is None:
        return np.zeros((0, 3), dtype=np.int64)
    triplets = np.load(path, allow_pickle=False)
    check_triplets(triplets, n_users, n_playlists)
    return triplets.astype(np.int64)


def _bpr_scorer(user_emb: np.ndarray, playlist_emb: np.ndarray) -> Scorer:
    return lambda users, cands: np.einsum("bd,bld->bl", user_emb[users], playlist_emb[cands])


def _evaluate(
    split_heldout: np.ndarray,
    indptr: np.ndarray,
    indices: np.ndarray,
    user_emb: np.ndarray,
    playlist_emb: np.ndarray,
    popularity: np.ndarray,
    seed: int,
) -> dict[str, Any]:
    users = evaluation_users(split_heldout, EVAL_USERS, seed)
    pop = popularity.astype(np.float64)
    return {
        "bpr": rank_metrics(
            expected_ranks(
                _bpr_scorer(user_emb, playlist_emb), indptr, indices, users, split_heldout
            )
        ),
        "popularity": rank_metrics(
            expected_ranks(lambda _u, c: pop[c], indptr, indices, users, split_heldout)
        ),
        "candidate_recall": candidate_recall(indptr, indices, users, split_heldout),
        "evaluated_users": len(users),
    }


def build_artifacts(
    out: Path,
    *,
    n_users: int,
    n_playlists: int,
    seed: int = 0,
    dim: int = 128,
    epochs: int | None = None,
    feedback: Path | None = None,
) -> dict[str, Any]:
    """Build a complete artifact directory at ``out`` and return its manifest.

    Deterministic for a seed (but for ``created_at`` and the date in the model version).
    Raises ValueError for impossible sizes or malformed feedback triplets.
    """
    out = Path(out)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 2)
        logger.info("%s: %.1fs", stage, now - clock)
        clock = now

    interactions, truth = generate(n_users, n_playlists, seed)
    split = split_holdout(
        interactions.users,
        interactions.playlists,
        (n_users, n_playlists),
        np.random.default_rng(seed + 1),
    )
    popularity = np.bincount(split.train.indices, minlength=n_playlists).astype(np.int64)
    lap("synthetic")

    emb = user_embeddings(split.train, PAIRING_RANK, seed)
    neighbours = nearest_neighbours(emb, N_NEIGHBOURS, seed)
    indptr, indices = build_candidates(split.train, neighbours, popularity)
    lap("pairing")

    train = split.train.tocoo()
    data = TrainingData(
        users=train.row.astype(np.int64),
        playlists=train.col.astype(np.int64),
        n_users=n_users,
        n_playlists=n_playlists,
        cand_indptr=indptr.astype(np.int64),
        cand_indices=indices.astype(np.int32),
        triplets=_load_feedback(feedback, n_users, n_playlists),
    )
    user_emb, playlist_emb, stats = train_bpr(data, BPRConfig(dim=dim, epochs=epochs), seed)
    lap("bpr")

    metrics = _evaluate(split.heldout, indptr, indices, user_emb, playlist_emb, popularity, seed)
    lap("evaluate")

    params = {
        "n_users": n_users,
        "n_playlists": n_playlists,
        "seed": seed,
        "dim": dim,
        "epochs": stats["epochs"],
        "neighbours": N_NEIGHBOURS,
        "pairing_rank": PAIRING_RANK,
        "feedback_triplets": len(data.triplets),
    }
    tmp = out.parent / f".{out.name}.building-{time.time_ns()}"
    tmp.mkdir(parents=True)
    try:
        save_file(
            {
                "user": np.ascontiguousarray(user_emb, dtype=np.float32),
                "playlist": np.ascontiguousarray(playlist_emb, dtype=np.float32),
            },
            str(tmp / EMBEDDINGS),
        )
        arrays: dict[str, np.ndarray] = {
            "candidates_indptr": indptr.astype(np.int64),
            "candidates_indices": indices.astype(np.int32),
            "user_ids": np.arange(n_users, dtype=np.int64),
            "playlist_ids": np.arange(n_playlists, dtype=np.int64),
            "playlist_popularity": popularity,
            "fallback": popularity_rank(popularity)[:N_FALLBACK].astype(np.int32),
        }
        for key, fname in NPY_FILES.items():
            np.save(tmp / fname, arrays[key], allow_pickle=False)
        truth.save(tmp / TRUTH_FILE)
        lap("write")
        manifest = write_manifest(
            tmp,
            {
                "model_version": _model_version(params),
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "n_users": n_users,
                "n_playlists": n_playlists,
                "dim": dim,
                "params": params,
                "training": stats,
                "metrics": metrics,
                "timings_s": timings,
            },
        )
        load_artifacts(tmp)  # refuse to publish anything the workers would refuse
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("artifacts %s: %s", manifest["model_version"], json.dumps(metrics))
    return manifest
