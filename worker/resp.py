"""A job's results as Redis protocol bytes, packed by one compiled loop, sent in one write.

redis-py packs each argument of a command in Python: a job's 1 000 results are ~2 000
arguments of ``HSET`` and cost ~1.5 ms to pack, more than a third of the ranking itself.
Here the ``HSET`` commands of a whole job are laid out as RESP (``*<n>`` array headers,
``$<len>`` bulk strings) straight from the job's packed result records by a compiled
loop (~0.2 ms), and ``send_commands`` writes them with the job's other commands on one
pooled connection; its replies are read later (``SentCommands.read``), as a redis-py
pipeline would read them, so that a worker ranks its next job while Redis works.

Only for a single Redis: a Redis Cluster routes each key to its node, so the cluster
client's pipeline (``shared.redis``) carries its writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numba
import numpy as np
import redis
from redis.exceptions import ResponseError

_HSET = np.frombuffer(b"HSET", dtype=np.uint8)
# Bytes of the longest "$<len>\r\n" or "*<n>\r\n" header, and of "\r\n".
_HEADER = 1 + 20 + 2
_CRLF = 2


@numba.njit(cache=True, nogil=True)
def _put_int(out: np.ndarray, pos: int, x: int) -> int:
    """Write the decimal digits of ``x`` ≥ 0 at ``pos``; returns the position after them."""
    digits, rest = 1, x
    while rest >= 10:
        rest //= 10
        digits += 1
    for i in range(digits - 1, -1, -1):
        out[pos + i] = 48 + x % 10
        x //= 10
    return pos + digits


@numba.njit(cache=True, nogil=True)
def _put_header(out: np.ndarray, pos: int, kind: int, n: int) -> int:
    """``<kind><n>\\r\\n``: an array (``*``) or bulk-string (``$``) header."""
    out[pos] = kind
    pos = _put_int(out, pos + 1, n)
    out[pos] = 13
    out[pos + 1] = 10
    return pos + 2


@numba.njit(cache=True, nogil=True)
def _put_bulk(out: np.ndarray, pos: int, src: np.ndarray, lo: int, hi: int) -> int:
    """``$<len>\\r\\n<src[lo:hi]>\\r\\n``."""
    pos = _put_header(out, pos, 36, hi - lo)
    out[pos : pos + hi - lo] = src[lo:hi]
    pos += hi - lo
    out[pos] = 13
    out[pos + 1] = 10
    return pos + 2


@numba.njit(cache=True, nogil=True)
def _pack_hsets(
    hset: np.ndarray,
    keys: np.ndarray,
    key_ends: np.ndarray,
    group_ends: np.ndarray,
    fields: np.ndarray,
    values: np.ndarray,
) -> np.ndarray:
    """One ``HSET key field value ...`` per group; group ``g`` is rows
    ``group_ends[g-1]:group_ends[g]`` of ``fields`` / ``values`` under key
    ``keys[key_ends[g-1]:key_ends[g]]``."""
    n, width = values.shape
    flat = values.reshape(-1)
    groups = len(group_ends)
    size = groups * (2 * _HEADER + 4 + _CRLF) + len(keys) + groups * (_HEADER + _CRLF)
    size += n * (4 * _HEADER + width + 2 * _CRLF)
    out = np.empty(size, dtype=np.uint8)
    digits = np.empty(20, dtype=np.uint8)
    pos, lo, key_lo = 0, 0, 0
    for g in range(groups):
        hi, key_hi = group_ends[g], key_ends[g]
        pos = _put_header(out, pos, 42, 2 + 2 * (hi - lo))
        pos = _put_bulk(out, pos, hset, 0, 4)
        pos = _put_bulk(out, pos, keys, key_lo, key_hi)
        for i in range(lo, hi):
            pos = _put_bulk(out, pos, digits, 0, _put_int(digits, 0, fields[i]))
            pos = _put_bulk(out, pos, flat, i * width, (i + 1) * width)
        lo, key_lo = hi, key_hi
    return out[:pos]


def pack_hsets(
    keys: Sequence[str], group_ends: np.ndarray, fields: np.ndarray, values: np.ndarray
) -> np.ndarray:
    """The RESP bytes of one ``HSET`` per key: key ``g`` gets rows
    ``group_ends[g-1]:group_ends[g]`` (from 0) of ``fields`` (integers ≥ 0, sent as decimal
    text) and ``values`` (uint8 [n, width], one value a row). Bytes equal to what redis-py
    packs for the same commands.

    Raises ValueError when the shapes disagree or a field is negative.
    """
    if values.ndim != 2 or len(values) != len(fields) or len(group_ends) != len(keys):
        raise ValueError("one field and one value row per result, one group end per key")
    if len(keys) and (int(group_ends[-1]) != len(fields) or np.any(np.diff(group_ends) < 0)):
        raise ValueError("group ends must ascend to the number of results")
    if len(fields) and int(fields.min()) < 0:
        raise ValueError("fields must be non-negative")
    encoded = [k.encode() for k in keys]
    key_bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    key_ends = np.cumsum([len(k) for k in encoded], dtype=np.int64)
    return _pack_hsets(
        _HSET,
        key_bytes,
        key_ends,
        np.asarray(group_ends, dtype=np.int64),
        np.ascontiguousarray(fields, dtype=np.int64),
        np.ascontiguousarray(values, dtype=np.uint8),
    )


def compile_packer() -> None:
    """Compile (or load from numba's cache) the packing loop now, so that a worker's first
    job does not pay for it: seconds with a cold cache, as in a fresh container."""
    values = np.zeros((1, 4), dtype=np.uint8)  # writable, like a job's records
    pack_hsets(["k"], np.ones(1, dtype=np.int64), np.zeros(1, dtype=np.int64), values)


class SentCommands:
    """Commands written on a pooled connection whose replies are still to be read
    (``send_commands``). Holds the connection until ``read``."""

    def __init__(self, pool: redis.ConnectionPool, connection: Any, replies: int) -> None:
        self._pool = pool
        self._connection: Any = connection
        self._replies = replies

    def read(self) -> list[Any]:
        """Every reply, in order, as the protocol parser returns them (integers, bytes;
        none of redis-py's per-command conversions); gives the connection back.

        Every reply is read before an error is raised, so the connection stays in step; on
        any other failure the connection is dropped. Raises redis.ResponseError (the first
        error reply, e.g. NoScriptError), redis.ConnectionError and redis.TimeoutError;
        RuntimeError when read twice.
        """
        connection, self._connection = self._connection, None
        if connection is None:
            raise RuntimeError("replies already read")
        answers: list[Any] = []
        try:
            for _ in range(self._replies):
                try:
                    answers.append(connection.read_response())
                except ResponseError as exc:
                    answers.append(exc)
        except BaseException:
            connection.disconnect()
            raise
        finally:
            self._pool.release(connection)
        error = next((a for a in answers if isinstance(a, ResponseError)), None)
        if error is not None:
            raise error
        return answers


def send_commands(
    client: redis.Redis,
    packed: Sequence[np.ndarray],
    packed_replies: int,
    commands: Sequence[Sequence[Any]] = (),
) -> SentCommands:
    """Write ``packed`` (RESP bytes of ``packed_replies`` commands) and then ``commands``
    (argument lists, packed by redis-py) on one pooled connection, in one write, without
    waiting for the replies: ``read`` them later (Redis works on them meanwhile).

    Raises redis.ConnectionError and redis.TimeoutError (the connection is dropped).
    """
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        chunks = [chunk.data for chunk in packed]
        connection.send_packed_command(chunks + connection.pack_commands(commands))
    except BaseException:
        connection.disconnect()
        pool.release(connection)
        raise
    return SentCommands(pool, connection, packed_replies + len(commands))


def send_packed(
    client: redis.Redis,
    packed: Sequence[np.ndarray],
    packed_replies: int,
    commands: Sequence[Sequence[Any]] = (),
) -> list[Any]:
    """``send_commands`` and then read every reply (``SentCommands.read``)."""
    return send_commands(client, packed, packed_replies, commands).read()
