"""The FastAPI application and its lifespan, which owns every client."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from recfleet.api.broker import Publisher
from recfleet.api.db import Database
from recfleet.api.deps import Clients
from recfleet.api.limits import BodySizeLimit
from recfleet.api.metrics import MetricsMiddleware
from recfleet.api.results import GenerationCache, ResultReader
from recfleet.api.routes import batches, drift, feedback, health, page, playlists
from recfleet.api.sync import SyncRequester
from recfleet.shared.generations import GenerationKeys
from recfleet.shared.redis import async_redis_client
from recfleet.shared.settings import Settings, get_settings
from recfleet.shared.store import Keys

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the gateway app. Connections open in the lifespan, not here."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        publisher = Publisher(settings)
        redis = async_redis_client(settings)
        sync = SyncRequester(settings)
        publisher.on_connect(sync.start)
        # Returns even when the broker is down: /readyz says 503 until it connects.
        await publisher.start()
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
    app.add_exception_handler(RedisConnectionError, _redis_unavailable)
    app.add_exception_handler(RedisTimeoutError, _redis_unavailable)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    return app


async def _http_error(request: Request, exc: Exception) -> Response:
    """FastAPI answers 400 when a JSON body is not even text (not UTF-8). The contract
    says any bad body is 422 with the reason, so it is, in the usual validation format."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        error = {"type": "json_invalid", "loc": ["body"], "msg": "body is not UTF-8 JSON"}
        return JSONResponse({"detail": [{**error, "input": {}}]}, status_code=422)
    return await http_exception_handler(request, exc)


async def _redis_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    """Redis down (or still loading its data after a restart) is an outage, not a bug:
    503 with Retry-After, so clients come back instead of giving up on a 500."""
    log.warning("Redis unavailable: %r", exc)
    return JSONResponse(
        {"detail": "Redis is unavailable; retry later"},
        status_code=503,
        headers={"Retry-After": "5"},
    )
