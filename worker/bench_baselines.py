"""Baselines the ranking benchmark times beside ``Ranker`` in the same run.

``BlockedRanker`` is the previous kernel, kept so that a change to ``Ranker`` is always
measured against it. How it ranks a job (no per-user Python loop):

1. Cut: the job's candidate lists become one flat int32 array of real candidates (no
   padding) with a few vectorised numpy ops (``np.repeat`` of per-user offsets).
2. Score, a block of ~8k candidates (~130 users) at a time: ``index_select(out=)``
   gathers the block's playlist rows into a reused buffer (float16 tables are then
   widened into a reused float32 buffer), and ONE ``torch.sparse.sampled_addmm`` (SDDMM)
   computes every candidate's dot with its own user: CSR pattern = the block's users ×
   their gathered rows, so the repeated user vectors are never materialised.
3. Select: score and row become one int64 key (order-preserving float bits high,
   ``2**31 - 1 - row`` low), so "score descending, then lower row" is integer order and
   ties are deterministic. Keys go into a padded ``[n, max_candidates]`` matrix; the top
   ``k`` come from ``np.partition`` plus a sort of the ``k`` survivors.

``per_user_loop`` and ``padded_bmm`` are the two obvious ways to write the ranking in
torch.
"""

from __future__ import annotations

import itertools
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from recfleet.worker.ranking import Ranker, RankResult, checked_rows

_PAD_KEY = np.iinfo(np.int64).min
_LOW_MAX = 2**31 - 1  # low key half: _LOW_MAX - row, so a lower row sorts higher
_LOW_MASK = 0xFFFFFFFF
_BLOCK = 8192  # candidates gathered per block: 4 MB of float32 rows at dim 128


@dataclass(frozen=True)
class _JobCandidates:
    table_rows: np.ndarray  # int64 [n] user rows, unknown users clamped to 0
    counts: np.ndarray  # int64 [n]
    indptr: np.ndarray  # int64 [n + 1] job-local CSR pointers
    rows: np.ndarray  # int32 [nnz] candidate playlist rows, in job order

    @property
    def total(self) -> int:
        return int(self.indptr[-1])


