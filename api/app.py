"""The FastAPI application and its lifespan, which owns every client."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from redis.asyncio import Redis

from api.broker import Publisher
from api.db import Database
from api.deps import Clients
from api.limits import BodySizeLimit
from api.metrics import MetricsMiddleware
from api.results import GenerationCache, ResultReader
from api.routes import batches, drift, feedback, health, page, playlists
from api.sync import SyncRequester
from shared.generations import GenerationKeys
from shared.settings import Settings, get_settings
from shared.store import Keys

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the gateway app. Connections open in the lifespan, not here."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        publisher = Publisher(settings)
        redis = Redis.from_url(str(settings.redis_url))
        await publisher.start()
        sync = SyncRequester(settings)
        await sync.start(publisher.connection)
        # Opens without waiting: the gateway serves recommendations while PostgreSQL is down.
        db = Database(settings)
        await db.open()
        app.state.clients = Clients(
            settings=settings,
            publisher=publisher,
            redis=redis,
            keys=Keys(settings.redis_prefix),
            results=ResultReader(
                redis,
                Keys(settings.redis_prefix),
                GenerationCache(
                    redis,
                    GenerationKeys(settings.redis_prefix),
                    settings.read_depth,
                    settings.generation_refresh_s,
                ),
            ),
            sync=sync,
            db=db,
        )
        # Everything built so far lives as long as the process: keep it out of the cyclic
        # collector's full passes, which otherwise stall every request for tens of ms.
        gc.freeze()
        log.info("gateway ready: queue %s", settings.jobs_queue)
        try:
            yield
        finally:
            await publisher.close()
            await redis.aclose()
            await db.close()

    app = FastAPI(
        title="recfleet gateway",
        version="0.1.0",
        summary="Submit users for daily playlist ranking and read their recommendations.",
        lifespan=lifespan,
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware)
    app.include_router(batches.router)
    app.include_router(drift.router)
    app.include_router(playlists.router)
    app.include_router(health.router)
    app.include_router(feedback.router)
    app.include_router(page.router)
    app.mount("/static", page.static_files(), name="static")
    return app
