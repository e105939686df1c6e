"""``recfleet artifacts build``: synthetic data → user pairing → BPR → artifact directory.

The directory is written to a temporary sibling of ``out``, checked with
``shared.artifacts.load_artifacts``, and only then renamed into place, so a half-built
directory is never seen under ``out``. Everything is deterministic for a seed (on one
machine; BLAS may round differently elsewhere) except ``created_at`` and the timings.

User and playlist ids are identity ranges (row ``i`` is id ``i``), so feedback triplets
name rows directly. The training split holds out one interaction per user for the
metrics (the held-out ones are not candidates' "seen" playlists, so they stay
reachable), and one more per user for validation, which chooses the popularity prior's
weight. Validation mirrors the held-out split: the candidate lists it ranks and BPR
are built from the training matrix without the validation playlists, as the held-out
metrics' lists are built without the held-out ones. The shipped candidate lists count
the same neighbours' votes over the whole training split (see ``CANDIDATES_FROM``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from safetensors.numpy import save_file
from threadpoolctl import threadpool_limits

from recfleet.offline import evaluate, tuning
from recfleet.offline.bpr import BPRConfig, Feedback, TrainingData, load_feedback, train_bpr
from recfleet.offline.candidates import drop_user_playlists, popularity_rank
from recfleet.offline.pairing import Pairing, PairingConfig, candidates_of, pair_users
from recfleet.offline.publish import move_into_place, set_usual_modes
from recfleet.offline.synthetic import SyntheticConfig, SyntheticTruth, generate
from recfleet.shared.artifacts import (
    EMBEDDINGS,
    NPY_FILES,
    load_artifacts,
    sha256_file,
    write_manifest,
)

logger = logging.getLogger("offline")

TRUTH_FILE = "synthetic_truth.npz"
N_FALLBACK = 100
MAX_EVAL_USERS = 100_000
# Which training matrix the shipped candidate lists come from: "train" (the default)
# counts the neighbours' votes again over the whole training matrix (the neighbours are
# the ones found without the validation playlists); "validation" ships the lists built
# without the validation playlists (the ones validation ranked and BPR drew negatives
# from), minus each user's validation playlist: no second count, lower held-out hit@10
# (docs/performance.md).
CANDIDATES_FROM = ("train", "validation")


# Told when a stage starts (seconds None) and when it ends (its seconds).
StageListener = Callable[[str, float | None], None]


@contextlib.contextmanager
def _math_threads(threads: int) -> Iterator[None]:
    """Run a block with ``threads`` torch and BLAS threads, then restore the caller's."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(threads):
            yield
    finally:
        torch.set_num_threads(before)


class _Stopwatch:
    """Seconds per stage, logged as each stage ends and passed to an optional listener."""

    def __init__(self, listener: StageListener | None = None) -> None:
        self.timings: dict[str, float] = {}
        self._listener = listener

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._listener:
            self._listener(name, None)
        start = time.perf_counter()
        yield
        self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.timings[name] = round(seconds, 3)
        logger.info("stage %s: %.2fs", name, seconds)
        if self._listener:
            self._listener(name, seconds)


def _model_version(params: dict[str, Any], created: datetime) -> str:
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return f"bpr-{created:%Y%m%d}-{digest}"


def _write_arrays(
    tmp: Path,
    user_emb: np.ndarray,
    playlist_emb: np.ndarray,
    candidates: tuple[np.ndarray, np.ndarray],
    popularity: np.ndarray,
) -> None:
    """Every file of the format except the manifest (ids are identity ranges).

    The playlist table keeps its dtype (float32 or float16); the user table is float32.
    """
    save_file(
        {
            "user": np.ascontiguousarray(user_emb, dtype=np.float32),
            "playlist": np.ascontiguousarray(playlist_emb),
        },
        str(tmp / EMBEDDINGS),
    )
    arrays: dict[str, np.ndarray] = {
        "candidates_indptr": candidates[0].astype(np.int64),
        "candidates_indices": candidates[1].astype(np.int32),
        "user_ids": np.arange(len(user_emb), dtype=np.int64),
        "playlist_ids": np.arange(len(playlist_emb), dtype=np.int64),
        "playlist_popularity": popularity.astype(np.int64),
        "fallback": popularity_rank(popularity)[:N_FALLBACK].astype(np.int32),
    }
    for key, name in NPY_FILES.items():
        np.save(tmp / name, arrays[key], allow_pickle=False)


