"""The compiled ranking loop: gather, dot product and top-k selection fused, per user.

One pass over each user's candidate list reads every candidate's playlist row once
(float16 rows are widened in registers with the CPU's half-to-float instruction, so a
float16 table moves half the bytes and is never widened in memory), takes its dot product
with the user's float32 vector, and keeps the ``k`` best in a small sorted array: score
descending, ties to the lower playlist row, like ``ranking.rank_reference``. Nothing is
materialised per candidate. The rows are random reads from a table far larger than the
caches, so the loop prefetches every cache line of the row ``_AHEAD`` candidates ahead
(``llvm.prefetch``): several rows are then in flight from memory at once instead of one.
The loop releases the GIL.

The dot product is summed in float32 with reassociation allowed (``fastmath`` with
``reassoc`` and ``contract`` only, so infinities and NaN keep their meaning): the order
of the additions is the compiler's, so scores can differ from a float64 sum in the last
bits of float32 and two candidates closer than that may swap.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_FASTMATH = {"reassoc", "contract"}
_AHEAD = 8  # candidates ahead whose rows are prefetched (4: -30 %, 16: no better)


@intrinsic
def _half_to_float(typingctx: Any, bits: Any) -> Any:
    """float32 value of a float16 given as its uint16 bits (LLVM fpext, vcvtph2ps)."""
    signature = types.float32(types.uint16)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return signature, codegen


@intrinsic
def prefetch(typingctx: Any, table: Any, row: Any, column: Any) -> Any:
    """Ask the CPU to start loading the cache line of ``table[row, column]``."""
    signature = types.void(table, row, column)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        array = context.make_array(sig.args[0])(context, builder, args[0])
        index = [context.cast(builder, args[i], sig.args[i], types.intp) for i in (1, 2)]
        pointer = cgutils.get_item_pointer(context, builder, sig.args[0], array, index)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch"
        )
        builder.call(fn, [builder.bitcast(pointer, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return signature, codegen


@numba.njit(inline="always")
def _from_float32(value: Any) -> Any:
    return value


@numba.njit(inline="always")
def _from_float16_bits(value: Any) -> Any:
    return _half_to_float(value)  # type: ignore[call-arg]  # numba supplies typingctx


def _make_kernel(widen: Any) -> Any:
    @numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, boundscheck=False)
    def kernel(users, table, indptr, indices, user_rows, out, counts):
        k = out.shape[1]
        dim = table.shape[1]
        line = 64 // table.itemsize  # elements per cache line
        best_score = np.empty(k, np.float32)
        best_row = np.empty(k, np.int64)
        for i in range(len(user_rows)):
            row = user_rows[i]
            begin = indptr[row] if row >= 0 else 0
            end = indptr[row + 1] if row >= 0 else 0
            counts[i] = end - begin
            filled = 0
            for c in range(begin, end):
                if c + _AHEAD < end:
                    for j in range(0, dim, line):
                        prefetch(table, indices[c + _AHEAD], j)
                playlist = np.int64(indices[c])
                score = np.float32(0.0)
                for j in range(dim):
                    score += users[i, j] * widen(table[playlist, j])
                if filled == k:
                    worst, worst_row = best_score[k - 1], best_row[k - 1]
                    if score < worst or (score == worst and playlist > worst_row):
                        continue
                    pos = k - 1
                else:
                    pos = filled
                    filled += 1
                while pos > 0 and (
                    best_score[pos - 1] < score
                    or (best_score[pos - 1] == score and best_row[pos - 1] > playlist)
                ):
                    best_score[pos] = best_score[pos - 1]
                    best_row[pos] = best_row[pos - 1]
                    pos -= 1
                best_score[pos] = score
                best_row[pos] = playlist
            for j in range(filled):
                out[i, j] = best_row[j]
            for j in range(filled, k):
                out[i, j] = -1

    return kernel


_KERNEL_FLOAT32 = _make_kernel(_from_float32)
_KERNEL_FLOAT16 = _make_kernel(_from_float16_bits)


def rank_users(
    users: np.ndarray,
    table: np.ndarray,
    indptr: np.ndarray,
    indices: np.ndarray,
    user_rows: np.ndarray,
    out: np.ndarray,
    counts: np.ndarray,
) -> None:
    """Fill ``out`` (int64 [n, k]) with each user's top-k rows and ``counts`` (int64 [n]).

    users: float32 [n, d], the job's user vectors in job order; table: float32 or float16
    [P, d]; indptr/indices: the candidate CSR; user_rows: int64 [n], -1 for unknown users
    (they get no candidates and a row of -1). Arguments are trusted (no range checks).
    """
    if table.dtype == np.float16:
        _KERNEL_FLOAT16(users, table.view(np.uint16), indptr, indices, user_rows, out, counts)
    else:
        _KERNEL_FLOAT32(users, table, indptr, indices, user_rows, out, counts)
