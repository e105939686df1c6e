"""The small error tree shared by both sides.

Every error says whether it is transient and which HTTP status it maps to:

- ``TransientError``: a dependency is unavailable for now. The worker's consumer
  retries it with backoff; the gateway answers its ``status_code`` (503 unless a
  subclass says otherwise) with ``Retry-After``.
- ``PermanentError``: the work itself is wrong. The consumer dead-letters it at once;
  the gateway answers its 4xx ``status_code``.

Retries are decided in one place, the worker's consumer; HTTP answers in one place, the
gateway's handler of ``RecfleetError`` (``api/app.py``).
"""

from __future__ import annotations

from typing import ClassVar

# How long a client should wait before retrying an answer to a transient failure.
RETRY_AFTER_S = 5


class RecfleetError(Exception):
    """Base of every error recfleet raises on purpose.

    ``status_code`` is the HTTP status the gateway answers with; ``transient`` says
    whether the same request may succeed later (then the answer carries ``Retry-After``).
    The message is the answer's ``detail``: short, and never an echo of the input.
    """

    status_code: ClassVar[int] = 500
    transient: ClassVar[bool] = False
    headers: ClassVar[dict[str, str]] = {}

    @property
    def detail(self) -> str:
        return str(self) or type(self).__name__

    @property
    def retry_after_s(self) -> int | None:
        return RETRY_AFTER_S if self.transient else None


class TransientError(RecfleetError):
    """A dependency is unavailable for now; the same work may succeed later."""

    status_code = 503
    transient = True


class PermanentError(RecfleetError):
    """The work itself is wrong; retrying it can never succeed."""

    status_code = 422


class NotFound(PermanentError):
    """The thing named does not exist (or no longer does)."""

    status_code = 404


class Conflict(PermanentError):
    """The request collides with the state of what it names."""

    status_code = 409


class TooLarge(PermanentError):
    """The request asks for more than one request may."""

    status_code = 413


class UndecodableMessage(PermanentError):
    """A message body that is not a valid job. Keeps the raw bytes for the dead-letter queue."""

    def __init__(self, reason: str, raw: bytes) -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


class ArtifactError(RecfleetError):
    """An artifact directory is missing a file, corrupt, or of another format version."""
