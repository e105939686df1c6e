"""The compiled BPR step: the math of a plain minibatch step (the torch step it replaces:
gathered rows, then three ``index_add_``), the same bits on any number of threads."""

from __future__ import annotations

import numpy as np
import pytest

from recfleet.offline import bpr_kernel
from recfleet.offline.bpr import BPRConfig, TrainingData, train_bpr

Triplets = tuple[np.ndarray, np.ndarray, np.ndarray]


def _reference_step(
    user_emb: np.ndarray, playlist_emb: np.ndarray, triplets: Triplets, lr: float, reg: float
) -> float:
    """One minibatch step in numpy, in place: gradients from the rows as they were before
    the step, added with ``np.add.at`` (repeated rows add up); returns the summed loss."""
    users, pos, neg = triplets
    u, p, n = user_emb[users], playlist_emb[pos], playlist_emb[neg]
    x = np.einsum("ij,ij->i", u, p - n)
    step = (np.float32(1.0) / (np.float32(1.0) + np.exp(x)) * np.float32(lr))[:, None]
    decay = np.float32(-lr * reg)
    np.add.at(user_emb, users, (p - n) * step + decay * u)
    np.add.at(playlist_emb, pos, p * decay + u * step)
    np.add.at(playlist_emb, neg, n * decay - u * step)
    return float(np.logaddexp(0.0, -x.astype(np.float64)).sum())


def test_one_minibatch_is_the_reference_step() -> None:
    rng = np.random.default_rng(0)
    users = rng.normal(0.0, 0.1, (30, 128)).astype(np.float32)
    playlists = rng.normal(0.0, 0.1, (20, 128)).astype(np.float32)
    # 300 triplets over few rows: rows repeat, as liked and as other playlist alike.
    triplets = (rng.integers(0, 30, 300), rng.integers(0, 20, 300), rng.integers(0, 20, 300))
    want_users, want_playlists = users.copy(), playlists.copy()
    want_loss = _reference_step(want_users, want_playlists, triplets, lr=0.5, reg=0.01)
    got_users, got_playlists = users.copy(), playlists.copy()
    trainer = bpr_kernel.Trainer(batch_size=512, dim=128, threads=2)
    sums = np.zeros(1)
    trainer.steps(got_users, got_playlists, triplets, 0.5, 0.01, threads=2, sums=sums)
    loss = sums[0]
    assert np.abs(want_playlists - playlists).max(axis=1).min() > 1e-3  # every row moved
    # The kernel sums the 128-term dot product in another order and fuses multiply-adds,
    # so each of the ~30 additions a playlist row gets here may round differently, by an
    # ulp of the values (6e-8 at 0.6): 1e-6 allows that, under 1e-5 of every row's move.
    np.testing.assert_allclose(got_users, want_users, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_playlists, want_playlists, rtol=0, atol=1e-6)
    assert loss == pytest.approx(want_loss, rel=1e-6)


def test_minibatches_see_the_previous_updates() -> None:
    rng = np.random.default_rng(1)
    users = rng.normal(0.0, 0.1, (30, 16)).astype(np.float32)
    playlists = rng.normal(0.0, 0.1, (20, 16)).astype(np.float32)
    triplets = (rng.integers(0, 30, 250), rng.integers(0, 20, 250), rng.integers(0, 20, 250))
    want_users, want_playlists = users.copy(), playlists.copy()
    want_loss = 0.0
    for begin in range(0, 250, 64):  # the last minibatch is short
        batch = tuple(column[begin : begin + 64] for column in triplets)
        want_loss += _reference_step(want_users, want_playlists, batch, lr=0.5, reg=0.01)
    trainer = bpr_kernel.Trainer(batch_size=64, dim=16, threads=1)
    loss = trainer.epoch(users, playlists, triplets, 0.5, 0.01)
    np.testing.assert_allclose(users, want_users, rtol=0, atol=1e-6)
    np.testing.assert_allclose(playlists, want_playlists, rtol=0, atol=1e-6)
    assert loss == pytest.approx(want_loss, rel=1e-6)


def test_kernel_gives_the_same_bits_on_one_and_on_two_threads() -> None:
    rng = np.random.default_rng(3)
    users = rng.normal(0.0, 0.1, (500, 32)).astype(np.float32)
    playlists = rng.normal(0.0, 0.1, (200, 32)).astype(np.float32)
    triplets = (rng.integers(0, 500, 5000), rng.integers(0, 200, 5000), rng.integers(0, 200, 5000))
    results = []
    for threads in (1, 2):
        got_users, got_playlists = users.copy(), playlists.copy()
        trainer = bpr_kernel.Trainer(batch_size=256, dim=32, threads=2)
        sums = np.zeros(20)
        trainer.steps(got_users, got_playlists, triplets, 0.5, 0.01, threads=threads, sums=sums)
        results.append((got_users, got_playlists, sums))
    assert np.array_equal(results[0][0], results[1][0])
    assert np.array_equal(results[0][1], results[1][1])
    assert np.array_equal(results[0][2], results[1][2])


def test_thread_choice_keeps_the_faster_count_and_probes_the_other_less_and_less() -> None:
    choice = bpr_kernel.ThreadChoice(threads=2)
    assert choice.next() == 2
    choice.record(2, seconds=3.0, triplets=1000)  # slower: a busy machine
    assert choice.next() == 1
    choice.record(1, seconds=2.0, triplets=1000)
    picked = []
    for _ in range(120):
        picked.append(choice.next())
        choice.record(picked[-1], seconds=2.0 if picked[-1] == 1 else 3.0, triplets=1000)
    probes = [i for i, count in enumerate(picked) if count == 2]
    assert np.diff(probes).tolist() == [33, 65]  # each losing probe doubles the wait
    while choice.next() == 1:
        choice.record(1, seconds=2.0, triplets=1000)
    choice.record(2, seconds=1.0, triplets=1000)  # the machine is free again
    assert choice.next() == 2 and choice.wait == bpr_kernel.PROBE_EVERY
    assert bpr_kernel.ThreadChoice(threads=1).counts == (1,)


def _data(n_users: int, n_playlists: int, seed: int) -> TrainingData:
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users, dtype=np.int32), 12)
    playlists = (rng.zipf(1.5, len(users)) % n_playlists).astype(np.int32)
    lengths = np.full(n_users, 30)
    return TrainingData(
        users=users,
        playlists=playlists,
        n_users=n_users,
        n_playlists=n_playlists,
        cand_indptr=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        cand_indices=rng.integers(0, n_playlists, int(lengths.sum())).astype(np.int32),
        triplets=np.array([[0, 1, 2], [5, 3, 4]] * 20, dtype=np.int64),
    )


def test_training_gives_the_same_bits_on_any_number_of_threads() -> None:
    data = _data(2000, 500, seed=2)
    config = BPRConfig(dim=32, epochs=3, batch_size=256)
    user_emb, playlist_emb, stats = train_bpr(data, config, seed=7, threads=1)
    for threads in (2, 3):
        other_users, other_playlists, other_stats = train_bpr(data, config, seed=7, threads=threads)
        assert np.array_equal(other_users, user_emb)
        assert np.array_equal(other_playlists, playlist_emb)
        assert other_stats == stats
    assert stats["final_loss"] < np.log(2.0)  # it learnt something
