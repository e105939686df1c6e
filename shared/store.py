"""The Redis layout and the result encoding, shared by the gateway and the workers.

Keys (``P`` is the configured prefix, ``rf`` by default)::

    P:r:<gen>:<bucket>      hash of one generation's results (see shared.generations):
                            bucket = user_id >> BUCKET_BITS, field = the low bits of the
                            id, value = packed result; small hashes keep Redis's compact
                            listpack encoding
    P:models                hash, model tag (decimal) -> model version string
    P:b:{<batch_id>}        hash, the batch ledger: totals, counts, timestamps
    P:b:{<batch_id>}:done   set of finished job ids (makes progress idempotent)
    P:b:{<batch_id>}:dead   set of dead-lettered job ids
    P:batches               sorted set, batch id -> time of its latest progress (lets
                            monitoring find recent batches without scanning keys)
    P:drift:reference       string, the batch id an operator pinned as drift reference

A ledger also holds ``rec_<bucket>`` fields: how many recommended playlists of the
batch fell in each popularity-rank bucket (see ``shared.drift``), for drift tests.

The ``{batch_id}`` hash tag keeps a batch's keys in one Cluster slot, so the
progress script touches one slot only; result buckets spread over all slots.

A packed result is ``<B flags><I generated_at><I model_tag>`` then the playlist
ids as little-endian uint32 (or int64 when flag WIDE is set).
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

BUCKET_BITS = 7
HEADER = struct.Struct("<BII")
FLAG_COLD = 1
FLAG_WIDE = 2
NO_PLAYLIST = -1


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix."""

    prefix: str

    @property
    def models(self) -> str:
        return f"{self.prefix}:models"

    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}:b:{{{batch_id}}}"

    def batch_done(self, batch_id: str) -> str:
        return f"{self.prefix}:b:{{{batch_id}}}:done"

    def batch_dead(self, batch_id: str) -> str:
        return f"{self.prefix}:b:{{{batch_id}}}:dead"

    def batch_dead_users(self, batch_id: str) -> str:
        """Hash: dead-lettered job id -> its user ids as packed little-endian int64."""
        return f"{self.prefix}:b:{{{batch_id}}}:dead-users"

    @property
    def batches(self) -> str:
        return f"{self.prefix}:batches"

    @property
    def drift_reference(self) -> str:
        return f"{self.prefix}:drift:reference"


def model_tag(model_version: str) -> int:
    """A stable 32-bit tag for a model version, stored in every result instead of the string."""
    return zlib.crc32(model_version.encode())


def encode_results(
    playlists: np.ndarray, cold: np.ndarray, generated_at: int, tag: int
) -> list[bytes]:
    """Pack one result per row of ``playlists`` ([n, k] external ids, NO_PLAYLIST = padding).

    Encodes the whole job with numpy at once and returns one ``bytes`` per user.
    """
    n, k = playlists.shape
    wide = bool(n and (playlists.max() >= 2**32))
    item = np.dtype("<i8") if wide else np.dtype("<u4")
    rec = np.dtype([("flags", "u1"), ("ts", "<u4"), ("tag", "<u4"), ("p", item, (k,))])
    out = np.empty(n, dtype=rec)
    out["flags"] = np.where(cold, FLAG_COLD, 0) | (FLAG_WIDE if wide else 0)
    out["ts"] = generated_at
    out["tag"] = tag
    out["p"] = (
        playlists.astype(item.type, copy=False)
        if wide
        else np.where(playlists < 0, 0xFFFFFFFF, playlists).astype(np.uint32)
    )
    raw = out.tobytes()
    size = rec.itemsize
    return [raw[i * size : (i + 1) * size] for i in range(n)]


@dataclass(frozen=True)
class Result:
    playlists: list[int]
    cold: bool
    generated_at: int
    model_tag: int


def decode_result(raw: bytes) -> Result:
    """Unpack one result. Raises ValueError when the bytes are not a packed result."""
    if len(raw) < HEADER.size:
        raise ValueError("result shorter than its header")
    flags, ts, tag = HEADER.unpack_from(raw)
    body = raw[HEADER.size :]
    if flags & FLAG_WIDE:
        ids = np.frombuffer(body, dtype="<i8")
        playlists = [int(x) for x in ids if x != NO_PLAYLIST]
    else:
        ids32 = np.frombuffer(body, dtype="<u4")
        playlists = [int(x) for x in ids32 if x != 0xFFFFFFFF]
    return Result(playlists=playlists, cold=bool(flags & FLAG_COLD), generated_at=ts, model_tag=tag)


