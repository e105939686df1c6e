"""The FastAPI application and its lifespan, which owns every client."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from recfleet.api.broker import Publisher
from recfleet.api.db import Database
from recfleet.api.limits import BodySizeLimit
from recfleet.api.metrics import MetricsMiddleware
from recfleet.api.results import GenerationCache, ResultReader
from recfleet.api.routes import batches, drift, feedback, health, page, playlists
from recfleet.api.sync import SyncRequester
from recfleet.shared.errors import RecfleetError, TransientError
from recfleet.shared.keys import Keys
from recfleet.shared.settings import Settings, get_settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the gateway app. Connections open in the lifespan, not here."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        publisher = Publisher(settings)
        redis = Redis.from_url(str(settings.redis_url))
        sync = SyncRequester(settings)
        publisher.on_connect(sync.start)
        # Returns even when the broker is down: /readyz says 503 until it connects.
        await publisher.start()
        # Opens without waiting: the gateway serves recommendations while PostgreSQL is down.
        db = Database(settings)
        await db.open()
        # One attribute per resource; api/deps.py hands each to the routes that use it.
        state = app.state
        state.settings, state.publisher, state.redis, state.sync, state.db = (
            settings,
            publisher,
            redis,
            sync,
            db,
        )
        state.keys = Keys(settings.redis_prefix)
        state.results = ResultReader(
            redis,
            state.keys,
            GenerationCache(
                redis,
                state.keys,
                settings.read_depth,
                settings.generation_refresh_s,
            ),
        )
        stop_monitor = asyncio.Event()
        monitor = asyncio.create_task(drift.monitor(redis, settings, stop_monitor), name="monitor")
        # Everything built so far lives as long as the process: keep it out of the cyclic
        # collector's full passes, which otherwise stall every request for tens of ms.
        gc.freeze()
        log.info("gateway ready: queue %s", settings.jobs_queue)
        try:
            yield
        finally:
            # The event, not only the cancel: a cancel that lands in an HTTP client's own
            # timeout can come back as a timeout error, which the monitor would survive.
            stop_monitor.set()
            monitor.cancel()
            await asyncio.wait([monitor], timeout=10)
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
    app.add_exception_handler(RecfleetError, _recfleet_error)
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


async def _recfleet_error(_request: Request, exc: Exception) -> JSONResponse:
    """The one place an error becomes an answer: its status, its short detail, and
    ``Retry-After`` when it is transient."""
    assert isinstance(exc, RecfleetError)
    retry_after = exc.retry_after_s
    if exc.transient:
        log.warning("%s: %s", type(exc).__name__, exc.detail)
    return JSONResponse(
        {"detail": exc.detail},
        status_code=exc.status_code,
        headers={"Retry-After": str(retry_after)} if retry_after is not None else None,
    )


async def _redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """Redis down (or still loading its data after a restart) is an outage, not a bug:
    503 with Retry-After, so clients come back instead of giving up on a 500."""
    log.warning("Redis unavailable: %r", exc)
    return await _recfleet_error(request, RedisUnavailable("Redis is unavailable; retry later"))


class RedisUnavailable(TransientError):
    """Redis refused or timed out (the redis-py errors, seen as recfleet's)."""
