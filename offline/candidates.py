"""Candidate lists: the playlists a user's neighbours have, as CSR arrays.

Candidates of a user are the playlists their neighbours have, minus the ones the user
already has (held-out positives stay reachable because training rows never contain them),
ranked by how many neighbours have them, ties broken by popularity, at most
``max_candidates``. Rows shorter than ``min_candidates`` are padded with the most popular
playlists the user has not seen; only a catalogue too small for that adds seen ones.
The votes are counted by a compiled loop, user by user, in a dense counter per block of
users (only the touched entries are read back and reset); the best ``max_candidates``
are selected by packed int64 keys (votes, then popularity rank), partitioned then sorted.
Blocks of users run in parallel and write their own users' rows only.
"""

from __future__ import annotations

import logging

import numba
import numpy as np
import scipy.sparse as sp

from recfleet.offline import numba_threads

logger = logging.getLogger("offline")


def popularity_rank(popularity: np.ndarray) -> np.ndarray:
    """Playlist rows, most popular first; ties by row, so the order is deterministic."""
    return np.argsort(-popularity, kind="stable")


@numba.njit(cache=True, nogil=True, parallel=True, boundscheck=False)
def _top_voted(
    indptr, indices, neighbours, rank_of, rank_bits, max_candidates, block, out, lengths
):
    n_users, k = neighbours.shape
    n_playlists = len(rank_of)
    mask = (1 << rank_bits) - 1
    for b in numba.prange((n_users + block - 1) // block):
        votes = np.zeros(n_playlists, np.int64)
        touched = np.empty(n_playlists, np.int64)
        keys = np.empty(n_playlists, np.int64)
        for user in range(b * block, min((b + 1) * block, n_users)):
            count = 0
            for j in range(k):
                neighbour = neighbours[user, j]
                if neighbour < 0:
                    continue
                for c in range(indptr[neighbour], indptr[neighbour + 1]):
                    playlist = indices[c]
                    if votes[playlist] == 0:
                        touched[count] = playlist
                        count += 1
                    votes[playlist] += 1
            for c in range(indptr[user], indptr[user + 1]):  # seen: below zero
                playlist = indices[c]
                if votes[playlist] == 0:
                    touched[count] = playlist
                    count += 1
                votes[playlist] -= k + 1
            kept = 0
            for t in range(count):
                playlist = touched[t]
                if votes[playlist] > 0:  # more votes first, then more popular first
                    keys[kept] = ((k - votes[playlist]) << rank_bits) | rank_of[playlist]
                    kept += 1
                votes[playlist] = 0
            best = keys[:kept]
            if kept > max_candidates:
                best = np.partition(best, max_candidates - 1)[:max_candidates]
            best = np.sort(best)
            for t in range(len(best)):
                out[user, t] = best[t] & mask
            lengths[user] = len(best)


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
    block: int = 1024,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr int64, indices int32) of candidate playlist rows for every user row.

    ``matrix`` is binary (users × playlists); ``neighbours`` int [users, k], -1 pads.
    Blocks of ``block`` users run on ``threads`` threads; the result is the same for any.
    """
    by_rank = popularity_rank(popularity)
    rank_of = np.empty(len(by_rank), dtype=np.int64)
    rank_of[by_rank] = np.arange(len(by_rank))
    n_users = matrix.shape[0]
    top = np.empty((n_users, max_candidates), dtype=np.int64)
    lengths = np.empty(n_users, dtype=np.int64)
    with numba_threads.using(threads):
        _top_voted(
            matrix.indptr.astype(np.int64),
            matrix.indices.astype(np.int64),
            np.ascontiguousarray(neighbours),
            rank_of,
            max(1, int(len(by_rank) - 1).bit_length()),
            max_candidates,
            block,
            top,
            lengths,
        )
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    ranks = top[np.arange(max_candidates)[None, :] < lengths[:, None]]
    return _pad_short_rows(indptr, by_rank[ranks].astype(np.int32), matrix, by_rank, min_candidates)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _drop_one_per_row(indptr, indices, drop, out_indptr, out_indices):
    kept = 0
    for row in range(len(indptr) - 1):
        for c in range(indptr[row], indptr[row + 1]):
            if indices[c] != drop[row]:
                out_indices[kept] = indices[c]
                kept += 1
        out_indptr[row + 1] = kept
    return kept


def drop_user_playlists(
    indptr: np.ndarray,
    indices: np.ndarray,
    playlist_of_user: np.ndarray,
    matrix: sp.csr_matrix,
    popularity: np.ndarray,
    min_candidates: int = 20,
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate CSR without ``playlist_of_user[user]`` in each row (-1: none), re-padded.

    For lists built from a matrix that lacked one interaction per user (the validation
    split): that playlist is the user's own and must not be shipped as a candidate.
    ``matrix`` is the full training matrix; rows left shorter than ``min_candidates`` are
    padded with popular playlists it does not hold for the user, as ``build_candidates``
    pads. The order of the remaining candidates is kept.
    """
    new_indptr = np.zeros(len(indptr), dtype=np.int64)
    new_indices = np.empty(len(indices), dtype=np.int32)
    kept = _drop_one_per_row(
        indptr.astype(np.int64),
        indices.astype(np.int32),
        playlist_of_user.astype(np.int32),
        new_indptr,
        new_indices,
    )
    by_rank = popularity_rank(popularity)
    return _pad_short_rows(new_indptr, new_indices[:kept], matrix, by_rank, min_candidates)
