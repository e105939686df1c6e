"""The small error tree shared by both sides.

Retries are decided in one place, the worker's consumer: a ``TransientError``
is requeued with backoff, a ``PermanentError`` is dead-lettered at once.
"""

from __future__ import annotations


class RecfleetError(Exception):
    """Base of every error recfleet raises on purpose."""


class TransientError(RecfleetError):
    """A dependency is unavailable for now; the same work may succeed later."""


class PermanentError(RecfleetError):
    """The work itself is wrong; retrying it can never succeed."""


class UndecodableMessage(PermanentError):
    """A message body that is not a valid job. Keeps the raw bytes for the dead-letter queue."""

    def __init__(self, reason: str, raw: bytes) -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


class ArtifactError(RecfleetError):
    """An artifact directory is missing a file, corrupt, or of another format version."""
