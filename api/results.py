"""Reading one user's result through every active generation, in one Redis round trip."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from recfleet.api.schemas import UserResult
from recfleet.shared.codec import as_text, decode_result
from recfleet.shared.generations import READ_SCRIPT, read_order
from recfleet.shared.keys import BASE, BUCKET_BITS, Keys


@dataclass
class GenerationCache:
    """The keyspaces a read looks through (every active generation, newest first, then
    ``live``), re-read at most every ``refresh_s``.

    A reader with a slightly stale list still reads complete generations: switching never
    changes one in place, and prune deletes only generations no longer active.
    """

    redis: Redis
    keys: Keys
    refresh_s: float
    names: list[str] = field(default_factory=lambda: [BASE])
    # The result-key prefix of each keyspace in ``names`` (``P:r:<gen>:{``).
    prefixes: list[str] = field(default_factory=list)
    _read_at: float = float("-inf")

    def fresh(self) -> bool:
        return time.monotonic() - self._read_at < self.refresh_s

    async def order(self) -> list[str]:
        """Keyspaces to read from, newest first, ending with ``live``."""
        if not self.fresh():
            names = await self.redis.zrevrange(self.keys.history, 0, -1)
            order = read_order([as_text(n) for n in names])
            self.prefixes = [self.keys.result_prefix(gen) for gen in order]
            self.names = order
            self._read_at = time.monotonic()
        return self.names

    def invalidate(self) -> None:
        self._read_at = float("-inf")


@dataclass
class ResultReader:
    redis: Redis
    keys: Keys
    generations: GenerationCache
    model_versions: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._sha = hashlib.sha1(READ_SCRIPT.encode()).hexdigest()

    async def _read(self, buckets: list[str], result_field: int) -> list[Any] | None:
        """Run the read script by its hash, loading it once when Redis does not know it
        (a restart, a new node). A plain EVALSHA: the Script wrapper costs more Python
        than the whole call on this path."""
        try:
            reply = await self.redis.execute_command(
                "EVALSHA", self._sha, len(buckets), *buckets, result_field
            )
        except NoScriptError:
            await self.redis.script_load(READ_SCRIPT)
            reply = await self.redis.execute_command(
                "EVALSHA", self._sha, len(buckets), *buckets, result_field
            )
        return reply

    async def model_version(self, tag: int) -> str:
        """Resolve a model tag; cached in-process since there are only a handful."""
        version = self.model_versions.get(tag)
        if version is None:
            raw = await self.redis.hget(self.keys.models, str(tag))
            version = as_text(raw) if raw else f"unknown-{tag:08x}"
            if raw:
                self.model_versions[tag] = version
        return version

    async def lookup(self, user_id: int) -> tuple[str, bytes] | None:
        """The generation and packed result of the newest active generation (then
        ``live``) that has one for the user, or None. One Redis call: every copy of the
        user's bucket lives in one slot."""
        cache = self.generations
        order = cache.names if cache.fresh() else await cache.order()
        result_field = self.keys.result_field(user_id)
        # The bucket is the hash tag: ``<prefix><bucket>}`` (see shared.keys).
        bucket = f"{user_id >> BUCKET_BITS}}}"
        if len(order) == 1:
            raw = await self.redis.hget(cache.prefixes[0] + bucket, result_field)
            if raw is None:
                return None
            return order[0], raw if isinstance(raw, bytes) else raw.encode()
        reply = await self._read([prefix + bucket for prefix in cache.prefixes], result_field)
        if not reply:
            return None
        index, raw = reply
        return order[int(index) - 1], raw

    async def read(self, user_id: int) -> UserResult | None:
        """The user's result, or None."""
        found = await self.lookup(user_id)
        if found is None:
            return None
        generation, raw = found
        result = decode_result(raw)
        return UserResult(
            user_id=user_id,
            playlists=result.playlists,
            model_version=await self.model_version(result.model_tag),
            generated_at=result.generated_at,
            cold=result.cold,
            generation=generation,
        )

    async def read_json(self, user_id: int) -> bytes | None:
        """The user's result as the JSON document of ``UserResult``, or None: the hot
        path, serialised once by orjson without building a model."""
        found = await self.lookup(user_id)
        if found is None:
            return None
        generation, raw = found
        result = decode_result(raw)
        version = self.model_versions.get(result.model_tag) or await self.model_version(
            result.model_tag
        )
        return orjson.dumps(
            {
                "user_id": user_id,
                "playlists": result.playlists,
                "model_version": version,
                "generated_at": float(result.generated_at),
                "cold": result.cold,
                "generation": generation,
            }
        )
