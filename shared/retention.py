"""Bounded storage: prune generations, measure what each one holds.

What expires by itself (TTLs set where the keys are written): ledgers and their job sets
(``batch_ttl_s`` after their last progress; an opened batch with no users after
``open_batch_ttl_s``; an active generation's ledger only once it is retired),
idempotency records (``idempotency_window_s``), results in the ``live`` base keyspace
(``batch_ttl_s`` after their last write). Results in a run's keyspace (including the
ad-hoc results written into it while it was current) go when prune deletes the run.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

from recfleet.shared.generations import retire_steps, run_steps
from recfleet.shared.keys import Keys
from recfleet.shared.ledger import GenState

SAMPLE_KEYS = 64


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


def prune(client: Any, keys: Keys, keep: int, ttl_s: int) -> list[str]:
    """Keep the ``keep`` newest active generations; retire the others, and delete the
    results of every run that is neither active nor still running (retired, rejected, or
    whose ledger expired). Returns the runs whose results were deleted.

    The current generation is never pruned. Raises ValueError when ``keep`` < 1.
    """
    if keep < 1:
        raise ValueError("keep at least the current generation")
    active = [n.decode() for n in client.zrevrange(keys.history, 0, -1)]
    for name in active[keep:]:
        client.zrem(keys.history, name)
        run_steps(client, retire_steps(keys, name, ttl_s))
    kept = set(active[:keep])
    deleted = []
    # Generations retired here go too, even if they are not in the runs set (made current
    # by hand, or written before it existed).
    candidates = dict.fromkeys(
        [*(r.decode() for r in client.zrange(keys.runs, 0, -1)), *active[keep:]]
    )
    for name in candidates:
        state = client.hget(keys.batch(name), "gen_state")
        # A run still computing is left alone; so is one made current since we looked.
        if name in kept or state in (GenState.PENDING.encode(), GenState.ACTIVE.encode()):
            continue
        delete_results(client, keys, name)
        client.zrem(keys.runs, name)
        deleted.append(name)
    # The index of recent batches points at ledgers; it forgets them as they expire.
    client.zremrangebyscore(keys.batches, "-inf", time.time() - ttl_s)
    return deleted


@dataclass
class Usage:
    """What one generation's keyspace holds. ``bytes`` is an estimate: the mean MEMORY
    USAGE of up to SAMPLE_KEYS sampled buckets times the number of buckets."""

    keys: int = 0
    users: int = 0
    bytes: int = 0


def usage(client: Any, keys: Keys, chunk: int = 1000) -> dict[str, Usage]:
    """Users (HLEN summed, exact) and bytes (sampled) per generation keyspace, from one
    SCAN over the result keys."""
    found: dict[str, Usage] = {}
    samples: dict[str, list[bytes]] = {}
    pending: list[bytes] = []
    rng = random.Random(0)

    def count(batch: list[bytes]) -> None:
        with client.pipeline(transaction=False) as pipe:
            for key in batch:
                pipe.hlen(key)
            for key, n in zip(batch, pipe.execute(), strict=True):
                found[keys.generation_of(key.decode())].users += int(n)

    for key in client.scan_iter(match=keys.result_pattern(), count=chunk):
        gen = keys.generation_of(key.decode())
        entry = found.setdefault(gen, Usage())
        entry.keys += 1
        sample = samples.setdefault(gen, [])
        # Reservoir sampling: every bucket equally likely to be measured.
        if len(sample) < SAMPLE_KEYS:
            sample.append(key)
        elif (j := rng.randrange(entry.keys)) < SAMPLE_KEYS:
            sample[j] = key
        pending.append(key)
        if len(pending) >= chunk:
            count(pending)
            pending = []
    if pending:
        count(pending)
    for gen, sample in samples.items():
        sizes = [client.memory_usage(k, samples=0) or 0 for k in sample]
        found[gen].bytes = int(sum(sizes) / len(sizes) * found[gen].keys)
    return found
