"""The FastAPI application and its lifespan, which owns every client."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import start_http_server
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from recfleet.api.auth import build_guard
from recfleet.api.broker import Publisher
from recfleet.api.db import Database
from recfleet.api.headers import SecurityHeaders
from recfleet.api.limits import BodyLimits, ConcurrencyLimit
from recfleet.api.metrics import REGISTRY, MetricsMiddleware
from recfleet.api.results import GenerationCache, ResultReader
from recfleet.api.routes import batches, drift, feedback, health, page, playlists
from recfleet.api.schemas import Problem
from recfleet.api.sync import SyncRequester
from recfleet.shared.errors import RecfleetError, TransientError
from recfleet.shared.keys import Keys
from recfleet.shared.redis import async_redis_client
from recfleet.shared.settings import Settings, get_settings

log = logging.getLogger(__name__)
MAX_ERRORS_SHOWN = 5


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the gateway app. Connections open in the lifespan, not here."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        publisher = Publisher(settings)
        redis = async_redis_client(settings)
        sync = SyncRequester(settings, publisher.router)
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
            GenerationCache(redis, state.keys, settings.generation_refresh_s),
        )
        metrics_server = None
        if settings.api_metrics_port:
            metrics_server, _ = start_http_server(
                settings.api_metrics_port, addr=settings.api_host, registry=REGISTRY
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
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            await publisher.close()
            await redis.aclose()
            await db.close()

    app = FastAPIOffline(
        title="recfleet gateway",
        version="0.1.0",
        summary="Submit users for daily playlist ranking and read their recommendations.",
        lifespan=lifespan,
    )
    # Built here, not in the lifespan: it opens no connection, and a gateway with a bad
    # key file must refuse to start before anything else happens.
    app.state.guard = build_guard(settings)
    # Outermost last: the limit answers before anything is read; headers go on every answer.
    app.add_middleware(
        BodyLimits, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(ConcurrencyLimit, limit=settings.max_concurrency)
    # Routes match in order: the hottest (GET /api/playlist/{user_id}) first.
    for router in (playlists, batches, drift, health, feedback, page):
        app.include_router(router.router)
    app.mount("/static", page.static_files(), name="static")
    app.add_exception_handler(RecfleetError, _recfleet_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(RedisConnectionError, _redis_unavailable)
    app.add_exception_handler(RedisTimeoutError, _redis_unavailable)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, plus the 401 and 403 answers of every operation that needs a key."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        problem = {"$ref": "#/components/schemas/Problem"}
        for path in schema["paths"].values():
            for operation in path.values():
                if operation.get("security"):
                    responses = operation.setdefault("responses", {})
                    for code, text in (
                        ("401", "no API key, or an unknown one"),
                        ("403", "the key lacks the role"),
                    ):
                        responses.setdefault(
                            code,
                            {
                                "description": text,
                                "content": {"application/json": {"schema": problem}},
                            },
                        )
        schema.setdefault("components", {}).setdefault("schemas", {}).setdefault(
            "Problem", Problem.model_json_schema()
        )
        app.openapi_schema = schema
    return app.openapi_schema


def _bounded(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """The first few errors, each without its input and with short strings: an answer of a
    few hundred bytes whatever the body was."""
    shown = []
    for error in errors[:MAX_ERRORS_SHOWN]:
        loc = [part if isinstance(part, int) else str(part)[:64] for part in error.get("loc", ())]
        shown.append(
            {
                "type": str(error.get("type", ""))[:64],
                "loc": loc[:8],
                "msg": str(error.get("msg", ""))[:200],
            }
        )
    return shown


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    """422 with the first few errors, none of them echoing the input."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    return JSONResponse({"detail": _bounded(errors), "errors": len(errors)}, status_code=422)


async def _http_error(request: Request, exc: Exception) -> Response:
    """FastAPI answers 400 when a JSON body is not even text (not UTF-8). The contract
    says any bad body is 422 with the reason, so it is, in the usual validation format."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        error = {"type": "json_invalid", "loc": ["body"], "msg": "body is not UTF-8 JSON"}
        return JSONResponse({"detail": [error], "errors": 1}, status_code=422)
    return await http_exception_handler(request, exc)


async def _recfleet_error(_request: Request, exc: Exception) -> JSONResponse:
    """The one place an error becomes an answer: its status, its short detail, and
    ``Retry-After`` when it is transient."""
    assert isinstance(exc, RecfleetError)
    headers = dict(exc.headers)
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    if exc.transient:
        log.warning("%s: %s", type(exc).__name__, exc.detail)
    detail = exc.detail[:500]
    if exc.status_code == 422:  # every 422 has the one shape of a validation error
        error = {"type": type(exc).__name__, "loc": ["body"], "msg": detail}
        return JSONResponse({"detail": [error], "errors": 1}, status_code=422, headers=headers)
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=headers)


async def _redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """Redis down (or still loading its data after a restart) is an outage, not a bug:
    503 with Retry-After, so clients come back instead of giving up on a 500."""
    log.warning("Redis unavailable: %r", exc)
    return await _recfleet_error(request, RedisUnavailable("Redis is unavailable; retry later"))


class RedisUnavailable(TransientError):
    """Redis refused or timed out (the redis-py errors, seen as recfleet's)."""
