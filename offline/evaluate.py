"""Hold-out split and ranking metrics, measured the way the fleet ranks.

One interaction per user (with at least two) is held out of training. A model is scored
by where it ranks that playlist within the user's candidate list, the list a worker ranks.
A held-out playlist missing from the candidates counts as a miss for every model, so all
models share the ceiling ``candidate_recall``. Ties count half (the expected rank under a
random tie-break), which matters for popularity scores.

The manifest's "metrics" hold hit@1/5/10 and MRR for "bpr", for "popularity" (training
interaction counts, what a non-personalised ranker does) and for "oracle" (the synthetic
ground-truth preference: the ceiling for these candidates), plus "candidate_recall" and
"eval_users" (up to 100 000 users, a seeded sample).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import scipy.sparse as sp
import torch

from recfleet.offline.synthetic import SyntheticTruth, preference

HIT_AT = (1, 5, 10)

# (user rows [B], candidate playlist rows [B, L]) -> scores [B, L]
Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
K = TypeVar("K")


@dataclass(frozen=True)
class Split:
    """Binary training matrix (users × playlists) and each user's held-out row (-1: none)."""

    train: sp.csr_matrix
    heldout: np.ndarray


def split_holdout(
    users: np.ndarray, playlists: np.ndarray, shape: tuple[int, int], rng: np.random.Generator
) -> Split:
    """Hold out one random interaction of every user who has at least two.

    ``users`` must be sorted (interactions grouped by user). Raises ValueError otherwise.
    """
    if len(users) > 1 and bool(np.any(users[1:] < users[:-1])):
        raise ValueError("interactions must be sorted by user")
    n_users, n_playlists = shape
    counts = np.bincount(users, minlength=n_users)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    eligible = np.flatnonzero(counts >= 2)
    picks = starts[eligible] + (rng.random(len(eligible)) * counts[eligible]).astype(np.int64)
    heldout = np.full(n_users, -1, dtype=np.int32)
    heldout[eligible] = playlists[picks]
    keep = np.ones(len(users), dtype=bool)
    keep[picks] = False
    train = sp.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.float32), (users[keep], playlists[keep])),
        shape=(n_users, n_playlists),
    )
    return Split(train=train, heldout=heldout)


def evaluation_users(heldout: np.ndarray, max_users: int, seed: int) -> np.ndarray:
    """Users with a held-out playlist, a deterministic sample of at most ``max_users``."""
    users = np.flatnonzero(heldout >= 0)
    if len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    return users


def padded_candidates(
    indptr: np.ndarray, indices: np.ndarray, users: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate rows of ``users`` as [B, L] (zero-padded) and the validity mask."""
    starts, lengths = indptr[users], indptr[users + 1] - indptr[users]
    width = max(1, int(lengths.max())) if len(users) else 1
    offsets = np.arange(width)
    mask = offsets[None, :] < lengths[:, None]
    positions = np.where(mask, starts[:, None] + offsets[None, :], 0)
    return np.where(mask, indices[positions], 0), mask


def expected_ranks_each(
    score_sets: Callable[[np.ndarray, np.ndarray], dict[K, np.ndarray]],
    indptr: np.ndarray,
    indices: np.ndarray,
    users: np.ndarray,
    heldout: np.ndarray,
    chunk: int = 4096,
) -> dict[K, np.ndarray]:
    """``expected_ranks`` for several scorings of the same lists, one rank array per key.

    ``score_sets`` is called like a ``Scorer`` and returns one score array per key, so
    scorings that share work (one ``u·p`` plus several priors) compute it once per chunk.
    A key appears once ``score_sets`` has named it (none when ``users`` is empty).
    """
    ranks: dict[K, np.ndarray] = {}
    for begin in range(0, len(users), chunk):
        batch = users[begin : begin + chunk]
        cands, mask = padded_candidates(indptr, indices, batch)
        target = heldout[batch]
        present = ((cands == target[:, None]) & mask).any(axis=1)
        rows = np.concatenate([cands, target[:, None]], axis=1)
        for key, scores in score_sets(batch, rows).items():
            cand_scores, target_score = scores[:, :-1], scores[:, -1:]
            above = ((cand_scores > target_score) & mask).sum(axis=1)
            ties = ((cand_scores == target_score) & mask).sum(axis=1) - 1  # minus the target
            out = ranks.setdefault(key, np.full(len(users), np.inf))
            out[begin : begin + len(batch)] = np.where(present, above + 0.5 * ties, np.inf)
    return ranks


def expected_ranks(
    scorer: Scorer,
    indptr: np.ndarray,
    indices: np.ndarray,
    users: np.ndarray,
    heldout: np.ndarray,
    chunk: int = 4096,
) -> np.ndarray:
    """0-based rank of each user's held-out playlist in their candidates; inf when absent."""
    ranks = expected_ranks_each(
        lambda batch, rows: {"": scorer(batch, rows)}, indptr, indices, users, heldout, chunk
    )
    return ranks.get("", np.full(len(users), np.inf))


def rank_metrics(ranks: np.ndarray) -> dict[str, float]:
    """hit@k and MRR from 0-based ranks (inf = not among the candidates)."""
    if len(ranks) == 0:
        return {**{f"hit@{k}": 0.0 for k in HIT_AT}, "mrr": 0.0}
    metrics = {f"hit@{k}": float(np.mean(ranks < k)) for k in HIT_AT}
    metrics["mrr"] = float(np.mean(1.0 / (ranks + 1.0)))
    return {name: round(value, 5) for name, value in metrics.items()}


def candidate_recall(
    indptr: np.ndarray, indices: np.ndarray, users: np.ndarray, heldout: np.ndarray
) -> float:
    """Fraction of ``users`` whose held-out playlist is among their candidates."""
    ranks = expected_ranks(lambda u, c: np.zeros(c.shape), indptr, indices, users, heldout)
    return round(float(np.mean(np.isfinite(ranks))), 5) if len(users) else 0.0


def bpr_scorer(user_emb: np.ndarray, playlist_emb: np.ndarray) -> Scorer:
    """Scores ``u·p`` in float32 (a float16 table is widened, as the workers do)."""
    users_t, playlists_t = torch.from_numpy(user_emb), torch.from_numpy(playlist_emb)

    def score(users: np.ndarray, cands: np.ndarray) -> np.ndarray:
        u = users_t[torch.from_numpy(users).long()].float().unsqueeze(2)
        p = playlists_t[torch.from_numpy(cands).long()].float()
        return torch.bmm(p, u).squeeze(2).numpy()

    return score


def popularity_scorer(popularity: np.ndarray) -> Scorer:
    """Scores = training interactions of each playlist."""
    return lambda users, cands: popularity[cands].astype(np.float64)


def truth_scorer(truth: SyntheticTruth) -> Scorer:
    """Scores = the synthetic ground-truth preference: the best any model could do."""
    return lambda users, cands: preference(truth, users[:, None], cands)


def evaluate_models(
    scorers: dict[str, Scorer],
    indptr: np.ndarray,
    indices: np.ndarray,
    heldout: np.ndarray,
    *,
    max_users: int,
    seed: int,
) -> dict[str, object]:
    """The manifest's "metrics": one dict per scorer, plus candidate recall and user count."""
    users = evaluation_users(heldout, max_users, seed)
    metrics: dict[str, object] = {
        name: rank_metrics(expected_ranks(scorer, indptr, indices, users, heldout))
        for name, scorer in scorers.items()
    }
    metrics["candidate_recall"] = candidate_recall(indptr, indices, users, heldout)
    metrics["eval_users"] = len(users)
    return metrics
