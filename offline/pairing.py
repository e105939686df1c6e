"""User pairing: cosine kNN between users, then each user's candidate playlists.

Exact cosine kNN over the sparse user×playlist matrix costs the sum over playlists of
their squared user counts — about 10^10 multiply-adds for 200 000 users with power-law
popularity, and 25 times that for a million — so it is approximated in two steps:

1. Each user row of the IDF-weighted, L2-normalised matrix is projected onto its top
   ``rank`` singular vectors (randomized SVD). Cosine in that space tracks cosine of the
   sparse rows while smoothing the one-or-two-playlist overlaps that make raw kNN noisy;
   on the synthetic data it finds candidate lists with a higher hit rate than exact kNN.
2. An inverted-file index: spherical k-means splits users into cells of about
   ``cell_size``; the users of each cell are compared (dense matmul) with the users of the
   cells nearest to its centroid, as many as it takes to reach ``pool_size`` users. Dense
   regions of taste make cells ten times the median size, so oversized cells are split
   again. With one cell the search is exact.

Candidate lists are built from the neighbours by ``offline.candidates``.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.utils.extmath import randomized_svd

from recfleet.offline.candidates import build_candidates

logger = logging.getLogger("offline")


@dataclass(frozen=True)
class PairingConfig:
    """kNN and candidate-list parameters."""

    rank: int = 32
    neighbours: int = 50
    cell_size: int = 1000
    pool_size: int = 2000
    min_candidates: int = 20
    max_candidates: int = 100


def user_embeddings(matrix: sp.csr_matrix, rank: int, seed: int) -> np.ndarray:
    """Unit-length float32 rows approximating cosine geometry of the IDF-weighted rows.

    Users without interactions get a zero row. Raises ValueError for an empty matrix.
    """
    n_users, n_playlists = matrix.shape
    if n_users == 0 or n_playlists == 0:
        raise ValueError("cannot embed an empty interaction matrix")
    counts = np.bincount(matrix.indices, minlength=n_playlists)
    idf = np.log((n_users + 1.0) / (counts + 1.0)).astype(np.float32)
    weighted = matrix @ sp.diags(idf)
    norms = np.sqrt(np.asarray(weighted.multiply(weighted).sum(axis=1)).ravel())
    weighted = sp.diags(1.0 / np.maximum(norms, 1e-12)) @ weighted
    rank = max(1, min(rank, n_users - 1, n_playlists - 1))
    left, singular, _ = randomized_svd(
        weighted.astype(np.float32), rank, n_iter=4, random_state=seed
    )
    emb = (left * singular).astype(np.float32)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb


def spherical_kmeans(
    emb: torch.Tensor, n_cells: int, seed: int, iterations: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids (unit rows) fitted on a sample, and every row's cell."""
    gen = torch.Generator().manual_seed(seed)
    n = emb.shape[0]
    sample = emb[torch.randperm(n, generator=gen)[: min(n, 64 * n_cells)]]
    centroids = sample[:n_cells].clone()
    for _ in range(iterations):
        cell = (sample @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, cell, sample)
        empty = torch.bincount(cell, minlength=n_cells) == 0
        sums[empty] = centroids[empty]  # an empty cell keeps its old centroid
        centroids = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cells = torch.cat([(part @ centroids.T).argmax(dim=1) for part in emb.split(65536)])
    return centroids, cells