@dataclass(frozen=True)
class Splits:
    """The synthetic data's truth and splits: ``heldout`` for the metrics, ``validation``
    carved from ``heldout.train`` for choosing β (its ``train`` is what BPR and the
    validation candidate lists are built from)."""

    truth: SyntheticTruth
    heldout: evaluate.Split
    validation: evaluate.Split
    n_interactions: int


def synthetic_splits(n_users: int, n_playlists: int, seed: int, config: SyntheticConfig) -> Splits:
    """Generate the interactions, hold one per user out, and carve validation from the rest."""
    interactions, truth = generate(n_users, n_playlists, seed, config)
    rng = np.random.default_rng([seed, 1])
    split = evaluate.split_holdout(
        interactions.users, interactions.playlists, (n_users, n_playlists), rng
    )
    carved = tuning.carve_validation(split, seed)
    return Splits(truth, split, carved, len(interactions.users))


def _counts(matrix: sp.csr_matrix) -> np.ndarray:
    """Interactions per playlist of a training matrix."""
    return np.bincount(matrix.indices, minlength=matrix.shape[1])


def _pair(
    clock: _Stopwatch,
    matrix: sp.csr_matrix,
    seed: int,
    config: PairingConfig,
    threads: int,
) -> Pairing:
    """Neighbours and candidate lists of ``matrix``'s users, timed with their steps."""
    # torch and BLAS stay on one thread here: on the shared 2-core machine two threads
    # inside each op made the kNN 5x and the SVD 3x slower (many small ops, a thread team
    # each). The kNN's cells and the candidate blocks run on ``threads`` threads instead.
    with clock.stage("pairing"), _math_threads(1):
        pairing = pair_users(matrix, _counts(matrix), seed, config, threads)
    for name, seconds in pairing.timings.items():
        clock.add(name, seconds)
    return pairing


def _train(
    train: sp.csr_matrix,
    candidates: tuple[np.ndarray, np.ndarray],
    triplets: np.ndarray,
    config: BPRConfig,
    seed: int,
    threads: int,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    coo = train.tocoo()
    data = TrainingData(
        users=coo.row.astype(np.int32),
        playlists=coo.col.astype(np.int32),
        n_users=train.shape[0],
        n_playlists=train.shape[1],
        cand_indptr=candidates[0],
        cand_indices=candidates[1],
        triplets=triplets,
    )
    return train_bpr(data, config, seed, threads)


def _fit(
    clock: _Stopwatch,
    splits: Splits,
    candidates: tuple[np.ndarray, np.ndarray],
    feedback: Feedback,
    config: BPRConfig,
    seed: int,
    threads: int,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], dict[str, Any]]:
    """BPR on the training split minus validation, then β chosen on validation.

    ``candidates`` are built from that smaller matrix. Returns the embeddings with the
    prior dimension (when β > 0), the embeddings without it, and the manifest's record of
    the training and of the choice.
    """
    carved = splits.validation
    # The SGD steps run on ``threads`` threads in the compiled kernel; torch, which only
    # draws the negatives here, stays on one (its small ops do not pay for a thread team).
    with clock.stage("bpr"), _math_threads(1):
        user_emb, playlist_emb, stats = _train(
            carved.train, candidates, feedback.triplets, config, seed, threads
        )
    with clock.stage("tune"):
        seen = _counts(carved.train)
        choice = tuning.choose_beta(user_emb, playlist_emb, seen, candidates, carved.heldout, seed)
    final = tuning.with_prior(user_emb, playlist_emb, _counts(splits.heldout.train), choice.beta)
    prior = {
        "beta": choice.beta,
        "validation": choice.validation,
        "validation_candidate_recall": choice.candidate_recall,
        "validation_users": choice.validation_users,
    }
    return final, (user_emb, playlist_emb), {"training": stats, "prior": prior}


