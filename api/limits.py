"""What one request may cost the gateway: body size and read time, concurrency, header
size and read time, and a JSON parser that refuses what is not plain JSON.

The ASGI parts (``BodyLimits``, ``ConcurrencyLimit``, ``OrjsonRoute``) work under any
server; the transport parts (header size and read deadline, idle keep-alive) are
uvicorn's httptools protocol with a header size bound and deadline added, started by
``run_gateway``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from recfleet.shared.settings import Settings

log = logging.getLogger(__name__)

# A big body is parsed and validated in separate steps of the event loop, so a request
# waiting behind it (a health probe) waits for one step, not the whole rejection.
YIELD_ABOVE_BYTES = 64 * 1024
# Probes answer even when the gateway is at its concurrency limit.
UNLIMITED_PATHS = frozenset({"/healthz", "/readyz"})


def _json_answer(status: int, detail: str, headers: dict[str, str] | None = None) -> list[Message]:
    body = orjson.dumps({"detail": detail})
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return [
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
        },
        {"type": "http.response.body", "body": body},
    ]


class BodyLimits:
    """Answer 413 when a body is larger than ``max_bytes`` and 408 when it does not arrive
    within ``timeout_s`` of the first read.

    A declared ``Content-Length`` over the limit is refused before reading anything; a
    chunked body is counted as it arrives and refused as soon as it passes the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is None and b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body to bound (a GET, a probe)
            return
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, 413, f"request body larger than {self.max_bytes} bytes")
            return
        seen = 0
        refused = complete = False
        deadline: float | None = None

        async def guarded_receive() -> Message:
            nonlocal seen, refused, complete, deadline
            if refused:
                return {"type": "http.disconnect"}
            if complete:  # only a disconnect is left to wait for: no deadline on that
                return await receive()
            now = time.monotonic()
            deadline = deadline or now + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(deadline - now, 0.001))
            except TimeoutError:
                refused = True
                await self._refuse(send, 408, f"request body not received in {self.timeout_s:g} s")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                complete = not message.get("more_body", False)
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Answer now, and tell the app the client is gone so it stops reading.
                    refused = True
                    await self._refuse(
                        send, 413, f"request body larger than {self.max_bytes} bytes"
                    )
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, guarded_receive, guarded_send)

    @staticmethod
    async def _refuse(send: Send, status: int, detail: str) -> None:
        for message in _json_answer(status, detail, {"connection": "close"}):
            await send(message)


class ConcurrencyLimit:
    """At most ``limit`` requests in progress; past it, ``503`` with ``Retry-After`` at
    once (no queueing), except for the health probes."""

    def __init__(self, app: ASGIApp, limit: int, retry_after_s: int = 1) -> None:
        self.app = app
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            headers = {"retry-after": str(self.retry_after_s)}
            for message in _json_answer(503, "the gateway is busy; retry later", headers):
                await send(message)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class OrjsonRequest(Request):
    """A request whose JSON body is parsed by orjson: NaN, Infinity, numbers that overflow
    a double and nesting deeper than 1024 are errors (FastAPI answers 422), and integers
    beyond 64 bits come out as floats, which integer fields refuse."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if len(body) > YIELD_ABOVE_BYTES:
                await asyncio.sleep(0)  # let waiting requests (probes) in before parsing
            self._json = orjson.loads(body)
            if len(body) > YIELD_ABOVE_BYTES:
                await asyncio.sleep(0)  # and again before validating what came out
        return self._json


class OrjsonRoute(APIRoute):
    """The route class of every router: bodies parsed with ``OrjsonRequest``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def orjson_handler(request: Request) -> Response:
            return await handler(OrjsonRequest(request.scope, request.receive))

        return orjson_handler


class HeadTooLarge(Exception):
    """A request line and headers longer than the gateway accepts."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on each request's line and headers and a
    deadline on their arrival.

    httptools itself bounds neither: a client could send megabytes of headers, or send
    them a byte at a time and keep the connection forever. The size is counted as the
    parser hands the pieces over, so the bound is exact whatever the reads; past it the
    parser stops (uvicorn answers 400 and closes). The deadline closes a connection whose
    request line and headers are not in ``header_timeout_s`` after it opened or after the
    previous answer.
    """

    header_timeout_s = 10.0
    max_header_bytes = 16 * 1024
    _header_deadline: asyncio.TimerHandle | None = None
    _head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)  # with ": " and the line end
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()  # the request's headers are in
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline()

    def _count(self, n: int) -> None:
        """Raises HeadTooLarge past the bound (the parser turns it into a parse error)."""
        self._head_bytes += n
        if self._head_bytes > self.max_header_bytes:
            raise HeadTooLarge(f"request line and headers over {self.max_header_bytes} bytes")

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        idle = self.cycle is None or self.cycle.response_complete  # no request under way
        if idle and not self.transport.is_closing():
            self.transport.close()


def run_gateway(app: ASGIApp, settings: Settings, host: str, port: int) -> None:
    """Serve ``app`` with uvicorn and the transport limits of ``settings``."""
    import uvicorn

    uvicorn.run(app, **server_options(settings), host=host, port=port)


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for the gateway: httptools with bounded headers, a header
    deadline and idle keep-alive; a connection limit above the app's own request limit
    (the app answers 503 with Retry-After first, uvicorn's bare 503 is the backstop)."""
    protocol = type(
        "GatewayHttpProtocol",
        (BoundedHttpToolsProtocol,),
        {
            "header_timeout_s": settings.header_timeout_s,
            "max_header_bytes": settings.max_header_bytes,
        },
    )
    return {
        "http": protocol,
        "timeout_keep_alive": settings.keep_alive_s,
        "limit_concurrency": settings.max_concurrency * 2 + 16,
        "log_level": settings.log_level.lower(),
        "access_log": False,
    }
