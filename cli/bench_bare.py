"""The baseline of ``recfleet bench reads --compare``: what a user would write by hand,
a bare FastAPI route doing one HGET and returning the stored bytes. Served by uvicorn
with the same options as the gateway (``recfleet api``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Response
from redis.asyncio import Redis

from recfleet.shared.keys import Keys
from recfleet.shared.settings import get_settings

GENERATION = "bench"  # the generation `bench reads` fills and makes current


def create_bare_app() -> FastAPI:
    """The bare app (a uvicorn factory; settings from the environment)."""
    settings = get_settings()
    keys = Keys(settings.redis_prefix)
    redis = Redis.from_url(str(settings.redis_url))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await redis.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/bare/{user_id}")
    async def bare(user_id: int) -> Response:
        raw = await redis.hget(keys.result_bucket(GENERATION, user_id), keys.result_field(user_id))
        if raw is None:
            raise HTTPException(404)
        return Response(raw, media_type="application/octet-stream")

    @app.get("/readyz")
    async def ready() -> dict[str, bool]:
        return {"ok": True}

    return app