def _shipped_candidates(
    clock: _Stopwatch,
    splits: Splits,
    pairing: Pairing,
    candidates_from: str,
    config: PairingConfig,
    threads: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The candidate lists written to the artifacts (see ``CANDIDATES_FROM``)."""
    train = splits.heldout.train
    if candidates_from == "train":
        # The neighbours found without the validation playlists (as BPR was trained),
        # their votes counted over the whole training split.
        with clock.stage("candidates_train"):
            return candidates_of(train, pairing.neighbours, _counts(train), config, threads)
    with clock.stage("candidates_drop_validation"):
        return drop_user_playlists(
            pairing.indptr,
            pairing.indices,
            splits.validation.heldout,
            train,
            _counts(train),
            config.min_candidates,
        )


def _evaluate(
    split: evaluate.Split,
    candidates: tuple[np.ndarray, np.ndarray],
    truth: SyntheticTruth,
    embeddings: tuple[np.ndarray, np.ndarray],
    without_prior: tuple[np.ndarray, np.ndarray],
    seed: int,
) -> tuple[dict[str, Any], bool]:
    """Held-out metrics (final model, without the prior, float16 table) and the dtype call."""
    popularity = _counts(split.train)
    half = embeddings[1].astype(np.float16)
    scorers = {
        "bpr": evaluate.bpr_scorer(*embeddings),
        "bpr_float16": evaluate.bpr_scorer(embeddings[0], half),
        "bpr_without_prior": evaluate.bpr_scorer(*without_prior),
        "popularity": evaluate.popularity_scorer(popularity),
        "oracle": evaluate.truth_scorer(truth),
    }
    metrics = evaluate.evaluate_models(
        scorers, *candidates, split.heldout, max_users=MAX_EVAL_USERS, seed=seed
    )
    keep_half = tuning.float16_keeps_quality(metrics["bpr"], metrics["bpr_float16"])  # type: ignore[arg-type]
    return metrics, keep_half


def _build_into(
    tmp: Path,
    n_users: int,
    n_playlists: int,
    seed: int,
    bpr_cfg: BPRConfig,
    feedback: Feedback,
    threads: int,
    candidates_from: str,
    listener: StageListener | None,
) -> dict[str, Any]:
    """Every stage, writing into ``tmp``; returns the manifest (without checksums)."""
    clock = _Stopwatch(listener)
    synth_cfg, pair_cfg = SyntheticConfig(), PairingConfig()
    with clock.stage("synthetic"):
        splits = synthetic_splits(n_users, n_playlists, seed, synth_cfg)
        split, popularity = splits.heldout, _counts(splits.heldout.train)
    # Built without the validation playlists: validation ranks these lists as the
    # held-out metrics rank theirs, and BPR draws its candidate negatives from them.
    pairing = _pair(clock, splits.validation.train, seed, pair_cfg, threads)
    (user_emb, playlist_emb), without_prior, record = _fit(
        clock, splits, (pairing.indptr, pairing.indices), feedback, bpr_cfg, seed, threads
    )
    candidates = _shipped_candidates(clock, splits, pairing, candidates_from, pair_cfg, threads)
    with clock.stage("evaluate"):
        metrics, keep_half = _evaluate(
            split, candidates, splits.truth, (user_emb, playlist_emb), without_prior, seed
        )
    logger.info("metrics: %s", json.dumps(metrics))
    table = playlist_emb.astype(np.float16) if keep_half else playlist_emb
    with clock.stage("write"):
        _write_arrays(tmp, user_emb, table, candidates, popularity)
        splits.truth.save(tmp / TRUTH_FILE)
    params = {
        "seed": seed,
        "synthetic": asdict(synth_cfg),
        "pairing": asdict(pair_cfg),
        "bpr": asdict(bpr_cfg),
        "prior": {"betas": list(tuning.BETAS), "validation_users": tuning.VALIDATION_USERS},
        "candidates": {"from": candidates_from},
        "feedback": {"triplets": len(feedback.triplets), "sha256": feedback.sha256},
    }
    sizes = {"n_users": n_users, "n_playlists": n_playlists, "dim": int(user_emb.shape[1])}
    created = datetime.now(UTC)
    return {
        **sizes,
        "model_version": _model_version({**params, **sizes}, created),
        "created_at": created.isoformat(timespec="seconds"),
        "n_interactions": splits.n_interactions,
        "params": params,
        "threads": threads,  # not a parameter: the artifacts are the same for any count
        **record,
        "candidates": {
            "from": candidates_from,
            "matrix": "training split (neighbours found without validation)"
            if candidates_from == "train"
            else "training split minus validation, each user's validation playlist dropped",
        },
        "playlist_dtype": {
            "dtype": str(table.dtype),
            "float16_tolerance": tuning.FLOAT16_TOLERANCE,
            "rule": "float16 unless a held-out metric of bpr_float16 is lower than bpr's "
            "by more than the tolerance",
        },
        "metrics": metrics,
        "timings": clock.timings,
        "extra_files": {TRUTH_FILE: {"sha256": sha256_file(tmp / TRUTH_FILE)}},
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
    threads: int | None = None,
    candidates_from: str = CANDIDATES_FROM[0],
    listener: StageListener | None = None,
) -> dict[str, Any]:
    """Build a complete, verified artifact directory at ``out`` and return its manifest.

    ``threads`` (default: every core) is how many threads the kNN, candidate, BPR,
    tuning and evaluation stages use (the SVD runs on one, see ``_build_into``); the
    result is deterministic for a seed and the same whatever the thread count.
    ``candidates_from`` picks the matrix the shipped candidate lists come from
    (``CANDIDATES_FROM``). ``listener`` is told when each stage starts and ends (for a
    progress display).

    Raises ValueError for sizes below 2 users / 2 playlists / dim 1, an unknown
    ``candidates_from`` or unusable feedback,
    FileExistsError if ``out`` is something other than an artifact directory, and
    ArtifactError if the written directory fails ``load_artifacts`` (nothing is moved then).
    """
    threads = threads or os.cpu_count() or 1
    if n_users < 2 or n_playlists < 2 or dim < 1 or threads < 1:
        raise ValueError(
            f"need ≥2 users, ≥2 playlists, dim ≥1, threads ≥1; "
            f"got {n_users}, {n_playlists}, {dim}, {threads}"
        )
    if candidates_from not in CANDIDATES_FROM:
        raise ValueError(f"candidates_from must be one of {CANDIDATES_FROM}: {candidates_from!r}")
    out = Path(out)
    triplets = load_feedback(feedback, n_users, n_playlists)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        start = time.perf_counter()
        # torch's CPU ops used here (index_select, index_add_, elementwise, row-wise
        # reductions) split work by rows or columns, never reorder a sum across threads:
        # the result does not depend on the thread count, and is deterministic for a seed.
        with _math_threads(threads):
            bpr_cfg = BPRConfig(dim=dim, epochs=epochs)
            manifest = _build_into(
                tmp,
                n_users,
                n_playlists,
                seed,
                bpr_cfg,
                triplets,
                threads,
                candidates_from,
                listener,
            )
        manifest["timings"]["total"] = round(time.perf_counter() - start, 3)
        manifest = write_manifest(tmp, manifest)
        load_artifacts(tmp)
        set_usual_modes(tmp)
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "built %s in %.1fs: %s", out, manifest["timings"]["total"], manifest["model_version"]
    )
    return manifest
