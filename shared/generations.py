"""Generations: each batch writes its results into its own keyspace, made current at once.

A batch is a *generation* of results. Its jobs write to ``P:r:<batch_id>:<bucket>``;
readers never see them until the batch is complete and passes its gates, when one
``ZADD`` on ``P:gen:history`` makes it current. Readers look a user up in the newest
``read_depth`` active generations in one pipelined round trip, so a user left out
of today's run keeps the last result they had (the documented rule).

Every command here touches one key, so the layout works on a Redis Cluster: a
batch's ledger keys share the ``{batch_id}`` slot, result buckets spread everywhere.

Ledger fields added here: ``sealed`` (0 while more users may be appended),
``gen_state`` (pending | active | rejected | retired), ``gen_reason``,
``activated_at`` and ``model_version`` (pinned by the first job, so a generation
never mixes model versions).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any

from recfleet.shared.settings import Settings
from recfleet.shared.store import BUCKET_BITS, Keys, batch_status

PENDING, ACTIVE, REJECTED, RETIRED = "pending", "active", "rejected", "retired"
# Where synchronous results go while no generation is current; read after all others.
LIVE = "live"


@dataclass(frozen=True)
class GenerationKeys:
    prefix: str

    def result_bucket(self, generation: str, user_id: int) -> str:
        return f"{self.prefix}:r:{generation}:{user_id >> BUCKET_BITS}"

    @staticmethod
    def result_field(user_id: int) -> int:
        """The user's field in its bucket: the low bits of the id (the key holds the rest).

        A small integer field keeps each listpack entry a few bytes shorter.
        """
        return user_id & ((1 << BUCKET_BITS) - 1)

    def result_pattern(self, generation: str) -> str:
        return f"{self.prefix}:r:{generation}:*"

    @property
    def history(self) -> str:
        """Sorted set: active generation -> time it became current (newest = current)."""
        return f"{self.prefix}:gen:history"


def bucket_mappings(
    keys: GenerationKeys, generation: str, user_ids: list[int], values: list[bytes]
) -> dict[str, dict[int, bytes]]:
    """Group packed results by result hash: ``{key: {field: value}}``, one HSET each."""
    out: dict[str, dict[int, bytes]] = defaultdict(dict)
    for uid, value in zip(user_ids, values, strict=True):
        out[keys.result_bucket(generation, uid)][keys.result_field(uid)] = value
    return out


# Append users to an open batch: reserve job indices and count users, atomically.
# KEYS: ledger. ARGV: jobs, users. Returns the first reserved job index, or -1 when the
# batch is missing, -2 when it is sealed.
APPEND_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'sealed') == '1' then return -2 end
local total = redis.call('HINCRBY', KEYS[1], 'jobs_total', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'users_total', ARGV[2])
return total - tonumber(ARGV[1])
"""

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