# Records a finished (or dead-lettered) job once, however often it is delivered.
# Returns 0 when already counted (or the batch is unknown), 1 when counted, 2 when counted
# and the job was the last one of a sealed batch.
# KEYS: batch hash, job set (done or dead). ARGV: job id, users, cold users, now, ttl, field,
# then optional (ledger field, count) pairs added to the batch, e.g. popularity buckets.
PROGRESS_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('EXPIRE', KEYS[2], ARGV[5])
local kind = ARGV[6]
redis.call('HINCRBY', KEYS[1], 'jobs_' .. kind, 1)
redis.call('HINCRBY', KEYS[1], 'users_' .. kind, ARGV[2])
redis.call('HINCRBY', KEYS[1], 'cold_users', ARGV[3])
redis.call('HSETNX', KEYS[1], 'first_done_at', ARGV[4])
redis.call('HSET', KEYS[1], 'last_done_at', ARGV[4])
for i = 7, #ARGV - 1, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
-- 2 tells the caller this job completed a sealed batch: time to finalize it.
if redis.call('HGET', KEYS[1], 'sealed') == '1' then
  local finished = tonumber(redis.call('HGET', KEYS[1], 'jobs_done') or '0')
    + tonumber(redis.call('HGET', KEYS[1], 'jobs_dead') or '0')
  if finished >= tonumber(redis.call('HGET', KEYS[1], 'jobs_total') or '0') then return 2 end
end
return 1
"""
COUNTED, COMPLETED = 1, 2
POPULARITY_FIELD = "rec_"


def popularity_args(counts: Mapping[str, int]) -> list[str | int]:
    """The extra PROGRESS_SCRIPT arguments that add per-bucket counts (zeros left out)."""
    out: list[str | int] = []
    for label, n in counts.items():
        if n:
            out += [POPULARITY_FIELD + label, int(n)]
    return out


def popularity_counts(fields: Mapping[Any, Any]) -> dict[str, int]:
    """Per-bucket recommendation counts of a ledger (as read from Redis)."""
    out = {}
    for key, value in fields.items():
        name = key.decode() if isinstance(key, bytes) else key
        if name.startswith(POPULARITY_FIELD):
            out[name.removeprefix(POPULARITY_FIELD)] = int(value)
    return out


def new_batch_fields(jobs_total: int, users_total: int, *, sealed: bool = True) -> dict[str, Any]:
    """A new ledger. An unsealed batch may still grow (``recfleet submit --all``)."""
    return {
        "sealed": int(sealed),
        "gen_state": "pending",
        "jobs_total": jobs_total,
        "users_total": users_total,
        "jobs_done": 0,
        "users_done": 0,
        "jobs_dead": 0,
        "users_dead": 0,
        "cold_users": 0,
        "created_at": f"{time.time():.3f}",
    }


def batch_status(batch_id: str, fields: dict[Any, Any]) -> dict[str, Any]:
    """Turn a batch ledger (as read from Redis) into the public progress document."""
    f = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }
    ints = {
        k: int(f.get(k, 0))
        for k in (
            "jobs_total",
            "users_total",
            "jobs_done",
            "users_done",
            "jobs_dead",
            "users_dead",
            "cold_users",
        )
    }
    created = float(f.get("created_at", 0))
    first = float(f["first_done_at"]) if "first_done_at" in f else None
    last = float(f["last_done_at"]) if "last_done_at" in f else None
    finished = ints["jobs_done"] + ints["jobs_dead"]
    sealed = f.get("sealed", "1") == "1"
    if sealed and finished >= ints["jobs_total"]:
        state = "failed" if ints["jobs_dead"] else "done"
    elif finished == 0:
        state = "queued"
    else:
        state = "running"
    elapsed = (last - created) if last else None
    rate = ints["users_done"] / elapsed if elapsed and elapsed > 0 else None
    remaining = ints["users_total"] - ints["users_done"] - ints["users_dead"]
    eta = (
        remaining / rate
        if rate and state == "running"
        else (0.0 if sealed and finished >= ints["jobs_total"] else None)
    )
    return {
        "batch_id": batch_id,
        "state": state,
        **ints,
        "created_at": created,
        "first_done_at": first,
        "last_done_at": last,
        "users_per_s": rate,
        "eta_s": eta,
        "recommended_by_popularity": popularity_counts(f),
        "sealed": sealed,
        "gen_state": f.get("gen_state", "pending"),
        "gen_reason": f.get("gen_reason"),
        "activated_at": float(f["activated_at"]) if "activated_at" in f else None,
        "model_version": f.get("model_version"),
    }
