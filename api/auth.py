"""Who may call what: API keys with roles, and the feedback page's signed tokens.

API keys are bearer tokens (``Authorization: Bearer <key>``). The gateway keeps only the
SHA-256 of each key (a key is 32 random bytes, so a plain hash is enough: nothing to
brute-force), with its roles, read from ``RECFLEET_API_KEYS`` and/or the file named by
``RECFLEET_API_KEYS_FILE``: entries ``name:sha256-hex:role+role``, separated by commas or
new lines (``#`` starts a comment). ``recfleet keys new`` mints a key and prints its entry.

Roles: ``submit`` (batches, append, seal, sync), ``read`` (results, batch status, drift
reports), ``feedback`` (impressions, likes), ``operator`` (drift pins, ``/metrics``).
A missing or unknown key is 401, a key without the role 403, both with a short reason.

With no keys configured the gateway is open; ``Settings`` refuses that in production.

The feedback page carries no key. ``GET /`` embeds a page token (an HMAC of the server's
``RECFLEET_PAGE_SECRET``), which lets the page's script record impressions; each
impression it records answers with a like token bound to that impression id, and a like
sent with a page's credentials is recorded only for the impression its token names.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar
from uuid import UUID

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from recfleet.shared.errors import PermanentError
from recfleet.shared.settings import Settings

log = logging.getLogger(__name__)

PAGE_TOKEN_HEADER = "X-Page-Token"
LIKE_TOKEN_HEADER = "X-Like-Token"
PAGE_TOKEN_TTL_S = 12 * 3600
LIKE_TOKEN_TTL_S = 12 * 3600
KEY_BYTES = 32


class Role(enum.StrEnum):
    SUBMIT = "submit"
    READ = "read"
    FEEDBACK = "feedback"
    OPERATOR = "operator"


class Unauthorized(PermanentError):
    """No credentials, or credentials the gateway does not know."""

    status_code = 401
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": "Bearer"}


class Forbidden(PermanentError):
    """Known credentials without the role the operation needs."""

    status_code = 403


class KeyFileError(ValueError):
    """An API key entry that does not parse."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    roles: frozenset[Role]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh high-entropy key (43 URL-safe characters)."""
    return secrets.token_urlsafe(KEY_BYTES)


def entry(name: str, key: str, roles: list[Role]) -> str:
    """The configuration entry of ``key``: what ``RECFLEET_API_KEYS`` holds."""
    return f"{name}:{hash_key(key)}:{'+'.join(r.value for r in roles)}"


def parse_keys(text: str) -> list[ApiKey]:
    """Parse entries ``name:sha256-hex:role+role`` (comma or newline separated).

    Raises KeyFileError naming the first entry that does not parse.
    """
    keys = []
    for raw in text.replace(",", "\n").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(":")
        if len(parts) != 3:
            raise KeyFileError(f"API key entry {line[:40]!r}: want name:sha256-hex:role+role")
        name, digest, roles = (p.strip() for p in parts)
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise KeyFileError(f"API key {name!r}: the hash is not 64 lower-case hex digits")
        try:
            parsed = frozenset(Role(r.strip()) for r in roles.split("+"))
        except ValueError as exc:
            raise KeyFileError(f"API key {name!r}: roles are {[r.value for r in Role]}") from exc
        keys.append(ApiKey(name, digest, parsed))
    return keys


def load_keys(settings: Settings) -> list[ApiKey]:
    """The keys of ``RECFLEET_API_KEYS`` and ``RECFLEET_API_KEYS_FILE``.

    Raises KeyFileError for an entry that does not parse, OSError for an unreadable file.
    """
    text = settings.api_keys.get_secret_value()
    if settings.api_keys_file is not None:
        text += "\n" + Path(settings.api_keys_file).read_text()
    return parse_keys(text)


class Guard:
    """The gateway's keys and page secret, built once by the lifespan."""

    def __init__(self, keys: list[ApiKey], page_secret: bytes) -> None:
        self.keys = keys
        self.page_secret = page_secret

    @property
    def open(self) -> bool:
        """No keys configured: every operation is allowed (development only)."""
        return not self.keys

    def lookup(self, key: str) -> ApiKey | None:
        """The key whose hash matches; every entry is compared in constant time."""
        digest = hash_key(key)
        found = None
        for candidate in self.keys:
            if hmac.compare_digest(candidate.sha256, digest):
                found = candidate
        return found

    def sign(self, scope: str, ttl_s: float) -> str:
        expires = int(time.time() + ttl_s)
        return f"{expires}.{self._mac(scope, expires)}"

    def verify(self, token: str, scope: str) -> bool:
        expires, _, mac = token.partition(".")
        if not expires.isdigit() or len(expires) > 12 or int(expires) < time.time():
            return False
        return hmac.compare_digest(mac, self._mac(scope, int(expires)))

    def _mac(self, scope: str, expires: int) -> str:
        message = f"{scope}|{expires}".encode()
        return hmac.new(self.page_secret, message, hashlib.sha256).hexdigest()


