"""The batch ledger: its fields, the Lua scripts that update it, and its typed status.

A ledger is the hash ``P:b:{<batch_id>}`` (shared.keys). Fields:

    sealed                  0 while more users may be appended, 1 after
    run                     1: a declared run (its own generation); 0: ad-hoc (its results
                            go into the current generation as its jobs finish)
    jobs_total users_total  what was queued
    jobs_done users_done    finished jobs, counted once each (set ``:done``)
    jobs_dead users_dead    dead-lettered jobs, counted once each (set ``:dead``)
    cold_users              users served the cold-start fallback
    created_at first_done_at last_done_at   epoch seconds
    rec_<bucket>            recommended playlists per popularity-rank bucket (shared.drift)
    gen_state gen_reason activated_at       the batch as a generation (shared.generations)
    model_version           pinned by the first job, so a generation never mixes versions
    publish_failed          why the broker refused some of its jobs
    publishing publish_lease_until   gateway requests publishing into it now, and when
                            the latest one's lease ends (a count left past it: a dead gateway)
    owner                   the name of the API key that opened the batch (api/routes/batches)
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class BatchState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class GenState(StrEnum):
    """A declared run's life as a generation; ``ad-hoc`` for every other batch."""

    PENDING = "pending"
    ACTIVE = "active"
    REJECTED = "rejected"
    RETIRED = "retired"
    AD_HOC = "ad-hoc"


POPULARITY_FIELD = "rec_"
COUNTS = (
    "jobs_total",
    "users_total",
    "jobs_done",
    "users_done",
    "jobs_dead",
    "users_dead",
    "cold_users",
)

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
ALREADY_COUNTED, COUNTED, COMPLETED = 0, 1, 2

# Append users to an open batch: reserve job indices and count users, atomically; the
# ledger, kept briefly while empty, now lives as long as any ledger.
# KEYS: ledger. ARGV: jobs, users, ttl. Returns the first reserved job index, or -1 when
# the batch is missing, -2 when it is sealed.
APPEND_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'sealed') == '1' then return -2 end
if redis.call('TTL', KEYS[1]) >= 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
local total = redis.call('HINCRBY', KEYS[1], 'jobs_total', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'users_total', ARGV[2])
return total - tonumber(ARGV[1])
"""
APPEND_MISSING, APPEND_SEALED = -1, -2

# Seal a batch. KEYS: ledger. Returns -1 if missing, else 1 when every job has already
# finished (the caller then finalizes), 0 otherwise.
SEAL_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('HSET', KEYS[1], 'sealed', '1')
local total = tonumber(redis.call('HGET', KEYS[1], 'jobs_total') or '0')
local done = tonumber(redis.call('HGET', KEYS[1], 'jobs_done') or '0')
local dead = tonumber(redis.call('HGET', KEYS[1], 'jobs_dead') or '0')
if done + dead >= total then return 1 end
return 0
"""

# Pins the batch's model version on first use. Returns {pinned version, run flag}, or
# nil when there is no ledger (a synchronous request).
PIN_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSETNX', KEYS[1], 'model_version', ARGV[1])
return redis.call('HMGET', KEYS[1], 'model_version', 'run')
"""

# A job counted dead that finishes after all (replayed from the dead-letter queue, or
# finished by a worker that lost its connection while the broker dead-lettered it) is
# no longer dead: uncount it, so the ledger counts every job once, done or dead.
# KEYS: ledger, dead set, dead users. ARGV: job id, users.
REVIVE_SCRIPT = """
if redis.call('SREM', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'jobs_dead', -1)
redis.call('HINCRBY', KEYS[1], 'users_dead', -tonumber(ARGV[2]))
return 1
"""


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


def new_batch_fields(
    jobs_total: int, users_total: int, *, run: bool, sealed: bool = True
) -> dict[str, Any]:
    """A new ledger. An unsealed batch may still grow; a declared run becomes its own
    generation, any other batch writes into the current one."""
    return {
        "sealed": int(sealed),
        "run": int(run),
        "gen_state": (GenState.PENDING if run else GenState.AD_HOC).value,
        "jobs_total": jobs_total,
        "users_total": users_total,
        "jobs_done": 0,
        "users_done": 0,
        "jobs_dead": 0,
        "users_dead": 0,
        "cold_users": 0,
        "created_at": f"{time.time():.3f}",
    }


def _texts(fields: Mapping[Any, Any]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }


def _float(f: Mapping[str, str], name: str) -> float | None:
    return float(f[name]) if name in f else None


@dataclass(frozen=True)
class LedgerStatus:
    """A batch ledger read from Redis: counts, timing, state, and its generation state."""

    batch_id: str
    state: BatchState
    jobs_total: int
    users_total: int
    jobs_done: int
    users_done: int
    jobs_dead: int
    users_dead: int
    cold_users: int
    created_at: float
    first_done_at: float | None
    last_done_at: float | None
    users_per_s: float | None
    eta_s: float | None
    sealed: bool
    run: bool
    gen_state: GenState
    gen_reason: str | None
    activated_at: float | None
    model_version: str | None
    recommended_by_popularity: dict[str, int] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state in (BatchState.DONE, BatchState.FAILED)

    @property
    def awaits_switch(self) -> bool:
        """Every job is done or dead but the generation switch has not run yet (its last
        worker died, or lost the reply that said so, before running it)."""
        return self.finished and self.gen_state == GenState.PENDING

    @classmethod
    def parse(cls, batch_id: str, fields: Mapping[Any, Any]) -> LedgerStatus:
        """Read a ledger as returned by HGETALL (bytes or str). Raises ValueError when a
        count is not a number."""
        f = _texts(fields)
        n = {k: int(f.get(k, 0)) for k in COUNTS}
        created = float(f.get("created_at", 0))
        last = _float(f, "last_done_at")
        finished = n["jobs_done"] + n["jobs_dead"]
        sealed = f.get("sealed", "1") == "1"
        complete = sealed and finished >= n["jobs_total"]
        if complete:
            state = BatchState.FAILED if n["jobs_dead"] else BatchState.DONE
        else:
            state = BatchState.QUEUED if finished == 0 else BatchState.RUNNING
        elapsed = (last - created) if last else None
        rate = n["users_done"] / elapsed if elapsed and elapsed > 0 else None
        remaining = n["users_total"] - n["users_done"] - n["users_dead"]
        running = rate and state == BatchState.RUNNING
        eta = remaining / rate if running and rate else (0.0 if complete else None)
        return cls(
            batch_id=batch_id,
            state=state,
            **n,
            created_at=created,
            first_done_at=_float(f, "first_done_at"),
            last_done_at=last,
            users_per_s=rate,
            eta_s=eta,
            sealed=sealed,
            # Ledgers written before ad-hoc batches existed were all runs.
            run=f.get("run", "1") == "1",
            gen_state=GenState(f.get("gen_state", GenState.PENDING.value)),
            gen_reason=f.get("gen_reason"),
            activated_at=_float(f, "activated_at"),
            model_version=f.get("model_version"),
            recommended_by_popularity=popularity_counts(f),
        )

    def document(self) -> dict[str, Any]:
        """The public progress document (plain values, enums as their strings)."""
        doc = asdict(self)
        doc["state"] = self.state.value
        doc["gen_state"] = self.gen_state.value
        return doc
