"""Top-k ranking of each user's candidate playlists: a pure function of arrays.

``Ranker.rank`` takes a job of artifact user rows and returns, per user, the rows of the
``k`` candidates with the highest BPR score ``dot(user_emb, playlist_emb)``, best first,
ties broken by the lower playlist row. Unknown users (row -1) and users without
candidates get the fallback list and ``cold=True``. ``rank_reference`` is the plain
per-user numpy definition the tests compare against.

How a job is ranked (no per-user Python loop):

1. Cut: the job's candidate lists become one flat int32 array of real candidates (no
   padding) with a few vectorised numpy ops (``np.repeat`` of per-user offsets).
2. Score, a block of ~8k candidates (~130 users) at a time: ``index_select(out=)``
   gathers the block's playlist rows into a reused buffer (float16 tables are then
   widened into a reused float32 buffer), and ONE ``torch.sparse.sampled_addmm`` (SDDMM)
   computes every candidate's dot with its own user: CSR pattern = the block's users ×
   their gathered rows, so the kernel is a fused, vectorised row-wise dot product and the
   repeated user vectors are never materialised. The block stays in cache between the
   two passes.
3. Select: score and row become one int64 key (order-preserving float bits high,
   ``2**31 - 1 - row`` low), so "score descending, then lower row" is integer order and
   ties are deterministic. Keys go into a padded ``[n, max_candidates]`` matrix; the top
   ``k`` come from ``np.partition`` plus a sort of the ``k`` survivors; rows are decoded
   from the keys.

Figures: one torch thread, a 2-core AMD EPYC (Zen 4) VM shared with other jobs, 1M
users, jobs of 1000, 20–100 candidates per user (mean 60), dim 128, top 10; median
users/s of 7 repeats of 40 jobs, low–high over two separate runs of
``python -m recfleet.worker.bench_rank --playlists P --distribution D --compare`` (Zipf-like
exponent 0.9, popular rows scattered over the table):

==============================  ============  ==========  ===========  ==========
users/s                         uniform 100k  zipf 100k   uniform 1M   zipf 1M
==============================  ============  ==========  ===========  ==========
Ranker, float32 tables          267–278k      288–328k    252–266k     274–288k
Ranker, float16 tables                                    240–290k     316–321k
per-user loop (baseline)        46–49k        49–63k      40–42k       48–52k
padded bmm (baseline)           24k           23–27k      22k          23–25k
==============================  ============  ==========  ===========  ==========

The same on a memory-mapped artifact directory (zipf, 1M × 1M, float32): 272k.

Tried and dropped (measured side by side in one process, float32, 1M playlists):
SDDMM straight over the whole table (no gather; its fused loop keeps fewer cache misses
in flight than index_select's row copies): 226k uniform / 262k zipf against 249k / 267k
blocked, though it wins on small or very skewed tables (321k vs 289k at 100k zipf).
Block sizes 1k/2k/4k/8k/16k/whole job: 195k/222k/240k/249k/251k/216k (uniform).
Gather then ``(C * U_rep).sum(-1)``: ~33k (two passes over 30 MB). Users bucketed by
candidate count + one ``bmm`` per bucket: the bmm alone costs 4.8 ms per job (batched
GEMV); float16/bfloat16 bmm are slower still. ``torch.compile`` (inductor works here):
10.7 s to compile, and its fused gather-dot takes 6.0 ms per 60k candidates against
3.1 ms for ``index_select`` alone. ``torch.topk`` on ``[1000, 100]``: ~650 µs (a heap
per row) against ~100 µs for ``np.partition`` + sort. ``users[rows]`` (advanced
indexing): 220 µs against 36 µs for ``index_select``.

Where the time goes (float32, uniform 1M, ~3.8 ms per job): ~2.4 ms gathering 60k
random 512-byte rows (DRAM-bound: float16 halves it), 0.45 ms SDDMM, 0.3 ms cut (mostly
cache misses on the candidate lists), 0.3 ms keys and selection, 0.2 ms the rest.

Tables are wrapped with ``torch.from_numpy``, never copied, so memory-mapped artifacts
stay shared between processes. The reused gather buffers make ``rank`` take a lock: one
Ranker ranks one job at a time. Embeddings are assumed to be free of NaN.
"""

from __future__ import annotations

import itertools
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from recfleet.shared.artifacts import Artifacts

_PAD_KEY = np.iinfo(np.int64).min
_LOW_MAX = 2**31 - 1  # low key half: _LOW_MAX - row, so a lower row sorts higher
_LOW_MASK = 0xFFFFFFFF
_BLOCK = 8192  # candidates gathered per block: 4 MB of float32 rows at dim 128


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


class Ranker:
    """Ranks jobs of users against one model's embeddings and candidate lists.

    Arrays are used in place (no copy of the tables): user_embeddings [U, d] and
    playlist_embeddings [P, d] float32 or float16, C-contiguous; candidates_indptr int64
    [U + 1]; candidates_indices int [nnz] playlist rows; fallback int [F] playlist rows
    for cold users, best first. ``check`` scans candidates and fallback for rows out of
    range (an O(nnz) pass that ``shared.artifacts.load_artifacts`` already does).

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
        self._users = _as_tensor(user_embeddings)
        self._playlists = _as_tensor(playlist_embeddings)
        self._indptr = candidates_indptr
        self._indices = candidates_indices
        self._fallback = np.full(k, -1, dtype=np.int64)
        head = np.asarray(fallback[:k], dtype=np.int64)
        self._fallback[: len(head)] = head
        self._lock = threading.Lock()  # guards the reused buffers below
        self._gathered = torch.empty(0, self.dim, dtype=self._playlists.dtype)
        self._widened = torch.empty(0, self.dim, dtype=torch.float32)
        self._arange = torch.empty(0, dtype=torch.int32)
        _acknowledge_sparse_beta()

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
        rows = np.asarray(user_rows, dtype=np.int64)
        if rows.ndim != 1:
            raise ValueError(f"user rows must be 1-d, got shape {rows.shape}")
        if len(rows) and (int(rows.min()) < -1 or int(rows.max()) >= self.n_users):
            raise ValueError(f"user rows must be -1 or in 0..{self.n_users - 1}")
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
        users = torch.index_select(self._users, 0, torch.from_numpy(job.table_rows)).float()
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
            self._gathered = torch.empty(capacity, self.dim, dtype=self._playlists.dtype)
            if self._playlists.dtype != torch.float32:
                self._widened = torch.empty(capacity, self.dim, dtype=torch.float32)
            self._arange = torch.arange(capacity, dtype=torch.int32)
        gathered = torch.index_select(self._playlists, 0, rows, out=self._gathered[:size])
        if gathered.dtype == torch.float32:
            return gathered
        return self._widened[:size].copy_(gathered)


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
