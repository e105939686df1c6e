"""``recfleet bench store``: Redis memory per user, recfleet's layout beside the naive one."""

from __future__ import annotations

import json
import time

import click
import numpy as np
import orjson
import redis

from recfleet.shared.codec import encode_results, model_tag
from recfleet.shared.keys import Keys, bucket_mappings
from recfleet.shared.messages import new_id
from recfleet.shared.redis import redis_client
from recfleet.shared.retention import unlink_matching
from recfleet.shared.settings import get_settings

CHUNK = 10_000


def _used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def _settle(client: redis.Redis, pattern: str) -> None:
    """Delete a layout's keys and wait for lazy freeing to finish."""
    unlink_matching(client, pattern, chunk=1000)
    while int(client.info("memory").get("lazyfree_pending_objects", 0)):
        time.sleep(0.05)


def _write_packed(client: redis.Redis, prefix: str, users: int, k: int) -> None:
    keys = Keys(prefix)
    rng = np.random.default_rng(0)
    for start in range(0, users, CHUNK):
        ids = np.arange(start, min(start + CHUNK, users))
        playlists = rng.integers(0, 1_000_000, size=(len(ids), k))
        values = encode_results(
            playlists, np.zeros(len(ids), bool), int(time.time()), model_tag("bench")
        )
        with client.pipeline(transaction=False) as pipe:
            for key, mapping in bucket_mappings(keys, "g", ids.tolist(), values).items():
                pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
            pipe.execute()


def _write_naive(client: redis.Redis, key: str, users: int, k: int) -> None:
    rng = np.random.default_rng(0)
    now = time.time()
    for start in range(0, users, CHUNK):
        ids = range(start, min(start + CHUNK, users))
        playlists = rng.integers(0, 1_000_000, size=(len(ids), k)).tolist()
        mapping = {
            uid: orjson.dumps(
                {"playlists": p, "model_version": "bench", "generated_at": now, "cold": False}
            )
            for uid, p in zip(ids, playlists, strict=True)
        }
        client.hset(key, mapping=mapping)  # type: ignore[arg-type]


@click.command("store")
@click.option("--users", type=click.IntRange(1000), default=1_000_000, show_default=True)
@click.option("--top-k", type=click.IntRange(1, 100), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on the last line")
def bench_store(users: int, top_k: int, as_json: bool) -> None:
    """Write USERS results in recfleet's layout (packed, bucketed hashes) and in the naive one
    (a JSON string per user in one big hash); report INFO memory bytes per user for each.
    Uses its own key prefix on the configured Redis and deletes it afterwards."""
    s = get_settings()
    client = redis_client(s)
    prefix = f"bench-{new_id()[:8]}"
    figures = {}
    try:
        for name, pattern, write in (
            ("packed_buckets", f"{prefix}:*", lambda: _write_packed(client, prefix, users, top_k)),
            (
                "naive_json_hash",
                f"{prefix}-naive",
                lambda: _write_naive(client, f"{prefix}-naive", users, top_k),
            ),
        ):
            before = _used_memory(client)
            start = time.perf_counter()
            write()
            elapsed = time.perf_counter() - start
            used = _used_memory(client) - before
            figures[name] = {
                "bytes": used,
                "bytes_per_user": round(used / users, 1),
                "write_s": round(elapsed, 2),
                "users_per_s": round(users / elapsed),
            }
            _settle(client, pattern)
    finally:
        _settle(client, f"{prefix}*")
        client.close()
    for name, f in figures.items():
        click.echo(
            f"{name:16} {f['bytes_per_user']:7.1f} bytes/user   "
            f"{f['bytes'] / 2**20:8.1f} MiB for {users:,} users   write {f['write_s']}s"
        )
    if as_json:
        click.echo(json.dumps({"benchmark": "store", "users": users, "top_k": top_k, **figures}))
