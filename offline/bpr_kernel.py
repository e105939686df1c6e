"""The compiled BPR epoch: minibatch SGD on as many threads as given, same bits for any count.

One epoch is a sequential loop over minibatches of ``batch_size`` triplets (user, liked
playlist, other playlist). Each minibatch is the step the model has always taken: every
triplet's gradient is computed from the rows as they were before the minibatch, and the
updates of the minibatch are then added to the tables. It runs in two parallel passes:

1. Gather (``prange`` over triplets): copy the triplet's user, liked and other rows into
   the workspace, compute ``x = u·(p-n)``, the step ``lr·sigmoid(-x)`` (the gradient of
   ``-log sigmoid(x)`` with the step size folded in) and the loss ``softplus(-x)``. Each
   triplet is one thread's alone, and the tables are only read.
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
milliseconds of random row reads and writes in them, provided every thread gets a core
when a region starts. Threads that wait for work spinning (OpenMP's default) are the
fastest on an idle machine, but when another process holds a core a barrier waits out
scheduler slices: two threads then ran 2-10x slower than one on a shared 2-core machine.
Numba's threads are therefore started waiting asleep (``_start_threads``): about 10 %
slower than spinning when idle, and no slower than one thread when a core is taken.
The loops release the GIL.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np

_FASTMATH = {"reassoc", "contract"}


@dataclass
class Workspace:
    """Per-minibatch buffers, allocated once per training run."""

    batch_size: int
    dim: int
    user: np.ndarray = field(init=False)
    pos: np.ndarray = field(init=False)
    neg: np.ndarray = field(init=False)
    step: np.ndarray = field(init=False)
    loss: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        shape = (self.batch_size, self.dim)
        self.user = np.empty(shape, np.float32)
        self.pos = np.empty(shape, np.float32)
        self.neg = np.empty(shape, np.float32)
        self.step = np.empty(self.batch_size, np.float32)
        self.loss = np.empty(self.batch_size, np.float64)


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=_FASTMATH, boundscheck=False)
def _epoch(
    user_emb: Any,
    playlist_emb: Any,
    users: Any,
    pos: Any,
    neg: Any,
    lr: float,
    reg: float,
    slots: int,
    u: Any,
    p: Any,
    n: Any,
    step: Any,
    loss: Any,
) -> float:
    dim = user_emb.shape[1]
    batch_size = u.shape[0]
    rate = np.float32(lr)
    decay = np.float32(-lr * reg)
    one = np.float32(1.0)
    total = 0.0
    for begin in range(0, len(users), batch_size):
        size = min(batch_size, len(users) - begin)
        for i in numba.prange(size):
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
        for i in range(size):
            total += loss[i]
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
    return total


@functools.cache
def _start_threads() -> None:
    """Start numba's thread pool with ``OMP_WAIT_POLICY=passive`` unless it is set.

    OpenMP reads the variable once, when numba loads it to start its threads (its copy is
    not torch's or scikit-learn's), so it is set for that moment only. A pool started
    earlier, or another threading layer, is left as it is.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        numba.get_num_threads()
        return
    os.environ["OMP_WAIT_POLICY"] = "passive"
    try:
        numba.get_num_threads()
    finally:
        del os.environ["OMP_WAIT_POLICY"]


def train_epoch(
    user_emb: np.ndarray,
    playlist_emb: np.ndarray,
    triplets: tuple[np.ndarray, np.ndarray, np.ndarray],
    lr: float,
    reg: float,
    threads: int,
    ws: Workspace,
) -> float:
    """One pass of minibatch steps over ``triplets``, in place; returns the summed loss.

    user_emb / playlist_emb: float32 [U, d] / [P, d], C-contiguous, written in place;
    triplets: int64 [n] user, liked and other rows, in training order, minibatches of
    ``ws.batch_size``. Arguments are trusted (no range checks). The result does not depend
    on ``threads``; numba runs at most ``NUMBA_NUM_THREADS`` of them (the core count).
    """
    users, pos, neg = triplets
    _start_threads()
    most = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # set at import
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(threads, most)))
    try:
        return float(
            _epoch(
                user_emb,
                playlist_emb,
                users,
                pos,
                neg,
                lr,
                reg,
                max(1, threads),
                ws.user,
                ws.pos,
                ws.neg,
                ws.step,
                ws.loss,
            )
        )
    finally:
        numba.set_num_threads(before)
