"""Choices made on data, not by hand: the popularity prior's weight and the table dtype.

Popularity prior: a score ``u·p + β·log1p(popularity)`` ranks popular playlists a little
higher. It is folded into the embeddings as one extra dimension (playlist side
``β·log1p(pop)``, user side ``1``), so workers rank exactly as before. β is chosen on a
validation split carved from the training data (one more interaction per user held out
of the model's training matrix), never on the held-out evaluation split; the grid and
every validation result go into the manifest.

Float16 playlist table: it halves the bytes the workers read per candidate. It is kept
only when the held-out metrics do not drop by more than ``FLOAT16_TOLERANCE`` (rounding
of the evaluation itself), and the comparison is recorded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from recfleet.offline import evaluate

logger = logging.getLogger("offline")

BETAS = (0.0, 0.04, 0.08, 0.12, 0.16, 0.2, 0.3, 0.4, 0.6)  # 0.3 was best at 200k users
VALIDATION_USERS = 50_000
FLOAT16_TOLERANCE = 5e-4


@dataclass(frozen=True)
class PriorChoice:
    """The chosen β and the validation metrics of every β tried."""

    beta: float
    validation: dict[str, dict[str, float]]


def carve_validation(train: evaluate.Split, seed: int) -> evaluate.Split:
    """Hold one more interaction per user out of ``train.train`` (for choosing β).

    Returns the smaller training matrix and the validation playlist of each user.
    """
    coo = train.train.tocoo()  # a CSR matrix's COO rows come out sorted by user
    rng = np.random.default_rng([seed, 2])
    return evaluate.split_holdout(
        coo.row.astype(np.int32), coo.col.astype(np.int32), train.train.shape, rng
    )


def prior_column(popularity: np.ndarray, beta: float) -> np.ndarray:
    """float32 [P, 1]: the playlist side of the prior dimension."""
    return (beta * np.log1p(popularity.astype(np.float64))).astype(np.float32)[:, None]


def with_prior(
    user_emb: np.ndarray, playlist_emb: np.ndarray, popularity: np.ndarray, beta: float
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings with the prior dimension appended (unchanged when ``beta`` is 0)."""
    if beta == 0.0:
        return user_emb, playlist_emb
    ones = np.ones((len(user_emb), 1), dtype=np.float32)
    users = np.ascontiguousarray(np.hstack([user_emb, ones]), dtype=np.float32)
    playlists = np.hstack([playlist_emb, prior_column(popularity, beta)])
    return users, np.ascontiguousarray(playlists, dtype=np.float32)


def validation_ranks(
    user_emb: np.ndarray,
    playlist_emb: np.ndarray,
    popularity: np.ndarray,
    candidates: tuple[np.ndarray, np.ndarray],
    users: np.ndarray,
    targets: np.ndarray,
    betas: tuple[float, ...],
    chunk: int = 4096,
) -> dict[float, np.ndarray]:
    """0-based rank of each user's validation playlist among their candidates, per β.

    Candidate lists leave out what a user has in the training matrix, which includes the
    validation playlists, so the target is ranked as if it were added to the list (ties
    count half). Scores ``u·p + β·log1p(pop)`` share one ``u·p`` per chunk.
    """
    users_t, playlists_t = torch.from_numpy(user_emb), torch.from_numpy(playlist_emb)
    prior = np.log1p(popularity.astype(np.float64)).astype(np.float32)
    ranks = {beta: np.empty(len(users)) for beta in betas}
    for begin in range(0, len(users), chunk):
        batch = users[begin : begin + chunk]
        cands, mask = evaluate.padded_candidates(*candidates, batch)
        rows = np.concatenate([cands, targets[batch][:, None]], axis=1)
        u = users_t[torch.from_numpy(batch).long()].unsqueeze(2)
        base = torch.bmm(playlists_t[torch.from_numpy(rows).long()], u).squeeze(2).numpy()
        for beta in betas:
            scores = base + np.float32(beta) * prior[rows]
            above = ((scores[:, :-1] > scores[:, -1:]) & mask).sum(axis=1)
            ties = ((scores[:, :-1] == scores[:, -1:]) & mask).sum(axis=1)
            ranks[beta][begin : begin + len(batch)] = above + 0.5 * ties
    return ranks


def choose_beta(
    user_emb: np.ndarray,
    playlist_emb: np.ndarray,
    popularity: np.ndarray,
    candidates: tuple[np.ndarray, np.ndarray],
    validation: np.ndarray,
    seed: int,
    betas: tuple[float, ...] = BETAS,
) -> PriorChoice:
    """The β with the best validation hit@10 (then MRR); the smaller β wins ties.

    ``popularity`` must count the interactions the model was trained on.
    """
    users = evaluate.evaluation_users(validation, VALIDATION_USERS, seed)
    ranks = validation_ranks(
        user_emb, playlist_emb, popularity, candidates, users, validation, betas
    )
    results = {f"{beta:g}": evaluate.rank_metrics(r) for beta, r in ranks.items()}
    best = max(betas, key=lambda b: (results[f"{b:g}"]["hit@10"], results[f"{b:g}"]["mrr"], -b))
    logger.info("popularity prior: beta %.2f on validation %s", best, results[f"{best:g}"])
    return PriorChoice(beta=best, validation=results)


def float16_keeps_quality(
    full: dict[str, float], half: dict[str, float], tolerance: float = FLOAT16_TOLERANCE
) -> bool:
    """True when no metric of the float16 table is lower by more than ``tolerance``."""
    return all(half[name] >= value - tolerance for name, value in full.items())
