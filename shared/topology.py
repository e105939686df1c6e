"""Broker topology: the same queue arguments on both sides, or RabbitMQ refuses the declare."""

from __future__ import annotations

from typing import Any

from recfleet.shared.settings import Settings

# Headers on every job message, visible in the management UI.
HEADER_BATCH_ID = "x-recfleet-batch-id"
HEADER_USERS = "x-recfleet-users"
HEADER_SCHEMA = "x-recfleet-schema"
# Set by the worker when it dead-letters a message itself, to say why.
HEADER_DEAD_REASON = "x-recfleet-dead-reason"


def jobs_queue_arguments(settings: Settings) -> dict[str, Any]:
    """Arguments of the durable quorum jobs queue.

    A message is dead-lettered (at least once, which needs reject-publish overflow)
    after ``delivery_limit`` deliveries, so a job that keeps crashing workers ends
    in the dead-letter queue instead of looping forever.
    """
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": settings.delivery_limit,
        "x-dead-letter-exchange": settings.dead_letter_exchange,
        "x-dead-letter-routing-key": settings.dead_letter_queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-max-length": settings.queue_max_length,
    }


def dead_letter_queue_arguments(settings: Settings) -> dict[str, Any]:
    """Arguments of the durable quorum dead-letter queue (no limit, no further dead-lettering)."""
    return {"x-queue-type": "quorum"}


def sync_queue_arguments(settings: Settings) -> dict[str, Any]:
    """A classic queue whose messages expire with the request: nobody waits for them after."""
    return {"x-message-ttl": int(settings.sync_timeout_s * 1000)}


def dead_events_queue_arguments(settings: Settings) -> dict[str, Any]:
    return {"x-queue-type": "quorum"}


def queue_names(settings: Settings) -> tuple[str, ...]:
    """Every queue recfleet declares under these settings."""
    return (
        settings.jobs_queue,
        settings.dead_letter_queue,
        settings.dead_events_queue,
        settings.sync_queue,
    )
