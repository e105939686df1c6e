"""Drift figures of a batch: cold-user fraction and a chi-square test of what was recommended.

Pure arithmetic on counts, no I/O. The recommended playlists of a batch are summarised as
counts per popularity-rank bucket of the playlist (six buckets, so the test has bounded
cardinality whatever the catalogue size); a batch is compared with a reference batch by
Pearson's chi-square test of homogeneity on the 2 x k table of those counts.

At fleet scale a batch holds millions of recommendations and any difference, however
small, is "significant"; Cramér's V (``sqrt(chi2 / n)`` for two rows) measures how large
the difference is, independently of the sample size, and is what thresholds should use.
Each user contributes ``top_k`` correlated recommendations, so the p-value is optimistic;
read it as a flag, not as an exact error rate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2_contingency

# Popularity-rank buckets of a playlist: ranks [0, 10) are "top10", [10, 100) "top100", ...
POPULARITY_EDGES = (10, 100, 1_000, 10_000, 100_000)
POPULARITY_LABELS = ("top10", "top100", "top1k", "top10k", "top100k", "tail")


@dataclass(frozen=True)
class ChiSquare:
    """Pearson's chi-square test of two count vectors over the same categories."""

    statistic: float
    p_value: float
    dof: int
    cramers_v: float
    n: int  # observations in both rows
    categories: tuple[str, ...]  # the categories tested (those non-empty in either row)


def cold_fraction(cold_users: int, users: int) -> float | None:
    """Share of ``users`` that got the cold-start fallback; None when there are no users.

    Raises ValueError on negative counts or more cold users than users.
    """
    if users < 0 or cold_users < 0 or cold_users > users:
        raise ValueError(f"bad counts: {cold_users} cold of {users} users")
    return cold_users / users if users else None


def ordered_categories(*counts: Mapping[str, int]) -> list[str]:
    """The popularity labels in bucket order, then any other keys found, sorted."""
    seen = set().union(*(c.keys() for c in counts))
    extra = sorted(seen.difference(POPULARITY_LABELS))
    return [label for label in POPULARITY_LABELS if label in seen] + extra


def shares(counts: Mapping[str, int]) -> dict[str, float]:
    """Each category's share of the total (all zeros when the total is zero)."""
    total = sum(counts.values())
    return {k: (v / total if total else 0.0) for k, v in counts.items()}


def chi_square(observed: Mapping[str, int], reference: Mapping[str, int]) -> ChiSquare | None:
    """Test whether ``observed`` and ``reference`` counts come from the same distribution.

    Categories empty in both rows are dropped (they carry no information and would make
    an expected count zero). Returns None when either row has no observations, since
    the test is then undefined. Raises ValueError on a negative count.
    """
    categories = ordered_categories(observed, reference)
    table = np.array(
        [[observed.get(c, 0) for c in categories], [reference.get(c, 0) for c in categories]],
        dtype=np.int64,
    ).reshape(2, len(categories))
    if (table < 0).any():
        raise ValueError("counts must not be negative")
    keep = table.sum(axis=0) > 0
    table = table[:, keep]
    kept = tuple(c for c, k in zip(categories, keep.tolist(), strict=True) if k)
    n = int(table.sum())
    if table.shape[1] == 0 or (table.sum(axis=1) == 0).any():
        return None
    if table.shape[1] == 1:
        # Both rows put everything in one category: identical distributions.
        return ChiSquare(0.0, 1.0, 0, 0.0, n, kept)
    # No Yates correction: the plain Pearson statistic, whatever the number of categories.
    result = chi2_contingency(table, correction=False)
    statistic = float(result.statistic)
    return ChiSquare(
        statistic=statistic,
        p_value=float(result.pvalue),
        dof=int(result.dof),
        cramers_v=math.sqrt(statistic / n),
        n=n,
        categories=kept,
    )
