"""``Idempotency-Key``: the same key within a window returns the same batch, not a second one."""

from __future__ import annotations

import hashlib
import re

import orjson
from redis.asyncio import Redis

from recfleet.shared.errors import Conflict
from recfleet.shared.keys import Keys

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
PENDING = b"pending"


class IdempotencyConflict(Conflict):
    """The key is in use by a request still running, or by a request with another body."""


def digest(value: bytes | str) -> str:
    data = value.encode() if isinstance(value, str) else value
    return hashlib.sha256(data).hexdigest()


class IdempotencyStore:
    """Remembers the answer to a keyed request for ``window_s`` seconds.

    The client's key is hashed before it becomes part of a Redis key, and the stored
    entry remembers a hash of the body, so a key reused for another body is refused.
    A request in progress holds the key as a lease of ``lease_s`` seconds (a few publish
    timeouts): a gateway that dies mid-request leaves a claim that expires on its own, so
    the client's retry runs afresh instead of meeting "still running" for a day.
    """

    def __init__(self, redis: Redis, prefix: str, window_s: int, lease_s: float) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self.window_s = window_s
        self.lease_ms = max(int(lease_s * 1000), 1)

    def _key(self, key: str) -> str:
        return self.keys.idempotency(digest(key))

    async def begin(self, key: str, body_digest: str) -> dict | None:
        """Claim ``key``; return the earlier answer if the same request already succeeded.

        Raises IdempotencyConflict when the key is held by a running request or was used
        with a different body.
        """
        rkey = self._key(key)
        claimed = await self.redis.set(
            rkey,
            orjson.dumps({"state": "pending", "body": body_digest}),
            nx=True,
            px=self.lease_ms,
        )
        if claimed:
            return None
        raw = await self.redis.get(rkey)
        if raw is None:  # expired between the two calls: claim again
            return await self.begin(key, body_digest)
        entry = orjson.loads(raw)
        if entry.get("body") != body_digest:
            raise IdempotencyConflict("Idempotency-Key was already used with a different body")
        if entry.get("state") == "pending":
            raise IdempotencyConflict("a request with this Idempotency-Key is still running")
        return dict(entry["response"])

    async def finish(self, key: str, body_digest: str, response: dict) -> None:
        entry = {"state": "done", "body": body_digest, "response": response}
        await self.redis.set(self._key(key), orjson.dumps(entry), ex=self.window_s)

    async def abandon(self, key: str) -> None:
        """Release the key after a failure, so the client's retry runs afresh."""
        await self.redis.delete(self._key(key))
