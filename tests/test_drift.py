"""Drift arithmetic: cold fraction, chi-square of popularity-bucket counts, ledger fields."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import chi2

from recfleet.shared.drift import (
    POPULARITY_LABELS,
    chi_square,
    cold_fraction,
    ordered_categories,
    shares,
)
from recfleet.shared.ledger import LedgerStatus, popularity_args, popularity_counts


def test_cold_fraction() -> None:
    assert cold_fraction(0, 1000) == 0.0
    assert cold_fraction(250, 1000) == 0.25
    assert cold_fraction(0, 0) is None
    with pytest.raises(ValueError):
        cold_fraction(5, 4)
    with pytest.raises(ValueError):
        cold_fraction(-1, 4)


def test_statistic_matches_the_textbook_formula() -> None:
    observed = {"top10": 30, "top100": 50, "top1k": 20}
    reference = {"top10": 20, "top100": 60, "top1k": 20}
    table = np.array([[30, 50, 20], [20, 60, 20]], dtype=float)
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    result = chi_square(observed, reference)
    assert result is not None
    assert result.statistic == pytest.approx(statistic)
    assert result.dof == 2
    assert result.p_value == pytest.approx(float(chi2.sf(statistic, 2)))
    assert result.cramers_v == pytest.approx(math.sqrt(statistic / 200))
    assert result.n == 200 and result.categories == ("top10", "top100", "top1k")


def test_same_proportions_give_no_drift_whatever_the_sample_sizes() -> None:
    reference = {"top10": 100, "top100": 300, "top1k": 600}
    observed = {k: 7 * v for k, v in reference.items()}
    result = chi_square(observed, reference)
    assert result is not None
    assert result.statistic == pytest.approx(0.0, abs=1e-9)
    assert result.p_value == pytest.approx(1.0)
    assert result.cramers_v == pytest.approx(0.0, abs=1e-9)


def test_a_cold_surge_is_drift_and_a_resample_is_not() -> None:
    rng = np.random.default_rng(0)
    base = np.array([0.05, 0.25, 0.7])
    labels = ("top10", "top100", "top1k")

    def sample(p: np.ndarray, n: int) -> dict[str, int]:
        return dict(zip(labels, rng.multinomial(n, p).tolist(), strict=True))

    reference = sample(base, 30_000)
    same = chi_square(sample(base, 30_000), reference)
    # Cold users all get the most popular playlists: everything lands in "top10".
    surge = chi_square({"top10": 30_000}, reference)
    assert same is not None and surge is not None
    assert same.p_value > 0.001 and same.cramers_v < 0.03
    assert surge.p_value < 1e-12 and surge.cramers_v > 0.5


def test_categories_empty_in_both_rows_are_dropped_and_order_is_by_bucket() -> None:
    observed = {"tail": 5, "top10": 10, "top10k": 0}
    reference = {"top10": 10, "tail": 5, "top100k": 0}
    assert ordered_categories(observed, reference) == ["top10", "top10k", "top100k", "tail"]
    result = chi_square(observed, reference)
    assert result is not None and result.categories == ("top10", "tail")
    assert result.dof == 1 and result.statistic == pytest.approx(0.0)


def test_undefined_and_degenerate_cases() -> None:
    assert chi_square({}, {"top10": 3}) is None
    assert chi_square({"top10": 0}, {"top10": 3}) is None
    one = chi_square({"top10": 4}, {"top10": 9})
    assert one is not None and (one.statistic, one.p_value, one.dof) == (0.0, 1.0, 0)
    with pytest.raises(ValueError):
        chi_square({"top10": -1, "top100": 2}, {"top10": 1, "top100": 1})


def test_shares() -> None:
    assert shares({"top10": 1, "top100": 3}) == {"top10": 0.25, "top100": 0.75}
    assert shares({"top10": 0}) == {"top10": 0.0}


def test_ledger_fields_round_trip_and_show_in_the_batch_status() -> None:
    counts = dict(zip(POPULARITY_LABELS, [5, 0, 7, 0, 0, 1], strict=True))
    args = popularity_args(counts)
    assert args == ["rec_top10", 5, "rec_top1k", 7, "rec_tail", 1]  # zeros are not sent
    ledger = {b"jobs_total": b"1", b"rec_top10": b"5", b"rec_top1k": b"7", b"rec_tail": b"1"}
    assert popularity_counts(ledger) == {"top10": 5, "top1k": 7, "tail": 1}
    status = LedgerStatus.parse("b", ledger)
    assert status.recommended_by_popularity == {"top10": 5, "top1k": 7, "tail": 1}
