"""Generations: each batch writes its results into its own keyspace, made current at once.

A batch is a *generation* of results. Its jobs write to ``P:r:<batch_id>:<bucket>``;
readers never see them until the batch is complete and passes its gates, when one
``ZADD`` on ``P:gen:history`` makes it current. Readers look a user up in the newest
``read_depth`` active generations in one pipelined round trip, so a user left out
of today's run keeps the last result they had (the documented rule).
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

from recfleet.shared.keys import Keys
from recfleet.shared.ledger import GenState, LedgerStatus
from recfleet.shared.settings import Settings

# Where synchronous results go while no generation is current; read after all others.
LIVE = "live"


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


def check_gates(status: LedgerStatus, settings: Settings) -> str | None:
    """Why a complete batch must not become current, or None when it may.

    Gates: every submitted user has a result or sits in a dead-lettered job, with the
    dead-lettered fraction at most ``gate_max_dead_fraction``; the cold-user fraction
    at most ``gate_max_cold_fraction``.
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
    status = LedgerStatus.parse(batch_id, fields)
    if status.gen_state in (GenState.ACTIVE, GenState.RETIRED):
        return None
    if status.gen_state == GenState.REJECTED:
        return str(status.gen_reason)
    reason = check_gates(status, settings)
    if reason is not None:
        yield ("HSET", ledger, "gen_state", GenState.REJECTED.value, "gen_reason", reason)
        return reason
    now = now_s()
    removed = yield ("EVAL", ACTIVATE_SCRIPT, 1, keys.history, batch_id, now)
    yield ("HSET", ledger, "gen_state", GenState.ACTIVE.value, "activated_at", now)
    for gen in removed or []:
        name = gen.decode() if isinstance(gen, bytes) else str(gen)
        yield ("HSET", keys.batch(name), "gen_state", GenState.RETIRED.value)
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
    if LedgerStatus.parse(batch_id, fields).users_done == 0:
        raise ValueError(f"batch {batch_id} has no results")
    now = now_s()
    removed = client.eval(ACTIVATE_SCRIPT, 1, keys.history, batch_id, now)
    names = [g.decode() if isinstance(g, bytes) else str(g) for g in removed]
    with client.pipeline(transaction=False) as pipe:
        pipe.hset(
            keys.batch(batch_id), mapping={"gen_state": GenState.ACTIVE.value, "activated_at": now}
        )
        for name in names:
            pipe.hset(keys.batch(name), "gen_state", GenState.RETIRED.value)
        pipe.execute()
    return names


def history(client: Any, keys: Keys) -> list[tuple[str, float]]:
    """Active generations, current first, with the time each became current."""
    rows = client.zrevrange(keys.history, 0, -1, withscores=True)
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
    return unlink_matching(client, keys.result_pattern(generation))


def prune(client: Any, keys: Keys, keep: int) -> list[str]:
    """Keep the ``keep`` newest active generations; delete the results of the others.

    Returns the generations pruned. The current generation is never pruned.
    """
    if keep < 1:
        raise ValueError("keep at least the current generation")
    old = [n.decode() for n in client.zrevrange(keys.history, keep, -1)]
    for name in old:
        client.zrem(keys.history, name)
        client.hset(keys.batch(name), "gen_state", GenState.RETIRED.value)
        delete_results(client, keys, name)
    return old