# Make a generation current. KEYS: history. ARGV: generation, now.
# Activating one that is already in the history is a rollback: every generation made
# current after it is removed (and returned, so the caller marks them retired).
ACTIVATE_SCRIPT = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
local removed = {}
if score then
  removed = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. score, '+inf')
  for _, g in ipairs(removed) do redis.call('ZREM', KEYS[1], g) end
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return removed
"""


def check_gates(status: Mapping[str, Any], settings: Settings) -> str | None:
    """Why a complete batch must not become current, or None when it may.

    Gates: every submitted user has a result or sits in a dead-lettered job, with the
    dead-lettered fraction at most ``gate_max_dead_fraction``; the cold-user fraction
    at most ``gate_max_cold_fraction``.
    """
    users = int(status["users_total"])
    done, dead = int(status["users_done"]), int(status["users_dead"])
    if users == 0:
        return "the batch has no users"
    if done + dead < users:
        return f"{users - done - dead} of {users} users have neither a result nor a dead letter"
    dead_fraction = dead / users
    if dead_fraction > settings.gate_max_dead_fraction:
        return (
            f"{dead_fraction:.2%} of users are in dead-lettered jobs "
            f"(gate {settings.gate_max_dead_fraction:.2%})"
        )
    cold_fraction = int(status["cold_users"]) / max(done, 1)
    if cold_fraction > settings.gate_max_cold_fraction:
        return f"{cold_fraction:.2%} of users are cold (gate {settings.gate_max_cold_fraction:.2%})"
    return None


def now_s() -> str:
    return f"{time.time():.3f}"


# -- finalize: written once as a generator of Redis commands, driven by a sync client in
# workers and the CLI, and by an async client in the gateway.
Command = tuple[Any, ...]
Steps = Generator[Command, Any, str | None]


def finalize_steps(batch_id: str, settings: Settings, keys: Keys) -> Steps:
    """Decide a complete batch's fate: make it current, or reject it with the reason.

    Yields Redis commands and receives their replies. Returns the rejection reason, or
    None when the batch became (or already was) current. Safe to run more than once.
    """
    ledger = keys.batch(batch_id)
    fields = yield ("HGETALL", ledger)
    if not fields:
        return f"no batch {batch_id}"
    status = batch_status(batch_id, fields)
    state = status.get("gen_state")
    if state in (ACTIVE, RETIRED):
        return None
    if state == REJECTED:
        return str(status.get("gen_reason"))
    reason = check_gates(status, settings)
    if reason is not None:
        yield ("HSET", ledger, "gen_state", REJECTED, "gen_reason", reason)
        return reason
    now = now_s()
    removed = yield ("EVAL", ACTIVATE_SCRIPT, 1, GenerationKeys(keys.prefix).history, batch_id, now)
    yield ("HSET", ledger, "gen_state", ACTIVE, "activated_at", now)
    for gen in removed or []:
        name = gen.decode() if isinstance(gen, bytes) else str(gen)
        yield ("HSET", keys.batch(name), "gen_state", RETIRED)
    return None


def run_steps(client: Any, steps: Steps) -> Any:
    """Drive a command generator with a synchronous redis client."""
    reply = None
    try:
        while True:
            command = steps.send(reply)
            reply = client.execute_command(*command)
            if command[0] == "HGETALL" and isinstance(reply, list):
                reply = dict(zip(reply[::2], reply[1::2], strict=True))
    except StopIteration as stop:
        return stop.value


async def run_steps_async(client: Any, steps: Steps) -> Any:
    """Drive a command generator with an asyncio redis client."""
    reply = None
    try:
        while True:
            command = steps.send(reply)
            reply = await client.execute_command(*command)
            if command[0] == "HGETALL" and isinstance(reply, list):
                reply = dict(zip(reply[::2], reply[1::2], strict=True))
    except StopIteration as stop:
        return stop.value


def activate(client: Any, keys: Keys, batch_id: str) -> list[str]:
    """Make a batch current by hand (a rollback when it was current before).

    Skips the gates: this is the operator's decision. Returns the generations retired.
    Raises ValueError when the batch does not exist or has no results to serve.
    """
    fields = client.hgetall(keys.batch(batch_id))
    if not fields:
        raise ValueError(f"no batch {batch_id}")
    status = batch_status(batch_id, fields)
    if status["users_done"] == 0:
        raise ValueError(f"batch {batch_id} has no results")
    now = now_s()
    removed = client.eval(ACTIVATE_SCRIPT, 1, GenerationKeys(keys.prefix).history, batch_id, now)
    names = [g.decode() if isinstance(g, bytes) else str(g) for g in removed]
    with client.pipeline(transaction=False) as pipe:
        pipe.hset(keys.batch(batch_id), mapping={"gen_state": ACTIVE, "activated_at": now})
        for name in names:
            pipe.hset(keys.batch(name), "gen_state", RETIRED)
        pipe.execute()
    return names


def history(client: Any, keys: Keys) -> list[tuple[str, float]]:
    """Active generations, current first, with the time each became current."""
    rows = client.zrevrange(GenerationKeys(keys.prefix).history, 0, -1, withscores=True)
    return [(name.decode(), float(score)) for name, score in rows]


def unlink_matching(client: Any, pattern: str, chunk: int = 500) -> int:
    """Delete every key matching ``pattern`` without blocking Redis: SCAN, then UNLINK in
    small chunks (UNLINK frees memory on a background thread). Returns keys removed."""
    removed = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=chunk):
        batch.append(key)
        if len(batch) >= chunk:
            removed += client.unlink(*batch)
            batch.clear()
    if batch:
        removed += client.unlink(*batch)
    return removed


def delete_results(client: Any, keys: Keys, generation: str) -> int:
    """Delete one generation's result hashes without blocking Redis. Returns keys removed."""
    return unlink_matching(client, GenerationKeys(keys.prefix).result_pattern(generation))


def prune(client: Any, keys: Keys, keep: int) -> list[str]:
    """Keep the ``keep`` newest active generations; delete the results of the others.

    Returns the generations pruned. The current generation is never pruned.
    """
    if keep < 1:
        raise ValueError("keep at least the current generation")
    gen_keys = GenerationKeys(keys.prefix)
    old = [n.decode() for n in client.zrevrange(gen_keys.history, keep, -1)]
    for name in old:
        client.zrem(gen_keys.history, name)
        client.hset(keys.batch(name), "gen_state", RETIRED)
        delete_results(client, keys, name)
    return old
