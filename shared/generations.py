"""Generations: what a reader sees, and when it changes.

A *generation* is a declared run (``recfleet submit --all``, the scheduler, or
``POST /api/batches`` with ``{"run": true}``). Its jobs write into its own keyspace
``P:r:<run>:{<bucket>}``, which readers do not look at until the run is sealed, complete
and past its gates; then one ``ZADD`` on ``P:gen:history`` makes it current, for every
reader at once.

Every other batch (a plain ``POST /api/playlist/beta_recommend/``, a batch opened without
``run``, a synchronous request) is *ad-hoc*: each job writes its users' results into the
current generation as it finishes (into the ``live`` base keyspace while none is current),
so it updates the users it names and hides no one.

A read looks the user up in every active generation, newest first, then in ``live``, and
returns the first hit: a user with a result in any active generation is always readable.
All those copies of one bucket share a Cluster slot, so one script call on one node is
the whole read. ``recfleet generations prune`` bounds how many generations are active.

Every command here touches one key or one slot, so the layout works on a Redis Cluster.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

from recfleet.shared.codec import as_text
from recfleet.shared.keys import BASE, Keys
from recfleet.shared.ledger import GenState, LedgerStatus
from recfleet.shared.settings import Settings

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

# One user's result: the first generation, newest first, whose bucket holds the field.
# KEYS: the user's bucket in each generation (one slot: the bucket is the hash tag).
# ARGV: the field. Returns {index of the generation (1-based), packed result} or nil.
READ_SCRIPT = """
for i = 1, #KEYS do
  local v = redis.call('HGET', KEYS[i], ARGV[1])
  if v then return {i, v} end
end
return false
"""


def check_gates(
    status: LedgerStatus, settings: Settings, current_users: int | None = None
) -> str | None:
    """Why a complete run must not become current, or None when it may.

    Gates: every submitted user has a result or sits in a dead-lettered job, with the
    dead-lettered fraction at most ``gate_max_dead_fraction``; the cold-user fraction
    at most ``gate_max_cold_fraction``; at least ``gate_min_coverage`` as many users
    with results as the current generation (``current_users``) had.
    """
    users, done, dead = status.users_total, status.users_done, status.users_dead
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
    cold_fraction = status.cold_users / max(done, 1)
    if cold_fraction > settings.gate_max_cold_fraction:
        return f"{cold_fraction:.2%} of users are cold (gate {settings.gate_max_cold_fraction:.2%})"
    if current_users and done < settings.gate_min_coverage * current_users:
        return (
            f"covers {done} users, {done / current_users:.1%} of the current generation's "
            f"{current_users} (gate {settings.gate_min_coverage:.0%})"
        )
    return None


def now_s() -> str:
    return f"{time.time():.3f}"


# -- finalize: written once as a generator of Redis commands, driven by a sync client in
# workers and the CLI, and by an async client in the gateway.
Command = tuple[Any, ...]
Steps = Generator[Command, Any, str | None]


def finalize_steps(batch_id: str, settings: Settings, keys: Keys) -> Steps:
    """Decide a complete run's fate: make it current, or reject it with the reason.

    Yields Redis commands and receives their replies. Returns the rejection reason, or
    None when the run became (or already was) current, or the batch is ad-hoc. Safe to
    run more than once.
    """
    ledger = keys.batch(batch_id)
    fields = yield ("HGETALL", ledger)
    if not fields:
        return f"no batch {batch_id}"
    status = LedgerStatus.parse(batch_id, fields)
    if not status.run or status.gen_state in (GenState.ACTIVE, GenState.RETIRED):
        return None
    if status.gen_state == GenState.REJECTED:
        return str(status.gen_reason)
    current = yield ("ZREVRANGE", keys.history, 0, 0)
    current_users = None
    if current and as_text(current[0]) != batch_id:
        raw = yield ("HGET", keys.batch(as_text(current[0])), "users_done")
        current_users = int(raw) if raw is not None else None
    reason = check_gates(status, settings, current_users)
    if reason is not None:
        yield ("HSET", ledger, "gen_state", GenState.REJECTED.value, "gen_reason", reason)
        return reason
    now = now_s()
    removed = yield ("EVAL", ACTIVATE_SCRIPT, 1, keys.history, batch_id, now)
    yield ("HSET", ledger, "gen_state", GenState.ACTIVE.value, "activated_at", now)
    # An active generation's ledger stays while it is active (the coverage gate and
    # `generations list` read it); it expires like any other once retired.
    yield ("PERSIST", ledger)
    for gen in removed or []:
        yield from retire_steps(keys, as_text(gen), settings.batch_ttl_s)
    return None


def retire_steps(keys: Keys, generation: str, ttl_s: int) -> Steps:
    ledger = keys.batch(generation)
    exists = yield ("EXISTS", ledger)
    if exists:
        yield ("HSET", ledger, "gen_state", GenState.RETIRED.value)
        yield ("EXPIRE", ledger, ttl_s)
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


def activate(client: Any, keys: Keys, batch_id: str, ttl_s: int) -> list[str]:
    """Make a run current by hand (a rollback when it was current before).

    Skips the gates: this is the operator's decision. Returns the generations retired.
    Raises ValueError when the batch does not exist, is not a declared run, or has no
    results to serve (none written, or pruned).
    """
    fields = client.hgetall(keys.batch(batch_id))
    if not fields:
        raise ValueError(f"no batch {batch_id}")
    status = LedgerStatus.parse(batch_id, fields)
    if not status.run:
        raise ValueError(f"batch {batch_id} is ad-hoc, not a declared run")
    if status.users_done == 0 or client.zscore(keys.runs, batch_id) is None:
        raise ValueError(f"batch {batch_id} has no results (none written, or pruned)")
    now = now_s()
    removed = client.eval(ACTIVATE_SCRIPT, 1, keys.history, batch_id, now)
    names = [as_text(g) for g in removed]
    with client.pipeline(transaction=False) as pipe:
        active = {"gen_state": GenState.ACTIVE.value, "activated_at": now}
        pipe.hset(keys.batch(batch_id), mapping=active)
        pipe.persist(keys.batch(batch_id))
        pipe.execute()
    for name in names:
        run_steps(client, retire_steps(keys, name, ttl_s))
    return names


def history(client: Any, keys: Keys) -> list[tuple[str, float]]:
    """Active generations, current first, with the time each became current."""
    rows = client.zrevrange(keys.history, 0, -1, withscores=True)
    return [(name.decode(), float(score)) for name, score in rows]


def read_order(active: list[str]) -> list[str]:
    """The keyspaces a read looks through: every active generation, newest first, then
    the base keyspace."""
    return [*active, BASE]
