"""Security headers on every answer: no sniffing, no framing, a strict CSP.

The feedback page loads its script and stylesheet from ``/static`` and talks only to
the gateway; JSON answers need nothing at all. ``/docs`` and ``/redoc`` (Swagger UI and
ReDoc, served from the fastapi-offline package) start with a small inline script, so
their policy allows inline code and nothing from elsewhere.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
DOCS_CSP = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; base-uri 'none'; "
    "frame-ancestors 'none'"
)
API_CSP = "default-src 'none'; frame-ancestors 'none'"
DOCS_PATHS = ("/docs", "/redoc")
COMMON = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


def policy(path: str) -> str:
    """The content security policy of the answers under ``path``."""
    if path == "/" or path.startswith("/static/"):
        return PAGE_CSP
    if path.startswith(DOCS_PATHS):
        return DOCS_CSP
    return API_CSP


# The headers each policy adds, built once.
EXTRA = {
    csp: [*COMMON, (b"content-security-policy", csp.encode())]
    for csp in (PAGE_CSP, DOCS_CSP, API_CSP)
}


class SecurityHeaders:
    """Adds the security headers to every HTTP answer (any the app set itself stay)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = EXTRA[policy(scope["path"])]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(n, v) for n, v in extra if n not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
