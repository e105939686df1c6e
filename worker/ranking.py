"""Top-k ranking of each user's candidate playlists: a pure function of arrays.

``Ranker.rank`` takes a job of artifact user rows and returns, per user, the rows of the
``k`` candidates with the highest BPR score ``dot(user_emb, playlist_emb)``, best first,
ties broken by the lower playlist row. Unknown users (row -1) and users without
candidates get the fallback list and ``cold=True``. ``rank_reference`` is the plain
per-user numpy definition the tests compare against.

How a job is ranked: the job's user vectors are gathered once (float32, job order), then
one compiled loop (``worker.topk_kernel``) walks each user's slice of the candidate CSR
in place: it reads each candidate's playlist row straight from the (memory-mapped)
table, widens float16 in registers, takes the dot product and keeps the ``k`` best in a
small sorted array. Nothing per candidate is written to memory: the cost is reading the
candidate rows, which is why float16 tables (half the bytes) rank faster.

Scores are float32 sums in an order the compiler picks, so they may differ from the
float64 reference in the last float32 bits (and, for float16 tables, rows are the float16
values): candidates whose scores are that close may swap. Integer-valued embeddings score
exactly, and then the result equals the reference row for row.

Tables are used in place, never copied, so memory-mapped artifacts stay shared between
processes. ``rank`` keeps no state between calls (several threads may rank at once), and
the compiled loop releases the GIL. Embeddings are assumed to be free of NaN. Measured
figures are in docs/performance.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from recfleet.worker.topk_kernel import rank_users

if TYPE_CHECKING:
    from recfleet.shared.artifacts import Artifacts


@dataclass(frozen=True)
class RankResult:
    """Ranking of one job.

    playlists: int64 [n, k] playlist rows, best first, -1 where a user has fewer than k.
    cold: bool [n], True for unknown users and users without candidates (fallback list).
    n_candidates: int64 [n], candidates ranked per user (0 when cold).
    """

    playlists: np.ndarray
    cold: np.ndarray
    n_candidates: np.ndarray


def checked_rows(user_rows: np.ndarray, n_users: int) -> np.ndarray:
    """A job's user rows as int64, each -1 (unknown user) or a row below ``n_users``.

    Raises ValueError unless the rows are 1-d and in range.
    """
    rows = np.asarray(user_rows, dtype=np.int64)
    if rows.ndim != 1:
        raise ValueError(f"user rows must be 1-d, got shape {rows.shape}")
    if len(rows) and (int(rows.min()) < -1 or int(rows.max()) >= n_users):
        raise ValueError(f"user rows must be -1 or in 0..{n_users - 1}")
    return rows


class Ranker:
    """Ranks jobs of users against one model's embeddings and candidate lists.

    Arrays are used in place (no copy of the tables): user_embeddings [U, d] and
    playlist_embeddings [P, d] float32 or float16, C-contiguous; candidates_indptr int64
    [U + 1]; candidates_indices int [nnz] playlist rows; fallback int [F] playlist rows
    for cold users, best first. ``check`` scans candidates and fallback for rows out of
    range (an O(nnz) pass that ``shared.artifacts.load_artifacts`` already does).
    Construction compiles the ranking loop for these dtypes (cached on disk by numba).

    Raises ValueError for inconsistent shapes, dtypes, layouts or rows out of range.
    """

    def __init__(
        self,
        user_embeddings: np.ndarray,
        playlist_embeddings: np.ndarray,
        candidates_indptr: np.ndarray,
        candidates_indices: np.ndarray,
        fallback: np.ndarray,
        k: int = 10,
        *,
        check: bool = True,
    ) -> None:
        _check_inputs(
            user_embeddings,
            playlist_embeddings,
            candidates_indptr,
            candidates_indices,
            fallback,
            k,
            check,
        )
        self.k = k
        self.n_users, self.dim = user_embeddings.shape
        self._users = user_embeddings
        self._playlists = playlist_embeddings
        self._indptr = candidates_indptr
        self._indices = candidates_indices
        self._fallback = np.full(k, -1, dtype=np.int64)
        head = np.asarray(fallback[:k], dtype=np.int64)
        self._fallback[: len(head)] = head
        self.rank(np.zeros(0, dtype=np.int64))  # compile now, not on the first job

    @classmethod
    def from_artifacts(cls, art: Artifacts, k: int = 10) -> Ranker:
        """A Ranker over a loaded (already range-checked) artifact directory."""
        return cls(
            art.user_embeddings,
            art.playlist_embeddings,
            art.candidates_indptr,
            art.candidates_indices,
            art.fallback,
            k,
            check=False,
        )

    def rank(self, user_rows: np.ndarray) -> RankResult:
        """Rank a job of artifact user rows (-1 for unknown users); see RankResult.

        Raises ValueError unless user_rows is 1-d with every row -1 or a user row.
        """
        rows = checked_rows(user_rows, self.n_users)
        users = np.take(self._users, np.maximum(rows, 0), axis=0).astype(np.float32, copy=False)
        playlists = np.empty((len(rows), self.k), dtype=np.int64)
        counts = np.empty(len(rows), dtype=np.int64)
        rank_users(users, self._playlists, self._indptr, self._indices, rows, playlists, counts)
        cold = counts == 0
        playlists[cold] = self._fallback
        return RankResult(playlists=playlists, cold=cold, n_candidates=counts)


def _check_inputs(
    users: np.ndarray,
    playlists: np.ndarray,
    indptr: np.ndarray,
    indices: np.ndarray,
    fallback: np.ndarray,
    k: int,
    check: bool,
) -> None:
    """Raise ValueError unless the arrays form a consistent, usable model."""
    for name, emb in (("user_embeddings", users), ("playlist_embeddings", playlists)):
        if emb.ndim != 2 or emb.dtype not in (np.float32, np.float16):
            raise ValueError(f"{name}: want a 2-d float32 or float16 array, got {emb.dtype}")
        if not emb.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (copying it would cost memory)")
    if users.shape[1] != playlists.shape[1]:
        raise ValueError(f"embedding dims differ: {users.shape[1]} vs {playlists.shape[1]}")
    if indptr.dtype != np.int64 or indptr.shape != (users.shape[0] + 1,):
        raise ValueError(f"candidates_indptr: want int64 [{users.shape[0] + 1}]")
    if indices.ndim != 1 or indices.dtype.kind not in "iu" or len(indices) != int(indptr[-1]):
        raise ValueError(f"candidates_indices: want 1-d integer [{int(indptr[-1])}]")
    if fallback.ndim != 1 or fallback.dtype.kind not in "iu" or len(fallback) == 0:
        raise ValueError("fallback: want a non-empty 1-d integer array")
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    if check:
        for name, arr in (("candidates_indices", indices), ("fallback", fallback)):
            if len(arr) and (int(arr.min()) < 0 or int(arr.max()) >= playlists.shape[0]):
                raise ValueError(f"{name}: playlist row out of range 0..{playlists.shape[0] - 1}")
        if int(indptr[0]) != 0 or bool(np.any(np.diff(indptr) < 0)):
            raise ValueError("candidates_indptr must start at 0 and never decrease")


def rank_reference(
    user_embeddings: np.ndarray,
    playlist_embeddings: np.ndarray,
    candidates_indptr: np.ndarray,
    candidates_indices: np.ndarray,
    fallback: np.ndarray,
    user_rows: np.ndarray,
    k: int = 10,
) -> RankResult:
    """Plain per-user ranking in float64, the definition ``Ranker.rank`` must match."""
    rows = np.asarray(user_rows, dtype=np.int64).reshape(-1)
    playlists = np.full((len(rows), k), -1, dtype=np.int64)
    cold = np.zeros(len(rows), dtype=bool)
    n_candidates = np.zeros(len(rows), dtype=np.int64)
    for i, row in enumerate(rows.tolist()):
        if row >= 0:
            cands = candidates_indices[candidates_indptr[row] : candidates_indptr[row + 1]]
            n_candidates[i] = len(cands)
        if row < 0 or n_candidates[i] == 0:
            cold[i] = True
            head = fallback[:k]
            playlists[i, : len(head)] = head
            continue
        user = user_embeddings[row].astype(np.float64)
        scores = playlist_embeddings[cands].astype(np.float64) @ user
        order = np.lexsort((cands, -scores))[:k]  # score descending, then lower row
        playlists[i, : len(order)] = cands[order]
    return RankResult(playlists=playlists, cold=cold, n_candidates=n_candidates)