def _spread(job_indptr: np.ndarray, counts: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Flat positions: base[user] + the candidate's index within its user, for every candidate."""
    out = np.repeat(base - job_indptr[:-1], counts)
    out += np.arange(job_indptr[-1], dtype=np.int64)
    return out


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """Wrap an array without copying; read-only arrays are fine because nothing writes."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _sparse_csr(crow: torch.Tensor, col: torch.Tensor, n_cols: int) -> torch.Tensor:
    """A CSR pattern with zero values (SDDMM computes alpha*dot + beta*value)."""
    values = torch.zeros(col.shape[0], dtype=torch.float32)
    size = (crow.shape[0] - 1, n_cols)
    return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def _acknowledge_sparse_beta() -> None:
    """Consume torch's once-per-process "sparse CSR is in beta" warning at start-up."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        _sparse_csr(torch.zeros(2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), 1)


def _cut_candidates(
    indptr: np.ndarray, indices: np.ndarray, user_rows: np.ndarray
) -> _JobCandidates:
    """The job's candidate lists as one flat array, in job order, without padding."""
    known = user_rows >= 0
    table_rows = np.where(known, user_rows, 0)
    starts = indptr[table_rows]
    counts = np.where(known, indptr[table_rows + 1] - starts, 0)
    job_indptr = np.zeros(len(user_rows) + 1, dtype=np.int64)
    np.cumsum(counts, out=job_indptr[1:])
    rows = np.take(indices, _spread(job_indptr, counts, starts)).astype(np.int32, copy=False)
    return _JobCandidates(table_rows, counts, job_indptr, rows)


def _user_blocks(job_indptr: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive user ranges [first, last) of about ``budget`` candidates each."""
    targets = np.arange(0, int(job_indptr[-1]), budget, dtype=np.int64)
    starts = np.unique(np.searchsorted(job_indptr, targets, side="right") - 1).tolist()
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    return list(itertools.pairwise([*starts, len(job_indptr) - 1]))


def _sort_keys(scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """int64 keys whose integer order is score descending, then playlist row ascending."""
    bits = (scores + np.float32(0.0)).view(np.int32)  # + 0.0 turns -0.0 into +0.0
    bits ^= (bits >> 31) & 0x7FFFFFFF  # negative floats: reverse, so int order = float order
    keys = bits.astype(np.int64) << 32
    keys += _LOW_MAX - rows
    return keys


def _top_rows(keys: np.ndarray, job: _JobCandidates, k: int) -> np.ndarray:
    """Rows of the k largest keys per user, best first, -1 padded: int64 [n, k]."""
    n = len(job.counts)
    width = max(k, int(job.counts.max()))
    padded = np.full((n, width), _PAD_KEY, dtype=np.int64)
    padded.ravel()[_spread(job.indptr, job.counts, np.arange(n, dtype=np.int64) * width)] = keys
    top = np.partition(padded, width - k, axis=1)[:, width - k :]
    top.sort(axis=1)
    top = top[:, ::-1]
    return np.where(top == _PAD_KEY, -1, _LOW_MAX - (top & _LOW_MASK))


class BlockedRanker(Ranker):
    """The previous kernel (see the module docstring); same arguments as ``Ranker``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()  # guards the reused buffers below
        self._users_t = _as_tensor(self._users)
        self._playlists_t = _as_tensor(self._playlists)
        self._gathered = torch.empty(0, self.dim, dtype=self._playlists_t.dtype)
        self._widened = torch.empty(0, self.dim, dtype=torch.float32)
        self._arange = torch.empty(0, dtype=torch.int32)
        _acknowledge_sparse_beta()

    def rank(self, user_rows: np.ndarray) -> RankResult:
        """Rank a job of artifact user rows (-1 for unknown users); see RankResult.

        Raises ValueError unless user_rows is 1-d with every row -1 or a user row.
        """
        rows = checked_rows(user_rows, self.n_users)
        job = _cut_candidates(self._indptr, self._indices, rows)
        playlists = np.empty((len(rows), self.k), dtype=np.int64)
        if job.total:
            with self._lock:
                scores = self._score(job)
            playlists = _top_rows(_sort_keys(scores, job.rows), job, self.k)
        cold = job.counts == 0
        playlists[cold] = self._fallback
        return RankResult(playlists=playlists, cold=cold, n_candidates=job.counts)

    def _score(self, job: _JobCandidates) -> np.ndarray:
        """float32 [nnz] score of every candidate, in job order, a block of users at a time."""
        # index_select copies whole rows; advanced indexing goes element by element (6x slower)
        users = torch.index_select(self._users_t, 0, torch.from_numpy(job.table_rows)).float()
        rows = torch.from_numpy(job.rows)
        scores = np.empty(job.total, dtype=np.float32)
        for first, last in _user_blocks(job.indptr, _BLOCK):
            begin, end = int(job.indptr[first]), int(job.indptr[last])
            if end == begin:
                continue
            gathered = self._gather(rows[begin:end])
            crow = torch.from_numpy((job.indptr[first : last + 1] - begin).astype(np.int32))
            pattern = _sparse_csr(crow, self._arange[: end - begin], end - begin)
            product = torch.sparse.sampled_addmm(pattern, users[first:last], gathered.t(), beta=0.0)
            scores[begin:end] = product.values().numpy()
        return scores

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 [len(rows), d] playlist embeddings, in reused buffers grown on demand."""
        size = rows.shape[0]
        if self._gathered.shape[0] < size:
            capacity = max(size, _BLOCK + _BLOCK // 2)
            self._gathered = torch.empty(capacity, self.dim, dtype=self._playlists_t.dtype)
            if self._playlists_t.dtype != torch.float32:
                self._widened = torch.empty(capacity, self.dim, dtype=torch.float32)
            self._arange = torch.arange(capacity, dtype=torch.int32)
        gathered = torch.index_select(self._playlists_t, 0, rows, out=self._gathered[:size])
        if gathered.dtype == torch.float32:
            return gathered
        return self._widened[:size].copy_(gathered)


def per_user_loop(model: dict[str, np.ndarray], k: int) -> Callable[[np.ndarray], Any]:
    """Flatten each user's candidates, score them, torch.topk, one user at a time."""
    users = torch.from_numpy(model["user_embeddings"])
    table = torch.from_numpy(model["playlist_embeddings"])
    indptr, indices = model["candidates_indptr"], model["candidates_indices"]

    def rank(rows: np.ndarray) -> list[torch.Tensor]:
        out = []
        for row in rows.tolist():
            cands = torch.from_numpy(indices[indptr[row] : indptr[row + 1]].astype(np.int64))
            scores = table[cands].float() @ users[row].float()
            top = torch.topk(scores, min(k, len(cands))).indices
            out.append(cands[top])
        return out

    return rank


def padded_bmm(model: dict[str, np.ndarray], k: int) -> Callable[[np.ndarray], Any]:
    """Gather a padded [n, max_candidates, dim] tensor, bmm, mask, one topk."""
    users = torch.from_numpy(model["user_embeddings"])
    table = torch.from_numpy(model["playlist_embeddings"])
    indptr, indices = model["candidates_indptr"], model["candidates_indices"]

    def rank(rows: np.ndarray) -> torch.Tensor:
        starts, counts = indptr[rows], indptr[rows + 1] - indptr[rows]
        width = int(counts.max())
        offsets = np.arange(width)
        valid = offsets[None, :] < counts[:, None]
        padded = np.where(valid, indices[np.where(valid, starts[:, None] + offsets, 0)], 0)
        cands = torch.from_numpy(padded.astype(np.int64))
        scores = torch.bmm(table[cands].float(), users[rows].float().unsqueeze(2)).squeeze(2)
        scores.masked_fill_(torch.from_numpy(~valid), float("-inf"))
        return cands.gather(1, scores.topk(min(k, width), dim=1).indices)

    return rank