def _neighbours_in_pool(
    emb: torch.Tensor, members: torch.Tensor, pool: torch.Tensor, k: int
) -> np.ndarray:
    """Top-k pool rows by cosine for each member, never the member itself; -1 pads.

    ``pool`` must start with ``members`` (in order): that locates each member's own entry.
    """
    out = np.full((len(members), k), -1, dtype=np.int32)
    take = min(k, len(pool) - 1)
    if take <= 0:
        return out
    pool_emb = emb[pool].T.contiguous()
    pool_np = pool.numpy()
    step = max(1, (1 << 23) // len(pool))  # bound the similarity block to ~32 MB
    for begin in range(0, len(members), step):
        rows = members[begin : begin + step]
        sim = (emb[rows] @ pool_emb).numpy()
        own = np.arange(len(rows))
        sim[own, begin + own] = -np.inf
        # argpartition: unordered top-k, several times faster than torch.topk on CPU.
        best = np.argpartition(sim, len(pool) - take, axis=1)[:, len(pool) - take :]
        out[begin : begin + len(rows), :take] = pool_np[best]
    return out


def balanced_cells(
    emb: torch.Tensor, cell_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means into about ``n / cell_size`` cells, oversized cells split again.

    Users are not spread evenly (dense regions of taste make cells ten times the median),
    and a cell's search cost grows with its size squared.
    """
    n_cells = max(1, emb.shape[0] // cell_size)
    centroids, cells = spherical_kmeans(emb, n_cells, seed)
    sizes = torch.bincount(cells, minlength=n_cells)
    parts, labels, next_label = [centroids], cells.clone(), n_cells
    for cell in torch.nonzero(sizes * 2 > 3 * cell_size).flatten().tolist():
        members = torch.nonzero(cells == cell).flatten()
        n_sub = int(sizes[cell]) // cell_size
        sub_centroids, sub_cells = spherical_kmeans(emb[members], n_sub, seed + cell)
        parts.append(sub_centroids[1:])
        # Sub-cell 0 keeps the old label (its centroid is replaced), the rest get new ones.
        parts[0][cell] = sub_centroids[0]
        labels[members] = torch.where(sub_cells == 0, cell, sub_cells - 1 + next_label)
        next_label += n_sub - 1
    return torch.cat(parts), labels


def _probe_lists(centroids: torch.Tensor, sizes: torch.Tensor, pool_size: int) -> list[list[int]]:
    """For each cell, the nearest cells (itself first) until they hold ``pool_size`` users."""
    n_cells = len(centroids)
    nearest = (centroids @ centroids.T).topk(min(n_cells, 64), dim=1).indices
    covered = sizes[nearest].cumsum(dim=1)
    # Number of cells to take: up to and including the first that reaches pool_size.
    take = ((covered < pool_size).sum(dim=1) + 1).clamp_max(nearest.shape[1])
    return [row[:n].tolist() for row, n in zip(nearest, take.tolist(), strict=True)]


def nearest_neighbours(
    emb: np.ndarray,
    k: int,
    seed: int,
    *,
    cell_size: int = 1000,
    pool_size: int = 2000,
    threads: int = 1,
) -> np.ndarray:
    """int32 [n_users, k] neighbour rows by cosine of ``emb`` (IVF search); -1 pads.

    Cells are searched on ``threads`` threads (torch's product and numpy's partition
    release the GIL); each cell writes its own users' rows, so the result is the same.
    """
    emb_t = torch.from_numpy(emb)
    n_users = emb.shape[0]
    centroids, cells = balanced_cells(emb_t, cell_size, seed)
    sizes = torch.bincount(cells, minlength=len(centroids))
    order = torch.argsort(cells, stable=True)
    bounds = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]).tolist()
    members_of = [order[bounds[c] : bounds[c + 1]] for c in range(len(centroids))]
    result = np.full((n_users, k), -1, dtype=np.int32)

    def search(cell: int, probes: list[int]) -> None:
        if len(members_of[cell]) == 0:
            return
        others = [members_of[p] for p in probes if p != cell]
        pool = torch.cat([members_of[cell], *others])
        result[members_of[cell].numpy()] = _neighbours_in_pool(emb_t, members_of[cell], pool, k)

    probe_lists = _probe_lists(centroids, sizes, pool_size)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(search, range(len(probe_lists)), probe_lists))
    return result


@dataclass(frozen=True)
class Pairing:
    """Each user's neighbours (int32 [n_users, k], -1 pads), the candidate CSR built from
    their playlists, and the seconds of each step."""

    neighbours: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    timings: dict[str, float]


def pair_users(
    matrix: sp.csr_matrix, popularity: np.ndarray, seed: int, config: PairingConfig, threads: int
) -> Pairing:
    """Neighbours and candidate lists for every user row of ``matrix``.

    Raises ValueError for an empty matrix.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal start
        timings[name] = time.perf_counter() - start
        start = time.perf_counter()

    emb = user_embeddings(matrix, config.rank, seed)
    lap("pairing_svd")
    neighbours = nearest_neighbours(
        emb,
        config.neighbours,
        seed,
        cell_size=config.cell_size,
        pool_size=config.pool_size,
        threads=threads,
    )
    lap("pairing_knn")
    indptr, indices = candidates_of(matrix, neighbours, popularity, config, threads)
    lap("pairing_candidates")
    return Pairing(neighbours, indptr, indices, timings)


def candidates_of(
    matrix: sp.csr_matrix,
    neighbours: np.ndarray,
    popularity: np.ndarray,
    config: PairingConfig,
    threads: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The candidate CSR of ``matrix``'s users from their ``neighbours``' playlists in it
    (``build_candidates`` with the configured list lengths)."""
    return build_candidates(
        matrix,
        neighbours,
        popularity,
        min_candidates=config.min_candidates,
        max_candidates=config.max_candidates,
        threads=threads,
    )
