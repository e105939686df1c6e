"""Candidate lists: the playlists a user's neighbours have, as CSR arrays.

Candidates of a user are the playlists their neighbours have, minus the ones the user
already has (held-out positives stay reachable because training rows never contain them),
ranked by how many neighbours have them, ties broken by popularity, at most
``max_candidates``. Rows shorter than ``min_candidates`` are padded with the most popular
playlists the user has not seen; only a catalogue too small for that adds seen ones.
The votes are one sparse product per block of users (adjacency × interactions), and the
per-row top-``max_candidates`` one sort of packed int64 keys: no per-user Python loop.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp

logger = logging.getLogger("offline")


def popularity_rank(popularity: np.ndarray) -> np.ndarray:
    """Playlist rows, most popular first; ties by row, so the order is deterministic."""
    return np.argsort(-popularity, kind="stable")


def _chunk_candidates(
    matrix: sp.csr_matrix,
    neighbours: np.ndarray,
    first_row: int,
    by_rank: np.ndarray,
    rank_of: np.ndarray,
    max_candidates: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate lengths and rows for users ``first_row ..`` (one block of neighbours)."""
    n_rows, k = neighbours.shape
    own = np.arange(first_row, first_row + n_rows, dtype=np.int64)
    valid = neighbours >= 0
    # Votes from neighbours; the user's own row with weight -(k+1) makes seen playlists negative.
    cols = np.concatenate([neighbours[valid].astype(np.int64), own])
    rows = np.concatenate([np.nonzero(valid)[0], np.arange(n_rows)])
    vals = np.concatenate([np.ones(int(valid.sum()), np.float32), np.full(n_rows, -k - 1.0)])
    adjacency = sp.csr_matrix((vals, (rows, cols)), shape=(n_rows, matrix.shape[0]))
    votes = (adjacency @ matrix).tocoo()
    keep = votes.data > 0
    row, col = votes.row[keep].astype(np.int64), votes.col[keep]
    vote = votes.data[keep].astype(np.int64)
    # One int64 sort key: row, then more votes first, then more popular first.
    rank_bits = max(1, int(len(by_rank) - 1).bit_length())
    vote_bits = int(k + 1).bit_length()
    key = (row << (rank_bits + vote_bits)) | ((k - vote) << rank_bits) | rank_of[col]
    key.sort()
    row = key >> (rank_bits + vote_bits)
    starts = np.searchsorted(row, np.arange(n_rows))
    within = np.arange(len(key)) - starts[row]
    chosen = within < max_candidates
    lengths = np.bincount(row[chosen], minlength=n_rows)
    return lengths, by_rank[key[chosen] & ((1 << rank_bits) - 1)].astype(np.int32)


def _pad_short_rows(
    indptr: np.ndarray, indices: np.ndarray, matrix: sp.csr_matrix, by_rank: np.ndarray, want: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pad rows shorter than ``want`` with popular playlists, unseen ones first."""
    short = np.flatnonzero(np.diff(indptr) < min(want, len(by_rank)))
    if len(short) == 0:
        return indptr, indices
    rows = np.split(indices, indptr[1:-1])
    for user in short:
        have = rows[user].tolist()
        seen = set(matrix.indices[matrix.indptr[user] : matrix.indptr[user + 1]].tolist())
        head = by_rank[: want + len(have) + len(seen)].tolist()
        extra = [p for p in head if p not in seen and p not in have]
        if len(have) + len(extra) < want:  # tiny catalogue: only seen playlists are left
            extra += [p for p in by_rank.tolist() if p in seen and p not in have]
        rows[user] = np.asarray(have + extra[: want - len(have)], dtype=np.int32)
    logger.info("pairing: padded %d of %d users from popularity", len(short), len(rows))
    new_indptr = np.zeros(len(indptr), dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=new_indptr[1:])
    return new_indptr, np.concatenate(rows)


def build_candidates(
    matrix: sp.csr_matrix,
    neighbours: np.ndarray,
    popularity: np.ndarray,
    *,
    min_candidates: int = 20,
    max_candidates: int = 100,
    block: int = 8192,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr int64, indices int32) of candidate playlist rows for every user row.

    Blocks of users run on ``threads`` threads (scipy's sparse product releases the GIL).
    """
    by_rank = popularity_rank(popularity)
    rank_of = np.empty(len(by_rank), dtype=np.int64)
    rank_of[by_rank] = np.arange(len(by_rank))
    matrix = matrix.astype(np.float32)

    def block_at(start: int) -> tuple[np.ndarray, np.ndarray]:
        block_nb = neighbours[start : start + block]
        return _chunk_candidates(matrix, block_nb, start, by_rank, rank_of, max_candidates)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        parts = list(pool.map(block_at, range(0, matrix.shape[0], block)))
    indptr = np.zeros(matrix.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.concatenate([p[0] for p in parts]), out=indptr[1:])
    indices = np.concatenate([p[1] for p in parts])
    return _pad_short_rows(indptr, indices, matrix, by_rank, min_candidates)
