"""BPR matrix factorisation on CPU: minibatch SGD with hand-written gradients.

Each step takes a minibatch of (user, liked playlist, other playlist) triplets and
raises ``u·p - u·n`` through log-sigmoid. The gradients are written out by hand and
added to the touched rows only: no autograd graph, no optimizer state. The steps run in
a compiled loop (``offline.bpr_kernel``) on as many threads as the build is given, with
the same embeddings for any count; negatives are drawn with torch's seeded generator,
one epoch at a time, the next while the current one trains.

Negatives are a mix: a quarter from the user's own candidate list (the list the fleet
ranks, so the order within it is learnt), a quarter by popularity (the playlist of a random
training interaction, so the model does not merely learn popularity), the rest uniform
(so unpopular playlists sink). On the synthetic data the mix beats each source alone.
Training data are the training split's positives plus optional feedback triplets.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recfleet.offline import bpr_kernel
from recfleet.shared.artifacts import sha256_file

logger = logging.getLogger("offline")


@dataclass(frozen=True)
class BPRConfig:
    """Hyper-parameters; ``epochs=None`` picks them from the data size (``auto_epochs``)."""

    dim: int = 128
    epochs: int | None = None
    batch_size: int = 2048
    lr: float = 0.05
    # 1e-3 ranked the old validation split better (carved after pairing: hit@10 at 1 M
    # 0.219 against 0.181) but the held-out split worse at 1 M (0.078 against 0.104).
    # On the validation split that mirrors held-out, both agree at 1 M (validation 0.110
    # against 0.117, held-out 0.117 against 0.123 with the prior) and validation ties at
    # 200 000 (0.1742 both; held-out 0.1795 against 0.1786): a grid would double BPR for
    # nothing, so 1e-2 stays (docs/performance.md).
    reg: float = 1e-2
    init_std: float = 0.01
    candidate_negatives: float = 0.25
    popular_negatives: float = 0.25
    base_epochs: int = 10
    reference_density: float = 50.0
    min_samples: int = 2_000_000
    max_epochs: int = 40


@dataclass(frozen=True)
class TrainingData:
    """Positives (user, playlist) of the training matrix, candidates, and extra triplets."""

    users: np.ndarray
    playlists: np.ndarray
    n_users: int
    n_playlists: int
    cand_indptr: np.ndarray
    cand_indices: np.ndarray
    triplets: np.ndarray  # int64 [n, 3]: user, liked, shown but ignored


def auto_epochs(n_positives: int, n_playlists: int, config: BPRConfig) -> int:
    """Passes over the positives, from the data size.

    ``base_epochs`` at ``reference_density`` positives per playlist, fewer for denser data
    (each pass then updates every playlist more often; measured on the synthetic data, 10
    passes suit 51 positives per playlist and 6 suit 256, where 10 start to overfit), and
    at least ``min_samples`` triplets in all, so that small builds converge.
    """
    if n_positives == 0:
        return 0
    density = n_positives / max(1, n_playlists)
    scaled = config.base_epochs * min(1.0, (config.reference_density / density) ** (1 / 3))
    wanted = max(round(scaled), math.ceil(config.min_samples / n_positives), 1)
    return min(config.max_epochs, wanted)


def _sample_negatives(
    users: np.ndarray, data: TrainingData, config: BPRConfig, gen: torch.Generator
) -> np.ndarray:
    """One negative per user: from their candidates, by popularity, or uniform.

    The draws are torch's seeded generator's, in a fixed order; the gathers are numpy's
    (several times faster than torch's indexing), with torch's float32 arithmetic.
    """
    n = len(users)
    source = torch.rand(n, generator=gen).numpy()
    negatives = torch.randint(0, data.n_playlists, (n,), generator=gen).numpy()
    picks = torch.randint(0, max(1, len(data.playlists)), (n,), generator=gen).numpy()
    popular = source < np.float32(config.candidate_negatives + config.popular_negatives)
    negatives = np.where(popular, data.playlists[picks], negatives)
    if len(data.cand_indices) == 0:
        return negatives
    starts = data.cand_indptr[users]
    lengths = data.cand_indptr[users + 1] - starts
    draws = torch.rand(n, generator=gen).numpy()
    offsets = (draws * lengths.astype(np.float32)).astype(np.int64)
    picked = data.cand_indices[np.minimum(starts + offsets, len(data.cand_indices) - 1)]
    from_candidates = (source < np.float32(config.candidate_negatives)) & (lengths > 0)
    return np.where(from_candidates, picked, negatives)


def _epoch_triplets(
    data: TrainingData, config: BPRConfig, gen: torch.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All positives plus the extra triplets, shuffled, with fresh negatives (int64)."""
    order = torch.randperm(len(data.users), generator=gen).numpy()
    users = data.users[order].astype(np.int64)
    pos = data.playlists[order].astype(np.int64)
    neg = _sample_negatives(users, data, config, gen).astype(np.int64)
    if len(data.triplets):
        users, pos, neg = (
            np.concatenate([a, data.triplets[:, i]]) for i, a in enumerate((users, pos, neg))
        )
        shuffle = torch.randperm(len(users), generator=gen).numpy()
        users, pos, neg = users[shuffle], pos[shuffle], neg[shuffle]
    return users, pos, neg


def train_bpr(
    data: TrainingData, config: BPRConfig, seed: int, threads: int = 1
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """User and playlist embeddings (float32, C-contiguous) and training statistics.

    The steps run on ``threads`` threads (``offline.bpr_kernel``); the embeddings are the
    same for any count. Raises ValueError when an extra triplet names a row outside the
    matrix.
    """
    check_triplets(data.triplets, data.n_users, data.n_playlists)
    gen = torch.Generator().manual_seed(seed)
    user_emb = (torch.randn(data.n_users, config.dim, generator=gen) * config.init_std).numpy()
    playlist_emb = (
        torch.randn(data.n_playlists, config.dim, generator=gen) * config.init_std
    ).numpy()
    epochs = (
        config.epochs
        if config.epochs is not None
        else auto_epochs(len(data.users), data.n_playlists, config)
    )
    trainer = bpr_kernel.Trainer(config.batch_size, config.dim, threads)
    loss = float("nan")
    # The next epoch's triplets are drawn on another thread while this one trains: they
    # depend on the generator alone, which draws them in the same order as ever.
    with ThreadPoolExecutor(max_workers=1) as ahead:
        drawn = [ahead.submit(_epoch_triplets, data, config, gen)] if epochs else []
        for epoch in range(epochs):
            triplets = drawn.pop().result()
            if epoch + 1 < epochs:
                drawn.append(ahead.submit(_epoch_triplets, data, config, gen))
            # Linear decay of the step size to a tenth of it.
            lr = config.lr * (1.0 - 0.9 * epoch / max(1, epochs))
            total = trainer.epoch(
                user_emb,
                playlist_emb,
                triplets,
                lr,
                config.reg,
                lambda: any(not f.done() for f in drawn),
            )
            loss = total / max(1, len(triplets[0]))
            logger.debug("bpr: epoch %d/%d loss %.4f", epoch + 1, epochs, loss)
    samples = epochs * (len(data.users) + len(data.triplets))
    stats = {"epochs": epochs, "final_loss": round(loss, 5), "samples": samples}
    return user_emb, playlist_emb, stats


def check_triplets(triplets: np.ndarray, n_users: int, n_playlists: int) -> None:
    """Raise ValueError unless ``triplets`` is int [n, 3] of in-range (user, pos, neg) rows."""
    if triplets.ndim != 2 or triplets.shape[1] != 3:
        raise ValueError(f"feedback triplets must have shape [n, 3], got {triplets.shape}")
    if not np.issubdtype(triplets.dtype, np.integer):
        raise ValueError(f"feedback triplets must be integers, got {triplets.dtype}")
    if len(triplets) == 0:
        return
    if triplets[:, 0].min() < 0 or triplets[:, 0].max() >= n_users:
        raise ValueError(f"feedback triplets name users outside 0..{n_users - 1}")
    if triplets[:, 1:].min() < 0 or triplets[:, 1:].max() >= n_playlists:
        raise ValueError(f"feedback triplets name playlists outside 0..{n_playlists - 1}")


@dataclass(frozen=True)
class Feedback:
    """Training triplets (int64 [n, 3]: user, liked, shown but ignored) and their file's hash."""

    triplets: np.ndarray
    sha256: str | None


def load_feedback(path: Path | None, n_users: int, n_playlists: int) -> Feedback:
    """Read feedback triplets from a .npy file; none when ``path`` is None.

    Raises ValueError naming the file if it is unreadable, mis-shaped or out of range.
    """
    if path is None:
        return Feedback(np.zeros((0, 3), dtype=np.int64), None)
    try:
        triplets = np.load(path, allow_pickle=False)
        check_triplets(triplets, n_users, n_playlists)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not usable feedback triplets ({exc})") from exc
    logger.info("feedback: %d triplets from %s", len(triplets), path)
    return Feedback(np.ascontiguousarray(triplets, dtype=np.int64), sha256_file(path))
