"""The offline artifact builder: format, quality, determinism, feedback, corruption."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp

from recfleet.offline import build, evaluate, tuning
from recfleet.offline.build import TRUTH_FILE, build_artifacts, synthetic_splits
from recfleet.offline.candidates import build_candidates, drop_user_playlists
from recfleet.offline.evaluate import expected_ranks, rank_metrics, split_holdout
from recfleet.offline.pairing import Pairing, PairingConfig, candidates_of, nearest_neighbours
from recfleet.offline.synthetic import SyntheticConfig, SyntheticTruth, generate, preference
from recfleet.shared.artifacts import MANIFEST, load_artifacts
from recfleet.shared.errors import ArtifactError

SMALL = {"n_users": 3000, "n_playlists": 1000}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("art") / "small"
    return out, build_artifacts(out, seed=0, **SMALL)


def _copy(built: tuple[Path, dict[str, Any]], tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(built[0], target)
    return target


def test_small_build_loads_with_identity_ids(built: tuple[Path, dict[str, Any]]) -> None:
    art = load_artifacts(built[0])
    prior_dims = 1 if built[1]["prior"]["beta"] > 0 else 0
    assert (art.n_users, art.n_playlists, art.dim) == (3000, 1000, 128 + prior_dims)
    assert art.user_embeddings.dtype == np.float32
    assert str(art.playlist_embeddings.dtype) == built[1]["playlist_dtype"]["dtype"]
    assert np.array_equal(art.user_ids, np.arange(3000))
    assert np.array_equal(art.playlist_ids, np.arange(1000))
    assert art.playlist_popularity.sum() > 0
    assert len(art.fallback) == 100
    assert np.all(np.diff(art.playlist_popularity[art.fallback]) <= 0)
    assert not any(built[0].parent.glob(".small.*")), "temporary directory left behind"


def test_files_get_the_usual_modes(built: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    (tmp_path / "probe").write_text("")
    (tmp_path / "probe_dir").mkdir()
    usual_file = (tmp_path / "probe").stat().st_mode
    assert (built[0] / "embeddings.safetensors").stat().st_mode == usual_file
    assert (built[0] / TRUTH_FILE).stat().st_mode == usual_file
    assert built[0].stat().st_mode == (tmp_path / "probe_dir").stat().st_mode


def test_candidates_are_20_to_100_distinct_playlists(built: tuple[Path, dict[str, Any]]) -> None:
    art = load_artifacts(built[0])
    lengths = np.diff(art.candidates_indptr)
    assert lengths.min() >= 20 and lengths.max() <= 100
    for user in range(0, 3000, 97):
        row = art.candidates_indices[art.candidates_indptr[user] : art.candidates_indptr[user + 1]]
        assert len(np.unique(row)) == len(row)


def test_bpr_beats_popularity(built: tuple[Path, dict[str, Any]]) -> None:
    metrics = built[1]["metrics"]
    bpr, popularity = metrics["bpr"], metrics["popularity"]
    assert bpr["hit@10"] > popularity["hit@10"] + 0.05
    assert bpr["mrr"] > 1.5 * popularity["mrr"]
    assert metrics["oracle"]["mrr"] >= bpr["mrr"] * 0.9
    assert 0.3 < metrics["candidate_recall"] <= 1.0
    assert bpr["hit@10"] <= metrics["candidate_recall"]


def test_manifest_records_version_params_and_timings(built: tuple[Path, dict[str, Any]]) -> None:
    manifest = json.loads((built[0] / MANIFEST).read_text())
    assert manifest["model_version"].startswith("bpr-")
    assert manifest["params"]["seed"] == 0
    stages = {"synthetic", "pairing_knn", "bpr", "tune", "evaluate", "total"}
    assert stages <= set(manifest["timings"])
    assert manifest["created_at"].endswith("+00:00")


def test_manifest_records_the_prior_and_the_table_dtype_choice(
    built: tuple[Path, dict[str, Any]],
) -> None:
    manifest = built[1]
    assert manifest["prior"]["beta"] in tuning.BETAS
    validation = manifest["prior"]["validation"]
    assert set(validation) == {f"{b:g}" for b in tuning.BETAS}
    assert min(m["hit@10"] for m in validation.values()) > 0.05  # targets really ranked
    # Validation has a candidate-recall ceiling, as held-out does: no target is forced in.
    recall = manifest["prior"]["validation_candidate_recall"]
    assert 0.3 < recall < 1.0
    assert max(m["hit@10"] for m in validation.values()) <= recall
    assert manifest["candidates"]["from"] == "train"
    metrics = manifest["metrics"]
    keeps = tuning.float16_keeps_quality(metrics["bpr"], metrics["bpr_float16"])
    assert manifest["playlist_dtype"]["dtype"] == ("float16" if keeps else "float32")
    assert metrics["bpr_without_prior"]["hit@10"] > metrics["popularity"]["hit@10"]


def test_prior_dimension_adds_beta_log_popularity() -> None:
    rng = np.random.default_rng(0)
    users = rng.standard_normal((4, 3)).astype(np.float32)
    playlists = rng.standard_normal((5, 3)).astype(np.float32)
    popularity = np.array([0, 1, 10, 100, 1000])
    u2, p2 = tuning.with_prior(users, playlists, popularity, 0.2)
    want = users @ playlists.T + 0.2 * np.log1p(popularity)[None, :]
    np.testing.assert_allclose(u2 @ p2.T, want, rtol=1e-5, atol=1e-5)
    assert tuning.with_prior(users, playlists, popularity, 0.0)[1] is playlists


def test_validation_is_carved_from_training_rows_only() -> None:
    users = np.repeat(np.arange(50), 6).astype(np.int32)
    playlists = np.tile(np.arange(6), 50).astype(np.int32)
    split = split_holdout(users, playlists, (50, 6), np.random.default_rng(0))
    carved = tuning.carve_validation(split, seed=0)
    for user in range(50):
        valid = carved.heldout[user]
        assert split.train[user, valid] == 1 and carved.train[user, valid] == 0
        assert valid != split.heldout[user]
    assert carved.train.nnz == split.train.nnz - 50


def test_validation_is_ranked_like_held_out_and_a_missing_target_misses() -> None:
    rng = np.random.default_rng(1)
    users = rng.standard_normal((3, 4)).astype(np.float32)
    playlists = rng.standard_normal((8, 4)).astype(np.float32)
    popularity = np.array([50, 1, 7, 0, 3, 20, 2, 9])
    indptr, indices = np.array([0, 3, 6, 8]), np.array([1, 2, 3, 4, 5, 6, 0, 7])
    targets = np.array([2, 0, 7])  # user 1's target is not among its candidates
    betas = (0.0, 0.5)
    ranks = tuning.validation_ranks(
        users, playlists, popularity, (indptr, indices), np.arange(3), targets, betas
    )
    prior = np.log1p(popularity).astype(np.float32)
    dot = evaluate.bpr_scorer(users, playlists)
    for beta in betas:

        def scorer(u: np.ndarray, c: np.ndarray, beta: float = beta) -> np.ndarray:
            return dot(u, c) + np.float32(beta) * prior[c]

        held_out_way = expected_ranks(scorer, indptr, indices, np.arange(3), targets)
        np.testing.assert_array_equal(ranks[beta], held_out_way)
        assert np.isfinite(ranks[beta][[0, 2]]).all() and np.isinf(ranks[beta][1])
    assert rank_metrics(ranks[0.0])["hit@10"] == pytest.approx(2 / 3, abs=1e-4)
    choice = tuning.choose_beta(users, playlists, popularity, (indptr, indices), targets, 0, betas)
    assert choice.candidate_recall == pytest.approx(2 / 3, abs=1e-4)
    assert all(m["hit@10"] <= choice.candidate_recall for m in choice.validation.values())


def test_validation_playlists_are_left_out_of_pairing_and_can_be_candidates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paired: list[tuple[sp.csr_matrix, Pairing]] = []
    pair_users = build.pair_users

    def recording_pair_users(matrix: sp.csr_matrix, *args: Any) -> Pairing:
        pairing = pair_users(matrix, *args)
        paired.append((matrix, pairing))
        return pairing

    monkeypatch.setattr(build, "pair_users", recording_pair_users)
    size = {"n_users": 2000, "n_playlists": 500}
    manifest = build_artifacts(
        tmp_path / "b", seed=0, epochs=1, candidates_from="train", threads=1, **size
    )
    splits = synthetic_splits(**size, seed=0, config=SyntheticConfig())
    target = splits.validation.heldout
    users = np.flatnonzero(target >= 0)
    [(carved, pairing)] = paired
    c_indptr, c_indices = pairing.indptr, pairing.indices
    assert carved[users, target[users]].sum() == 0, "pairing saw the validation playlists"
    assert (carved != splits.validation.train).nnz == 0
    # Some validation targets are among their user's candidates, some are not: the
    # recorded ceiling is the one of the lists validation ranked.
    sample = evaluate.evaluation_users(target, tuning.VALIDATION_USERS, 0)
    recall = evaluate.candidate_recall(c_indptr, c_indices, sample, target)
    assert 0.3 < recall < 1.0
    assert manifest["prior"]["validation_candidate_recall"] == recall
    # The shipped lists: the same neighbours' votes over the whole training split.
    train = splits.heldout.train
    whole = candidates_of(
        train, pairing.neighbours, np.asarray(train.sum(axis=0)).ravel(), PairingConfig(), 1
    )
    art = load_artifacts(tmp_path / "b")
    assert np.array_equal(art.candidates_indptr, whole[0])
    assert np.array_equal(art.candidates_indices, whole[1])
    assert manifest["candidates"]["from"] == "train"


@pytest.mark.parametrize("source", build.CANDIDATES_FROM)
def test_shipped_candidates_hold_none_of_the_users_training_playlists(
    built: tuple[Path, dict[str, Any]], tmp_path: Path, source: str
) -> None:
    directory = built[0]
    if source != built[1]["candidates"]["from"]:
        directory = tmp_path / source
        build_artifacts(directory, seed=0, epochs=1, candidates_from=source, **SMALL)
    art = load_artifacts(directory)
    shape = (SMALL["n_users"], SMALL["n_playlists"])
    lengths = np.diff(art.candidates_indptr)
    shipped = sp.csr_matrix(
        (np.ones(len(art.candidates_indices)), art.candidates_indices, art.candidates_indptr),
        shape=shape,
    )
    splits = synthetic_splits(*shape, seed=0, config=SyntheticConfig())
    assert shipped.multiply(splits.heldout.train).nnz == 0
    assert lengths.min() >= 20


def test_dropping_a_users_playlist_keeps_the_order_and_pads_again() -> None:
    seen = [[0, 9], [1], [2]]
    rows = [u for u, items in enumerate(seen) for _ in items]
    cols = [p for items in seen for p in items]
    matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(3, 12))
    indptr, indices = np.array([0, 3, 6, 9]), np.array([5, 9, 4, 3, 4, 5, 6, 7, 8], np.int32)
    popularity = np.arange(12)[::-1]  # playlist 0 is the most popular
    new_indptr, new_indices = drop_user_playlists(
        indptr, indices, np.array([9, -1, 3]), matrix, popularity, min_candidates=3
    )
    assert _rows(new_indptr, new_indices) == [[5, 4, 1], [3, 4, 5], [6, 7, 8]]


def test_synthetic_truth_is_saved(built: tuple[Path, dict[str, Any]]) -> None:
    truth = SyntheticTruth.load(built[0] / TRUTH_FILE)
    assert truth.playlist_cluster.shape == (1000,)
    assert truth.user_clusters.shape[0] == 3000
    assert np.allclose(truth.user_weights.sum(axis=1), 1.0, atol=1e-5)


def test_same_seed_same_artifacts_other_seed_differs(
    built: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    assert built[1]["threads"] > 1 or (os.cpu_count() or 1) == 1
    again = build_artifacts(tmp_path / "again", seed=0, threads=1, **SMALL)
    assert again["files"] == built[1]["files"], "the thread count changed the artifacts"
    assert again["model_version"] == built[1]["model_version"]
    other = build_artifacts(tmp_path / "other", seed=1, **SMALL)
    assert other["files"]["embeddings.safetensors"] != built[1]["files"]["embeddings.safetensors"]


def test_feedback_triplets_are_trained_on(
    built: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    triplets = np.array([[0, 5, 6], [1, 7, 8], [2999, 999, 0]] * 50, dtype=np.int64)
    np.save(tmp_path / "fb.npy", triplets)
    manifest = build_artifacts(tmp_path / "fb", seed=0, feedback=tmp_path / "fb.npy", **SMALL)
    assert manifest["params"]["feedback"]["triplets"] == 150
    assert manifest["training"]["samples"] > built[1]["training"]["samples"]
    emb = load_artifacts(tmp_path / "fb")
    base = load_artifacts(built[0])
    assert not np.array_equal(emb.user_embeddings[0], base.user_embeddings[0])


@pytest.mark.parametrize(
    "triplets",
    [np.array([[0, 1, 1000]]), np.array([[0, 1]]), np.array([[0.5, 1.0, 2.0]])],
    ids=["out-of-range", "wrong-shape", "floats"],
)
def test_bad_feedback_is_refused_before_building(tmp_path: Path, triplets: np.ndarray) -> None:
    np.save(tmp_path / "fb.npy", triplets)
    with pytest.raises(ValueError, match=r"fb\.npy"):
        build_artifacts(tmp_path / "out", seed=0, feedback=tmp_path / "fb.npy", **SMALL)
    assert not (tmp_path / "out").exists()


def test_tiny_catalogue_still_gets_twenty_candidates(tmp_path: Path) -> None:
    build_artifacts(tmp_path / "tiny", n_users=40, n_playlists=20, seed=3, epochs=2)
    art = load_artifacts(tmp_path / "tiny")
    assert np.all(np.diff(art.candidates_indptr) == 20)


def test_rebuild_replaces_artifacts_but_not_other_directories(tmp_path: Path) -> None:
    out = tmp_path / "art"
    build_artifacts(out, n_users=50, n_playlists=40, seed=0, epochs=1)
    build_artifacts(out, n_users=60, n_playlists=40, seed=0, epochs=1)
    assert load_artifacts(out).n_users == 60
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_artifacts(precious, n_users=50, n_playlists=40, seed=0, epochs=1)
    assert (precious / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "precious"]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _set_format_version(path: Path) -> None:
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-16])


@pytest.mark.parametrize(
    ("name", "corrupt"),
    [
        ("embeddings.safetensors", _flip_byte),
        ("candidates_indices.npy", _flip_byte),
        ("fallback.npy", Path.unlink),
        ("manifest.json", _set_format_version),
        ("candidates_indptr.npy", _truncate),
        ("user_ids.npy", _truncate),
    ],
)
def test_corruption_is_refused_naming_the_file(
    built: tuple[Path, dict[str, Any]], tmp_path: Path, name: str, corrupt: Any
) -> None:
    path = _copy(built, tmp_path)
    corrupt(path / name)
    with pytest.raises(ArtifactError, match=name.replace(".", r"\.")):
        load_artifacts(path)


def test_preference_is_a_distribution() -> None:
    _, truth = generate(5, 300, seed=2)
    probs = preference(truth, np.arange(5)[:, None], np.arange(300)[None, :])
    assert np.allclose(probs.sum(axis=1), 1.0)


def test_interactions_are_distinct_power_law_and_seeded() -> None:
    inter, _ = generate(2000, 500, seed=4)
    again, _ = generate(2000, 500, seed=4)
    assert np.array_equal(inter.playlists, again.playlists)
    keys = inter.users.astype(np.int64) * 500 + inter.playlists
    assert np.all(np.diff(keys) > 0)
    counts = np.sort(np.bincount(inter.playlists, minlength=500))[::-1]
    assert counts[:5].sum() > 5 * counts[250:255].sum()
    assert 10 < len(inter.users) / 2000 < 60


def test_holdout_removes_one_interaction_per_user() -> None:
    inter, _ = generate(300, 200, seed=5)
    split = split_holdout(inter.users, inter.playlists, (300, 200), np.random.default_rng(0))
    assert split.train.nnz == len(inter.users) - int((split.heldout >= 0).sum())
    users = np.flatnonzero(split.heldout >= 0)
    assert split.train[users, split.heldout[users]].sum() == 0


def test_ivf_search_finds_most_exact_neighbours() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 16))
    emb = (centres[rng.integers(0, 20, 4000)] + 0.3 * rng.normal(size=(4000, 16))).astype(
        np.float32
    )
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    approx = nearest_neighbours(emb, 10, seed=0, cell_size=200, pool_size=600)
    again = nearest_neighbours(emb, 10, seed=0, cell_size=200, pool_size=600, threads=2)
    assert np.array_equal(again, approx)
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    exact = np.argsort(-sim, axis=1)[:, :10]
    overlap = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert overlap > 0.8
    assert not np.any(approx == np.arange(4000)[:, None])


def test_ties_count_half_and_absent_targets_miss() -> None:
    indptr = np.array([0, 3, 6])
    indices = np.array([1, 2, 3, 4, 5, 6])
    heldout = np.array([2, 9])
    ranks = expected_ranks(
        lambda u, c: np.ones(c.shape), indptr, indices, np.array([0, 1]), heldout
    )
    assert ranks[0] == 1.0 and np.isinf(ranks[1])
    assert rank_metrics(ranks)["hit@1"] == 0.0
    assert rank_metrics(ranks)["mrr"] == pytest.approx(0.25)


def _rows(indptr: np.ndarray, indices: np.ndarray) -> list[list[int]]:
    return [indices[a:b].tolist() for a, b in itertools.pairwise(indptr)]


def test_candidates_rank_by_votes_exclude_seen_and_pad_from_popularity() -> None:
    seen = [[0, 1], [0, 2, 3], [2, 3, 4], [5], []]
    rows = [u for u, items in enumerate(seen) for _ in items]
    cols = [p for items in seen for p in items]
    matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(5, 30))
    neighbours = np.array([[1, 2], [2, -1], [1, 0], [-1, -1], [0, 1]], dtype=np.int32)
    popularity = np.arange(30)[::-1]  # playlist 0 is the most popular
    indptr, indices = build_candidates(matrix, neighbours, popularity, min_candidates=5)
    assert indptr.dtype == np.int64 and indices.dtype == np.int32
    assert _rows(indptr, indices) == [
        [2, 3, 4, 5, 6],  # 2 and 3 have two votes, 4 one; then popular unseen
        [4, 1, 5, 6, 7],
        [0, 1, 5, 6, 7],
        [0, 1, 2, 3, 4],  # no neighbours: popularity, minus the seen 5
        [0, 1, 2, 3, 4],
    ]
    _, capped = build_candidates(matrix, neighbours, popularity, min_candidates=1, max_candidates=2)
    assert capped[:2].tolist() == [2, 3]


def test_build_command_prints_stage_timings_and_no_live_display_off_a_terminal(
    tmp_path: Path,
) -> None:
    from click.testing import CliRunner

    from recfleet.cli.artifacts import artifacts

    argv = ["build", "--out", str(tmp_path / "a"), "--users", "2000", "--playlists", "500"]
    result = CliRunner().invoke(artifacts, [*argv, "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "build stages" in result.output and "bpr" in result.output
    assert "⠋" not in result.output  # no spinner frames when not on a terminal
    assert json.loads((tmp_path / "a" / MANIFEST).read_text())["threads"] == 1


def test_stage_display_shows_running_and_finished_stages() -> None:
    from io import StringIO

    from rich.console import Console
    from rich.progress import Progress, TextColumn

    from recfleet.cli.artifacts import _StageDisplay

    console = Console(file=StringIO(), force_terminal=True)
    with Progress(TextColumn("{task.description}"), console=console) as progress:
        display = _StageDisplay(progress)
        display("pairing", None)
        display("pairing_svd", 1.25)
        display("pairing", 3.5)
        display("bpr", None)
        shown = {task.description: task.finished for task in progress.tasks}
    assert shown == {"pairing (3.5s)": True, "pairing_svd (1.2s)": True, "bpr": False}
