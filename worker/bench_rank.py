"""Benchmark of ``worker.ranking``: users ranked per second, no broker involved.

Builds synthetic tables (or maps a real artifact directory), warms up, then times
``Ranker.rank`` on jobs of random users and reports the median users/s over repeats,
with ``--compare`` running the baselines of ``worker.bench_baselines`` (the previous
kernel, the per-user loop, padded bmm) side by side, interleaved repeat by repeat::

    recfleet bench rank --users 1000000 --playlists 1000000 --distribution zipf --compare
    recfleet bench rank --artifacts artifacts/current --compare --json

``--dtype float16`` ranks against a float16 copy of a float32 table (and vice versa), so
the two can be compared on one artifact directory; ``--compare`` then also times the old
kernel on the table as stored (``old_ranker_float32``).

Synthetic candidates: 20–100 per user (uniform), playlist rows drawn uniformly or from a
Zipf-like popularity law (``w = (rank + 1) ** -0.9`` as in ``offline.synthetic``, ranks
randomly permuted over the table so popular rows are scattered). With ``--json`` the last
line printed is one JSON object whose throughput field is ``users_per_s``
(``recfleet bench rank``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recfleet.worker.bench_baselines import BlockedRanker, padded_bmm, per_user_loop
from recfleet.worker.ranking import Ranker

ZIPF_EXPONENT = 0.9
MIN_CANDIDATES, MAX_CANDIDATES = 20, 100
_CHUNK = 1 << 22  # rows generated per step, to bound temporary memory


def _zipf_rows(rng: np.random.Generator, n: int, playlists: int) -> np.ndarray:
    """n playlist rows drawn by a power law over popularity ranks, ranks permuted."""
    a = 1.0 - ZIPF_EXPONENT
    top = (playlists + 1.0) ** a - 1.0
    rank_to_row = rng.permutation(playlists).astype(np.int32)
    out = np.empty(n, dtype=np.int32)
    for begin in range(0, n, _CHUNK):
        u = rng.random(min(_CHUNK, n - begin))
        ranks = ((1.0 + u * top) ** (1.0 / a)).astype(np.int64) - 1
        out[begin : begin + len(u)] = rank_to_row[np.minimum(ranks, playlists - 1)]
    return out


def synthetic_model(
    users: int,
    playlists: int,
    dim: int = 128,
    distribution: str = "zipf",
    dtype: str = "float32",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random embeddings and CSR candidates shaped like the artifacts (see module doc)."""
    rng = np.random.default_rng(seed)
    emb_dtype = np.dtype(dtype)
    counts = rng.integers(MIN_CANDIDATES, MAX_CANDIDATES + 1, size=users)
    indptr = np.zeros(users + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    nnz = int(indptr[-1])
    if distribution == "uniform":
        indices = rng.integers(0, playlists, size=nnz, dtype=np.int32)
    elif distribution == "zipf":
        indices = _zipf_rows(rng, nnz, playlists)
    else:
        raise ValueError(f"distribution must be 'uniform' or 'zipf', got {distribution!r}")
    return {
        "user_embeddings": _normal(rng, users, dim, emb_dtype),
        "playlist_embeddings": _normal(rng, playlists, dim, emb_dtype),
        "candidates_indptr": indptr,
        "candidates_indices": indices,
        "fallback": rng.permutation(playlists)[:50].astype(np.int32),
    }


def _normal(rng: np.random.Generator, rows: int, dim: int, dtype: np.dtype) -> np.ndarray:
    out = np.empty((rows, dim), dtype=dtype)
    for begin in range(0, rows, _CHUNK // dim):
        block = rng.standard_normal((min(_CHUNK // dim, rows - begin), dim), dtype=np.float32)
        out[begin : begin + len(block)] = block * np.float32(0.1)
    return out


def _touch(arrays: Sequence[np.ndarray]) -> None:
    """Read one element per page so memory-mapped tables are resident before timing."""
    for arr in arrays:
        flat = arr.reshape(-1)
        step = max(1, 4096 // flat.itemsize)
        float(flat[::step].sum(dtype=np.float64))


def _time_jobs(rank: Callable[[np.ndarray], Any], jobs: Sequence[np.ndarray]) -> list[float]:
    times = []
    for job in jobs:
        start = time.perf_counter()
        rank(job)
        times.append(time.perf_counter() - start)
    return times


def _figures(repeat_times: list[list[float]], job_size: int) -> dict[str, float]:
    """users/s median/min/max over repeats and per-job latency percentiles."""
    rates = [job_size * len(t) / sum(t) for t in repeat_times]
    per_job_ms = np.array([x for t in repeat_times for x in t]) * 1e3 * 1000 / job_size
    return {
        "users_per_s": statistics.median(rates),
        "users_per_s_min": min(rates),
        "users_per_s_max": max(rates),
        "ms_per_1000_users_p50": float(np.percentile(per_job_ms, 50)),
        "ms_per_1000_users_p99": float(np.percentile(per_job_ms, 99)),
    }


def run(
    users: int = 1_000_000,
    playlists: int = 1_000_000,
    dim: int = 128,
    k: int = 10,
    job_size: int = 1000,
    repeats: int = 7,
    threads: int = 1,
    distribution: str = "zipf",
    artifacts: Path | None = None,
    jobs_per_repeat: int = 40,
    compare: bool = False,
    dtype: str | None = None,
    seed: int = 0,
    order: str = "random",
) -> dict[str, Any]:
    """Time Ranker.rank (and, with compare, the baselines) and return the figures.

    With ``artifacts`` the tables come from that directory (users, playlists, dim and
    distribution are then ignored; the playlist table is converted to ``dtype`` when one
    is given, else ranked as stored; synthetic tables default to float32). ``order``
    makes each job ``random`` users or a ``consecutive`` run of user rows (what a fleet
    ranks when users are submitted in id order, as ``submit --all`` does).
    Sets torch's thread count for the run and restores it.
    Raises shared.errors.ArtifactError for an unreadable artifact directory.
    """
    if artifacts is not None:
        from recfleet.shared.artifacts import load_artifacts

        art = load_artifacts(artifacts, verify_checksums=False)
        model = {
            name: getattr(art, name)
            for name in (
                "user_embeddings",
                "playlist_embeddings",
                "candidates_indptr",
                "candidates_indices",
                "fallback",
            )
        }
        stored = model["playlist_embeddings"]
        if dtype is not None and stored.dtype != np.dtype(dtype):
            model["playlist_embeddings"] = stored.astype(dtype)
        source = str(artifacts)
    else:
        model = synthetic_model(users, playlists, dim, distribution, dtype or "float32", seed)
        source = f"synthetic {distribution}"
    n_users, n_playlists = (len(model["user_embeddings"]), len(model["playlist_embeddings"]))
    _touch(list(model.values()))
    rng = np.random.default_rng(seed + 1)
    if order == "consecutive":
        starts = rng.integers(0, max(1, n_users - job_size), size=jobs_per_repeat)
        jobs = [np.arange(start, min(n_users, start + job_size)) for start in starts]
    else:
        jobs = [rng.integers(0, n_users, size=job_size) for _ in range(jobs_per_repeat)]
    ranker = Ranker(**model, k=k, check=False)
    contenders: dict[str, tuple[Callable[[np.ndarray], Any], Sequence[np.ndarray]]] = {
        "ranker": (ranker.rank, jobs)
    }
    if compare:  # the loop baselines are ~10x slower: fewer jobs each, same repeats
        contenders["old_ranker"] = (BlockedRanker(**model, k=k, check=False).rank, jobs)
        if artifacts is not None and stored.dtype != model["playlist_embeddings"].dtype:
            as_stored = {**model, "playlist_embeddings": stored}
            name = f"old_ranker_{stored.dtype}"  # the old kernel on the table as stored
            contenders[name] = (BlockedRanker(**as_stored, k=k, check=False).rank, jobs)
        few = jobs[: max(2, jobs_per_repeat // 8)]
        contenders["per_user_loop"] = (per_user_loop(model, k), few)
        contenders["padded_bmm"] = (padded_bmm(model, k), few)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times: dict[str, list[list[float]]] = {name: [] for name in contenders}
        for rank, some_jobs in contenders.values():
            _time_jobs(rank, some_jobs[:2])  # warm-up
        for _ in range(repeats):
            for name, (rank, some_jobs) in contenders.items():
                times[name].append(_time_jobs(rank, some_jobs))
    finally:
        torch.set_num_threads(previous_threads)
    nnz = int(model["candidates_indptr"][-1])
    result: dict[str, Any] = {
        **_figures(times["ranker"], job_size),
        "source": source,
        "users": n_users,
        "playlists": n_playlists,
        "dim": int(model["playlist_embeddings"].shape[1]),
        "dtype": str(model["playlist_embeddings"].dtype),
        "k": k,
        "job_size": job_size,
        "order": order,
        "jobs_per_repeat": jobs_per_repeat,
        "repeats": repeats,
        "threads": threads,
        "mean_candidates": nnz / max(1, n_users),
    }
    if compare:
        result["baselines"] = {
            name: _figures(times[name], job_size) for name in contenders if name != "ranker"
        }
    return result


def table(result: dict[str, Any]) -> str:
    """The figures of ``run`` as a text table, with the speed-ups over each baseline."""
    rows = [("ranker", result), *result.get("baselines", {}).items()]
    lines = [
        f"{result['source']}: {result['users']:,} users, {result['playlists']:,} playlists, "
        f"dim {result['dim']} {result['dtype']}, {result['mean_candidates']:.1f} candidates/user, "
        f"top {result['k']}, jobs of {result['job_size']} {result['order']} users, "
        f"{result['threads']} thread(s), "
        f"{result['repeats']} repeats",
        f"{'':16}{'users/s':>12}{'min':>12}{'max':>12}{'ms/1k p50':>11}{'ms/1k p99':>11}",
    ]
    for name, fig in rows:
        lines.append(
            f"{name:16}{fig['users_per_s']:>12,.0f}{fig['users_per_s_min']:>12,.0f}"
            f"{fig['users_per_s_max']:>12,.0f}{fig['ms_per_1000_users_p50']:>11.2f}"
            f"{fig['ms_per_1000_users_p99']:>11.2f}"
        )
    for name, fig in rows[1:]:
        speedup = result["users_per_s"] / fig["users_per_s"]
        lines.append(f"ranker speed-up over {name}: {speedup:.1f}x")
    return "\n".join(lines)
