"""The compiled BPR epoch: minibatch SGD on as many threads as given, same bits for any count.

One epoch is a sequential loop over minibatches of ``batch_size`` triplets (user, liked
playlist, other playlist). Each minibatch is the step the model has always taken: every
triplet's gradient is computed from the rows as they were before the minibatch, and the
updates of the minibatch are then added to the tables. It runs in two parallel passes:

1. Gather (``prange`` over triplets): copy the triplet's user, liked and other rows into
   the workspace, compute ``x = u·(p-n)``, the step ``lr·sigmoid(-x)`` (the gradient of
   ``-log sigmoid(x)`` with the step size folded in) and the loss ``softplus(-x)``. Each
   triplet is one thread's alone, and the tables are only read. The rows are random
   reads from tables far larger than the caches: the rows of the triplet ``_AHEAD``
   places ahead are prefetched, so several are in flight from memory at once.
2. Scatter (``prange`` over ``slots`` owners): owner ``t`` adds the updates to the rows
   whose index is ``t`` modulo ``slots``: the user rows in minibatch order, then the
   liked rows, then the other rows, from the pre-minibatch copies. No two threads write
   one row, and each row receives its additions in one fixed order (the order of the
   three ``index_add_`` calls of a plain tensor implementation), whatever the number of
   owners or threads.

So the embeddings are identical bit for bit for any thread count (on one machine: the
compiled code may differ on another CPU). The loss is summed in float64 in minibatch
order, on one thread. The dot product and the updates are compiled with reassociation
and contraction allowed (``fastmath`` with ``reassoc`` and ``contract`` only), so they
may differ from an unfused, left-to-right float32 evaluation in the last bits.

Two parallel regions per minibatch of 2048 cost tens of microseconds against the
milliseconds of row reads and writes in them, provided every thread gets a core when a
region starts; on a machine whose other cores are busy, one thread is faster. Since the
result does not depend on the thread count, ``Trainer`` runs each segment of ``SEGMENT``
minibatches on one thread or on all it is given, whichever ran faster when last timed,
the other being timed now and then on a short segment (``ThreadChoice``): the thread
count a busy machine can use, found while training.
While the caller's own second thread draws the next epoch's triplets, segments run on
one thread fewer (two threads and the drawing thread on two cores ran slower than one).
Numba's threads wait for work asleep (``offline.numba_threads``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numba
import numpy as np

from recfleet.offline import numba_threads
from recfleet.worker.topk_kernel import prefetch

_FASTMATH = {"reassoc", "contract"}
_AHEAD = 8  # triplets ahead whose rows are prefetched
SEGMENT = 64  # minibatches per kernel call, each on one thread count
PROBE_EVERY = 16  # segments between two timings of the thread count not in use
LONGEST_WAIT = 256  # segments, when those timings keep losing
TRIAL = 8  # minibatches of a segment timed on the thread count not in use


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=_FASTMATH, boundscheck=False)
def _epoch(user_emb, playlist_emb, users, pos, neg, lr, reg, slots, u, p, n, step, loss, sums):
    dim = user_emb.shape[1]
    batch_size = u.shape[0]
    line = 64 // user_emb.itemsize  # elements per cache line
    rate = np.float32(lr)
    decay = np.float32(-lr * reg)
    one = np.float32(1.0)
    for begin in range(0, len(users), batch_size):
        size = min(batch_size, len(users) - begin)
        for i in numba.prange(size):
            if i + _AHEAD < size:
                ahead = begin + i + _AHEAD
                for j in range(0, dim, line):
                    prefetch(user_emb, users[ahead], j)
                    prefetch(playlist_emb, pos[ahead], j)
                    prefetch(playlist_emb, neg[ahead], j)
            row_u, row_p, row_n = users[begin + i], pos[begin + i], neg[begin + i]
            x = np.float32(0.0)
            for j in range(dim):
                u[i, j] = user_emb[row_u, j]
                p[i, j] = playlist_emb[row_p, j]
                n[i, j] = playlist_emb[row_n, j]
                x += u[i, j] * (p[i, j] - n[i, j])
            step[i] = one / (one + np.exp(x)) * rate
            z = -np.float64(x)  # softplus(z) = max(z, 0) + log1p(exp(-|z|))
            loss[i] = max(z, 0.0) + np.log1p(np.exp(-abs(z)))
        total = 0.0
        for i in range(size):
            total += loss[i]
        sums[begin // batch_size] = total
        for slot in numba.prange(slots):
            for i in range(size):
                row = users[begin + i]
                if row % slots == slot:
                    w = step[i]
                    for j in range(dim):
                        user_emb[row, j] += (p[i, j] - n[i, j]) * w + decay * u[i, j]
            for i in range(size):
                row = pos[begin + i]
                if row % slots == slot:
                    w = step[i]
                    for j in range(dim):
                        playlist_emb[row, j] += p[i, j] * decay + u[i, j] * w
            for i in range(size):
                row = neg[begin + i]
                if row % slots == slot:
                    w = step[i]
                    for j in range(dim):
                        playlist_emb[row, j] += n[i, j] * decay - u[i, j] * w


class ThreadChoice:
    """One thread or all ``threads``, segment by segment, by the speed last timed with each.

    Each count is tried once, then the faster one runs, and after ``PROBE_EVERY``
    segments the other runs once more (a short trial segment), so that a change of load
    is noticed. A trial that loses doubles the wait for the next one (up to
    ``LONGEST_WAIT`` segments): on a busy machine two threads can take ten times as long
    as one. Ties go to more threads.
    """

    def __init__(self, threads: int) -> None:
        self.counts = (threads, 1) if threads > 1 else (1,)
        self.seconds_per_triplet: dict[int, float] = {}
        self.wait = PROBE_EVERY
        self.until_probe = PROBE_EVERY

    def _best(self) -> int:
        return min(self.counts, key=self.seconds_per_triplet.__getitem__)

    def next(self) -> int:
        """The thread count for the next segment."""
        for count in self.counts:
            if count not in self.seconds_per_triplet:
                return count
        best = self._best()
        if self.until_probe > 0 or len(self.counts) == 1:
            return best
        return next(count for count in self.counts if count != best)

    def trial(self, threads: int) -> bool:
        """Whether a segment on ``threads`` threads is a trial: the count is untried, or
        not the faster one (such segments are kept short, ``TRIAL`` minibatches)."""
        if threads not in self.seconds_per_triplet:
            return True
        return len(self.seconds_per_triplet) == len(self.counts) and threads != self._best()

    def record(self, threads: int, seconds: float, triplets: int) -> None:
        """Note how long a segment of ``triplets`` took on ``threads`` threads."""
        probe = len(self.seconds_per_triplet) == len(self.counts) and threads != self._best()
        self.seconds_per_triplet[threads] = seconds / max(1, triplets)
        if not probe:
            self.until_probe -= 1
            return
        won = self._best() == threads
        self.wait = PROBE_EVERY if won else min(2 * self.wait, LONGEST_WAIT)
        self.until_probe = self.wait


class Trainer:
    """Epochs of minibatch steps on ``threads`` threads at most; buffers allocated once.

    Raises ValueError for a batch size, dimension or thread count below 1.
    """

    def __init__(self, batch_size: int, dim: int, threads: int) -> None:
        if batch_size < 1 or dim < 1 or threads < 1:
            raise ValueError(
                f"need batch_size, dim, threads ≥ 1; got {batch_size}, {dim}, {threads}"
            )
        self.batch_size = batch_size
        self.threads = threads
        self.choice = ThreadChoice(min(threads, numba_threads.most()))
        shape = (batch_size, dim)
        self._user = np.empty(shape, np.float32)
        self._pos = np.empty(shape, np.float32)
        self._neg = np.empty(shape, np.float32)
        self._step = np.empty(batch_size, np.float32)
        self._loss = np.empty(batch_size, np.float64)
        # Load the compiled code now, so that its seconds are not timed as a segment's.
        empty = np.zeros((0, dim), np.float32)
        self.steps(empty, empty, (np.zeros(0, np.int64),) * 3, 0.0, 0.0, 1, np.zeros(0))

    def steps(
        self,
        user_emb: np.ndarray,
        playlist_emb: np.ndarray,
        triplets: tuple[np.ndarray, ...],
        lr: float,
        reg: float,
        threads: int,
        sums: np.ndarray,
    ) -> None:
        """Minibatch steps over ``triplets`` on ``threads`` threads (at most the cores
        numba has); ``sums`` (float64, one per minibatch) gets each minibatch's summed
        loss. Other arguments as for ``epoch``."""
        with numba_threads.using(threads):
            _epoch(
                user_emb,
                playlist_emb,
                triplets[0],
                triplets[1],
                triplets[2],
                lr,
                reg,
                self.threads,
                self._user,
                self._pos,
                self._neg,
                self._step,
                self._loss,
                sums,
            )

    def epoch(
        self,
        user_emb: np.ndarray,
        playlist_emb: np.ndarray,
        triplets: tuple[np.ndarray, np.ndarray, np.ndarray],
        lr: float,
        reg: float,
        busy: Callable[[], bool] = lambda: False,
    ) -> float:
        """One pass of minibatch steps over ``triplets``, in place; returns the summed loss.

        user_emb / playlist_emb: float32 [U, d] / [P, d], C-contiguous, written in place;
        triplets: int64 [n] user, liked and other rows, in training order. ``busy`` tells
        whether the caller has another thread at work (drawing the next triplets): the
        segments then run on one thread fewer, and are not timed. Arguments are trusted
        (no range checks). The result does not depend on the thread counts used, nor on
        where the segments begin and end (the loss is summed per minibatch, then whole).
        """
        n = len(triplets[0])
        sums = np.zeros(-(-n // self.batch_size))
        most = self.choice.counts[0]
        begin = 0
        while begin < n:
            timed = not (most > 1 and busy())
            threads = self.choice.next() if timed else most - 1
            batches = TRIAL if timed and self.choice.trial(threads) else SEGMENT
            end = min(n, begin + batches * self.batch_size)
            segment = tuple(column[begin:end] for column in triplets)
            first = begin // self.batch_size
            start = time.perf_counter()
            self.steps(user_emb, playlist_emb, segment, lr, reg, threads, sums[first:])
            if timed:
                self.choice.record(threads, time.perf_counter() - start, end - begin)
            begin = end
        return float(sums.sum())
