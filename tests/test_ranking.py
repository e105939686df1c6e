"""Ranker against the per-user numpy reference, cold users, dtypes, and the benchmark's CLI.

Most tests use small integer-valued embeddings: every score is then exact in float16,
float32 and float64 whatever the summation order, so results must match the reference
row for row, and ties (frequent with such values) must be broken by the lower row.
With real-valued embeddings the Ranker sums in float32 in the compiler's order, so the
tolerance there is on the scores of the chosen rows (1e-5 absolute for scores of order
0.1-10): two candidates whose scores differ by less may swap, nothing more.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recfleet.worker import bench_baselines, bench_rank
from recfleet.worker.bench_baselines import BlockedRanker
from recfleet.worker.ranking import Ranker, RankResult, rank_reference

K = 10


def make_model(
    seed: int,
    n_users: int = 120,
    n_playlists: int = 60,
    dim: int = 8,
    dtype: type = np.float32,
    max_candidates: int = 25,
    integer: bool = True,
) -> dict[str, np.ndarray]:
    """Small random tables; some users have 0 or fewer than K candidates, some repeats."""
    rng = np.random.default_rng(seed)

    def embeddings(rows: int) -> np.ndarray:
        if integer:
            return rng.integers(-2, 3, size=(rows, dim)).astype(dtype)
        return rng.standard_normal((rows, dim)).astype(dtype)

    counts = rng.integers(0, max_candidates + 1, size=n_users)
    counts[rng.random(n_users) < 0.1] = 0
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return {
        "user_embeddings": embeddings(n_users),
        "playlist_embeddings": embeddings(n_playlists),
        "candidates_indptr": indptr,
        "candidates_indices": rng.integers(0, n_playlists, size=int(indptr[-1]), dtype=np.int32),
        "fallback": rng.permutation(n_playlists)[: rng.integers(1, 2 * K)].astype(np.int32),
    }


def make_job(seed: int, n_users: int, size: int = 300) -> np.ndarray:
    """User rows with unknown users (-1) and duplicates."""
    rng = np.random.default_rng(seed + 1000)
    return rng.integers(-1, n_users, size=size).astype(np.int64)


def assert_same(got: RankResult, want: RankResult) -> None:
    np.testing.assert_array_equal(got.playlists, want.playlists)
    np.testing.assert_array_equal(got.cold, want.cold)
    np.testing.assert_array_equal(got.n_candidates, want.n_candidates)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("seed", range(8))
def test_matches_reference_with_ties(seed: int, dtype: type) -> None:
    model = make_model(seed, dtype=dtype)
    rows = make_job(seed, len(model["user_embeddings"]))
    got = Ranker(**model, k=K).rank(rows)
    assert_same(got, rank_reference(**model, user_rows=rows, k=K))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("seed", range(4))
def test_matches_reference_on_float_scores(seed: int, dtype: type) -> None:
    """Random real-valued embeddings: the same top scores as the float64 reference."""
    model = make_model(
        seed, n_playlists=500, dim=32, max_candidates=100, integer=False, dtype=dtype
    )
    rows = make_job(seed, len(model["user_embeddings"]))
    got = Ranker(**model, k=K).rank(rows)
    want = rank_reference(**model, user_rows=rows, k=K)
    np.testing.assert_array_equal(got.cold, want.cold)
    np.testing.assert_array_equal(got.playlists == -1, want.playlists == -1)

    def scores(result: RankResult) -> np.ndarray:
        users = model["user_embeddings"][np.maximum(rows, 0)].astype(np.float64)
        table = model["playlist_embeddings"][np.maximum(result.playlists, 0)]
        return np.einsum("nkd,nd->nk", table.astype(np.float64), users)

    warm = ~got.cold[:, None] & (got.playlists >= 0)
    np.testing.assert_allclose(scores(got)[warm], scores(want)[warm], rtol=0, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 30])
def test_other_k(k: int) -> None:
    model = make_model(3)
    rows = make_job(3, len(model["user_embeddings"]))
    assert_same(Ranker(**model, k=k).rank(rows), rank_reference(**model, user_rows=rows, k=k))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_baseline_kernel_matches_reference(seed: int, dtype: type) -> None:
    """The previous kernel, kept for the benchmark, still ranks correctly."""
    model = make_model(seed, dtype=dtype)
    rows = make_job(seed, len(model["user_embeddings"]))
    assert_same(BlockedRanker(**model, k=K).rank(rows), rank_reference(**model, user_rows=rows))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_baseline_in_many_small_blocks(monkeypatch: pytest.MonkeyPatch, dtype: type) -> None:
    """The baseline scores a block of users at a time; tiny blocks exercise the seams."""
    monkeypatch.setattr(bench_baselines, "_BLOCK", 7)
    model = make_model(11, dtype=dtype)
    rows = make_job(11, len(model["user_embeddings"]))
    rows[:5] = -1  # a job starting with users without candidates
    ranker = BlockedRanker(**model, k=K)
    for _ in range(2):  # the second job reuses the grown buffers
        assert_same(ranker.rank(rows), rank_reference(**model, user_rows=rows, k=K))


def test_ties_go_to_the_lower_row_including_signed_zeros() -> None:
    """All scores are zero (some -0.0, some +0.0): the k lowest rows win, in order."""
    model = make_model(5, n_users=4, n_playlists=40)
    model["user_embeddings"][:] = -1.0
    model["playlist_embeddings"][:] = 0.0
    model["playlist_embeddings"][::3, 0] = 1.0
    model["playlist_embeddings"][::3, 1] = -1.0
    model["candidates_indptr"] = np.array([0, 40, 40, 45, 80], dtype=np.int64)
    rng = np.random.default_rng(0)
    model["candidates_indices"] = np.concatenate(
        [rng.permutation(40), [39, 38, 37, 36, 35], rng.permutation(35)]
    ).astype(np.int32)
    result = Ranker(**model, k=K).rank(np.array([0, 2, 3]))
    np.testing.assert_array_equal(result.playlists[0], np.arange(K))
    np.testing.assert_array_equal(result.playlists[1], [35, 36, 37, 38, 39, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(result.playlists[2], np.arange(K))


def test_sort_keys_order_by_score_then_lower_row() -> None:
    scores = np.array(
        [-np.inf, -3.5, -1e-40, -0.0, 0.0, 1e-40, 2.0, np.inf, 2.0, -0.0], dtype=np.float32
    )
    rows = np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0], dtype=np.int32)
    order = np.argsort(-bench_baselines._sort_keys(scores, rows), kind="stable")
    want = np.lexsort((rows, -scores.astype(np.float64)))  # -0.0 == 0.0 here
    np.testing.assert_array_equal(rows[order], rows[want])


def test_cold_users_get_the_fallback() -> None:
    model = make_model(2)
    model["fallback"] = np.array([7, 3, 5], dtype=np.int32)  # shorter than k: -1 padded
    empty = int(np.flatnonzero(np.diff(model["candidates_indptr"]) == 0)[0])
    warm = int(np.flatnonzero(np.diff(model["candidates_indptr"]) > 0)[0])
    result = Ranker(**model, k=K).rank(np.array([-1, empty, warm, -1]))
    fallback = [7, 3, 5] + [-1] * (K - 3)
    for i in (0, 1, 3):
        np.testing.assert_array_equal(result.playlists[i], fallback)
    np.testing.assert_array_equal(result.cold, [True, True, False, True])
    assert result.n_candidates[[0, 1, 3]].tolist() == [0, 0, 0]
    assert result.n_candidates[2] > 0


def test_duplicate_users_in_a_job_get_identical_results() -> None:
    model = make_model(4)
    rows = np.array([5, 5, 9, 5, -1, 9])
    result = Ranker(**model, k=K).rank(rows)
    np.testing.assert_array_equal(result.playlists[0], result.playlists[1])
    np.testing.assert_array_equal(result.playlists[0], result.playlists[3])
    np.testing.assert_array_equal(result.playlists[2], result.playlists[5])


@pytest.mark.parametrize("rows", [np.array([], dtype=np.int64), np.array([-1, -1])])
def test_output_dtypes_and_shapes(rows: np.ndarray) -> None:
    model = make_model(6)
    result = Ranker(**model, k=K).rank(rows)
    assert result.playlists.shape == (len(rows), K) and result.playlists.dtype == np.int64
    assert result.cold.shape == (len(rows),) and result.cold.dtype == np.bool_
    assert result.n_candidates.shape == (len(rows),) and result.n_candidates.dtype == np.int64
    assert_same(result, rank_reference(**model, user_rows=rows, k=K))


def test_tables_are_used_in_place_and_may_be_read_only() -> None:
    model = make_model(7)
    for arr in model.values():
        arr.setflags(write=False)  # torch.from_numpy would warn on these; Ranker must not
    ranker = Ranker(**model, k=K)
    assert ranker._users is model["user_embeddings"]
    assert ranker._playlists is model["playlist_embeddings"]
    rows = make_job(7, len(model["user_embeddings"]))
    assert_same(ranker.rank(rows), rank_reference(**model, user_rows=rows, k=K))


def test_rank_leaves_torch_threads_alone() -> None:
    before = torch.get_num_threads()
    Ranker(**make_model(8), k=K).rank(np.arange(20))
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("rows", [np.array([-2]), np.array([120]), np.zeros((2, 2), np.int64)])
def test_bad_user_rows_raise(rows: np.ndarray) -> None:
    with pytest.raises(ValueError):
        Ranker(**make_model(9), k=K).rank(rows)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.update(playlist_embeddings=np.asfortranarray(m["playlist_embeddings"])),
        lambda m: m.update(playlist_embeddings=m["playlist_embeddings"].astype(np.float64)),
        lambda m: m.update(candidates_indices=m["candidates_indices"] + 1000),
        lambda m: m.update(fallback=m["fallback"][:0]),
        lambda m: m.update(candidates_indptr=m["candidates_indptr"][:-1]),
        lambda m: m.update(user_embeddings=m["user_embeddings"][:, :4].copy()),
    ],
)
def test_bad_tables_raise(change: object) -> None:
    model = make_model(10)
    change(model)  # type: ignore[operator]
    with pytest.raises(ValueError):
        Ranker(**model, k=K)


def write_artifacts(path: Path, model: dict[str, np.ndarray]) -> None:
    """A real artifact directory in the shared format, from small tables."""
    from safetensors.numpy import save_file

    from recfleet.shared.artifacts import EMBEDDINGS, NPY_FILES, write_manifest

    path.mkdir()
    save_file(
        {"user": model["user_embeddings"], "playlist": model["playlist_embeddings"]},
        str(path / EMBEDDINGS),
    )
    n_users, dim = model["user_embeddings"].shape
    n_playlists = len(model["playlist_embeddings"])
    arrays = {
        "candidates_indptr": model["candidates_indptr"],
        "candidates_indices": model["candidates_indices"],
        "user_ids": np.arange(n_users, dtype=np.int64) * 3,
        "playlist_ids": np.arange(n_playlists, dtype=np.int64) + 100,
        "playlist_popularity": np.ones(n_playlists, dtype=np.int64),
        "fallback": model["fallback"],
    }
    for key, fname in NPY_FILES.items():
        np.save(path / fname, arrays[key])
    write_manifest(
        path, {"model_version": "test", "n_users": n_users, "n_playlists": n_playlists, "dim": dim}
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_from_memory_mapped_artifacts(tmp_path: Path, dtype: type) -> None:
    from recfleet.shared.artifacts import load_artifacts

    model = make_model(12, dtype=dtype)
    write_artifacts(tmp_path / "art", model)
    art = load_artifacts(tmp_path / "art")
    ranker = Ranker.from_artifacts(art, k=K)
    assert ranker._playlists is art.playlist_embeddings
    rows = make_job(12, art.n_users)
    assert_same(ranker.rank(rows), rank_reference(**model, user_rows=rows, k=K))


def test_bench_run_reports_figures_and_baselines() -> None:
    result = bench_rank.run(
        users=300,
        playlists=200,
        dim=16,
        job_size=50,
        repeats=2,
        jobs_per_repeat=3,
        distribution="uniform",
        compare=True,
    )
    assert result["users_per_s"] > 0 and result["users"] == 300
    assert set(result["baselines"]) == {"old_ranker", "per_user_loop", "padded_bmm"}


def test_bench_command_ends_with_json_and_documents_its_options(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from recfleet.cli.bench import bench

    write_artifacts(tmp_path / "art", make_model(13))
    argv = ["rank", "--artifacts", str(tmp_path / "art"), "--repeats", "1", "--jobs", "2"]
    result = CliRunner().invoke(bench, [*argv, "--compare", "--dtype", "float16", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    assert figures["users_per_s"] > 0 and figures["dtype"] == "float16"
    assert {"old_ranker", "old_ranker_float32"} <= set(figures["baselines"])
    help_text = CliRunner().invoke(bench, ["rank", "--help"]).output
    for option in ("--artifacts", "--compare", "--dtype", "--order", "--repeats", "--json"):
        assert option in help_text
    # Without --dtype an artifact table is ranked as stored (what the workers rank).
    stored = bench_rank.run(artifacts=tmp_path / "art", repeats=1, jobs_per_repeat=2)
    assert stored["dtype"] == str(make_model(13)["playlist_embeddings"].dtype)
    consecutive = bench_rank.run(
        artifacts=tmp_path / "art", repeats=1, jobs_per_repeat=2, order="consecutive"
    )
    assert consecutive["order"] == "consecutive" and consecutive["users_per_s"] > 0
