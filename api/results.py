"""Reading one user's result through the active generations, in one Redis round trip."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from redis.asyncio import Redis

from recfleet.api.schemas import UserResult
from recfleet.shared.codec import decode_result
from recfleet.shared.generations import LIVE
from recfleet.shared.keys import Keys


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class GenerationCache:
    """The newest ``depth`` active generations, re-read at most every ``refresh_s``.

    A reader with a slightly stale list still reads a complete generation: switching
    never changes one in place.
    """

    redis: Redis
    keys: Keys
    depth: int
    refresh_s: float
    _active: list[str] = field(default_factory=list)
    _read_at: float = float("-inf")

    async def current(self) -> str:
        """The current generation (``live`` before there is any)."""
        return (await self.active())[0]

    async def active(self) -> list[str]:
        """Generations to read from, newest first, ending with ``live``."""
        now = time.monotonic()
        if now - self._read_at >= self.refresh_s:
            names = await self.redis.zrevrange(self.keys.history, 0, self.depth - 1)
            self._active = [_text(n) for n in names] + [LIVE]
            self._read_at = now
        return self._active

    def invalidate(self) -> None:
        self._read_at = float("-inf")


@dataclass
class ResultReader:
    redis: Redis
    keys: Keys
    generations: GenerationCache
    model_versions: dict[int, str] = field(default_factory=dict)

    async def model_version(self, tag: int) -> str:
        """Resolve a model tag; cached in-process since there are only a handful."""
        version = self.model_versions.get(tag)
        if version is None:
            raw = await self.redis.hget(self.keys.models, str(tag))
            version = _text(raw) if raw else f"unknown-{tag:08x}"
            if raw:
                self.model_versions[tag] = version
        return version

    async def read(self, user_id: int) -> UserResult | None:
        """The user's result from the newest active generation that has one, or None."""
        generations = await self.generations.active()
        if not generations:
            return None
        field_name = self.generations.keys.result_field(user_id)
        gen_keys = self.generations.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            for gen in generations:
                pipe.hget(gen_keys.result_bucket(gen, user_id), field_name)
            replies = await pipe.execute()
        for gen, raw in zip(generations, replies, strict=True):
            if raw is not None:
                result = decode_result(raw)
                return UserResult(
                    user_id=user_id,
                    playlists=result.playlists,
                    model_version=await self.model_version(result.model_tag),
                    generated_at=result.generated_at,
                    cold=result.cold,
                    generation=gen,
                )
        return None
