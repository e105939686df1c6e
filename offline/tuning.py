"""Choices made on data, not by hand: the popularity prior's weight and the table dtype.

Popularity prior: a score ``u·p + β·log1p(popularity)`` ranks popular playlists a little
higher. It is folded into the embeddings as one extra dimension (playlist side
``β·log1p(pop)``, user side ``1``), so workers rank exactly as before. β is chosen on a
validation split carved from the training data (one more interaction per user held out),
never on the held-out evaluation split; the grid and every validation result go into the
manifest. The validation split mirrors the held-out one: it is carved before the
candidate lists are built, so a validation playlist is a candidate or not just as a
held-out one is, and it is scored by ``offline.evaluate``'s ranks (a target missing from
the candidates is a miss). Scoring validation with the target forced into the list
instead measured a different, less popularity-biased population and picked β = 0 at 1 M
users where the held-out split gained from β = 0.3.

Float16 playlist table: it halves the bytes the workers read per candidate. It is kept
only when the held-out metrics do not drop by more than ``FLOAT16_TOLERANCE`` (rounding
of the evaluation itself), and the comparison is recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

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
    candidate_recall: float  # of the validation playlists, the ceiling of every β
    validation_users: int


def carve_validation(train: evaluate.Split, seed: int) -> evaluate.Split:
    """Hold one more interaction per user out of ``train.train`` (for choosing β).

    Returns the smaller training matrix and the validation playlist of each user. The
    candidate lists that validation ranks must be built from the smaller matrix.
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


def prior_score_sets(
    user_emb: np.ndarray, playlist_emb: np.ndarray, popularity: np.ndarray, betas: tuple[float, ...]
) -> Callable[[np.ndarray, np.ndarray], dict[float, np.ndarray]]:
    """Scores ``u·p + β·log1p(pop)`` for every β, sharing one ``u·p`` per call.

    For ``evaluate.expected_ranks_each``; ``popularity`` counts the training interactions.
    """
    base_scorer = evaluate.bpr_scorer(user_emb, playlist_emb)
    prior = np.log1p(popularity.astype(np.float64)).astype(np.float32)

    def score(users: np.ndarray, rows: np.ndarray) -> dict[float, np.ndarray]:
        base = base_scorer(users, rows)
        return {beta: base + np.float32(beta) * prior[rows] for beta in betas}

    return score


def validation_ranks(
    user_emb: np.ndarray,
    playlist_emb: np.ndarray,
    popularity: np.ndarray,
    candidates: tuple[np.ndarray, np.ndarray],
    users: np.ndarray,
    targets: np.ndarray,
    betas: tuple[float, ...],
) -> dict[float, np.ndarray]:
    """0-based rank of each user's validation playlist among their candidates, per β.

    Ranked exactly as the held-out split is (``evaluate.expected_ranks``): inf when the
    target is not among the user's candidates, ties count half.
    """
    score_sets = prior_score_sets(user_emb, playlist_emb, popularity, betas)
    ranks = evaluate.expected_ranks_each(score_sets, *candidates, users, targets)
    return {beta: ranks.get(beta, np.full(len(users), np.inf)) for beta in betas}


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

    ``popularity`` must count the interactions the model was trained on, and
    ``candidates`` must be built without the validation playlists (from the same matrix).
    """
    users = evaluate.evaluation_users(validation, VALIDATION_USERS, seed)
    ranks = validation_ranks(
        user_emb, playlist_emb, popularity, candidates, users, validation, betas
    )
    results = {f"{beta:g}": evaluate.rank_metrics(r) for beta, r in ranks.items()}
    best = max(betas, key=lambda b: (results[f"{b:g}"]["hit@10"], results[f"{b:g}"]["mrr"], -b))
    recall = evaluate.candidate_recall(*candidates, users, validation)
    logger.info(
        "popularity prior: beta %.2f on validation %s (candidate recall %.4f)",
        best,
        results[f"{best:g}"],
        recall,
    )
    return PriorChoice(
        beta=best, validation=results, candidate_recall=recall, validation_users=len(users)
    )


def float16_keeps_quality(
    full: dict[str, float], half: dict[str, float], tolerance: float = FLOAT16_TOLERANCE
) -> bool:
    """True when no metric of the float16 table is lower by more than ``tolerance``."""
    return all(half[name] >= value - tolerance for name, value in full.items())