def build_guard(settings: Settings) -> Guard:
    """Load the keys and the page secret; warn loudly when the gateway is open.

    Raises KeyFileError or OSError when the keys cannot be loaded.
    """
    keys = load_keys(settings)
    secret = settings.page_secret.get_secret_value().encode() if settings.page_secret else b""
    if not secret:
        # Tokens then die with the process; several replicas need one shared secret.
        secret = secrets.token_bytes(32)
    guard = Guard(keys, secret)
    if guard.open:
        log.warning(
            "NO API KEYS CONFIGURED: every operation is open to anyone who reaches the "
            "port (environment %s); set RECFLEET_API_KEYS before exposing the gateway",
            settings.environment,
        )
    else:
        log.info("API keys: %d configured", len(keys))
    return guard


async def get_guard(request: Request) -> Guard:
    # async: FastAPI runs a plain-def dependency through the thread pool, a hop that
    # costs more CPU than the whole read on GET /api/playlist/{user_id}.
    guard: Guard = request.app.state.guard
    return guard


bearer = HTTPBearer(
    auto_error=False,
    description="an API key (`recfleet keys new`); the operation names the role it needs",
)
page_token = APIKeyHeader(
    name=PAGE_TOKEN_HEADER,
    auto_error=False,
    scheme_name="PageToken",
    description="the feedback page's own token (served with the page); no key in the browser",
)
GuardDep = Annotated[Guard, Depends(get_guard)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]


def _check(guard: Guard, credentials: HTTPAuthorizationCredentials | None, role: Role) -> None:
    if credentials is None:
        raise Unauthorized(f"an API key is required (Authorization: Bearer <key>, role {role})")
    key = guard.lookup(credentials.credentials)
    if key is None:
        raise Unauthorized("unknown API key")
    if role not in key.roles:
        raise Forbidden(f"API key {key.name!r} lacks the {role} role")


def authorize(request: Request, role: Role) -> None:
    """The check of ``require`` done in the route itself, for the hottest route, where
    resolving the dependencies costs more than the read. Declare the scheme on such a
    route with ``openapi_extra=BEARER_OPENAPI``.

    Raises Unauthorized (401) without a known key, Forbidden (403) without the role.
    """
    guard: Guard = request.app.state.guard
    if guard.open:
        return
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials:
        _check(guard, None, role)
    else:
        _check(guard, HTTPAuthorizationCredentials(scheme=scheme, credentials=credentials), role)


# What ``Security(bearer)`` adds to an operation's OpenAPI description.
BEARER_OPENAPI: dict[str, Any] = {"security": [{"HTTPBearer": []}]}


def require(role: Role) -> Callable[..., Coroutine[Any, Any, None]]:
    """A dependency that lets a request through only with a key that has ``role``.

    Raises Unauthorized (401) without a known key, Forbidden (403) without the role.
    """

    async def dependency(guard: GuardDep, credentials: Credentials) -> None:
        if not guard.open:
            _check(guard, credentials, role)

    dependency.__name__ = f"require_{role}"
    return dependency


@dataclass(frozen=True)
class FeedbackCaller:
    """Who records feedback: a key with the feedback role, or the page with a token."""

    page_token: str | None  # None for a key (or an open gateway)


async def feedback_caller(
    guard: GuardDep,
    credentials: Credentials,
    token: Annotated[str | None, Security(page_token)] = None,
) -> FeedbackCaller:
    """A key with the feedback role, or a page token (checked by the route against what
    it allows). Raises Unauthorized or Forbidden."""
    if guard.open:
        return FeedbackCaller(None)
    if credentials is None and token is not None:
        return FeedbackCaller(token[:200])
    _check(guard, credentials, Role.FEEDBACK)
    return FeedbackCaller(None)


FeedbackCallerDep = Annotated[FeedbackCaller, Depends(feedback_caller)]


def page_scope() -> str:
    return "page"


def like_scope(impression_id: UUID) -> str:
    return f"like:{impression_id}"


def check_page(guard: Guard, caller: FeedbackCaller, scope: str, refusal: str) -> None:
    """Let a page caller through only with a token signed for ``scope``.

    Raises Forbidden(``refusal``) when the token is invalid, expired, or for another scope.
    """
    if caller.page_token is not None and not guard.verify(caller.page_token, scope):
        raise Forbidden(refusal)
