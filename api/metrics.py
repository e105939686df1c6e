"""The gateway's Prometheus collectors and the middleware that feeds the HTTP ones."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recfleet.shared import metrics as names

REGISTRY = CollectorRegistry(auto_describe=True)

HTTP_REQUESTS = Counter(
    names.HTTP_REQUESTS, "HTTP requests", ["route", "method", "status"], registry=REGISTRY
)
HTTP_DURATION = Histogram(
    names.HTTP_DURATION,
    "HTTP request latency",
    ["route", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
JOBS_PUBLISHED = Counter(names.JOBS_PUBLISHED, "Jobs confirmed by the broker", registry=REGISTRY)
USERS_PUBLISHED = Counter(names.USERS_PUBLISHED, "Users in confirmed jobs", registry=REGISTRY)
PUBLISH_FAILURES = Counter(
    names.PUBLISH_FAILURES, "Requests failed for want of a confirm", ["reason"], registry=REGISTRY
)
BATCHES_ACCEPTED = Counter(names.BATCHES_ACCEPTED, "Batches answered 202", registry=REGISTRY)

# Sampled by the drift router's monitor (api/routes/drift.py) every few seconds.
QUEUE_MESSAGES = Gauge(
    names.QUEUE_MESSAGES, "Messages ready in a queue", ["queue"], registry=REGISTRY
)
QUEUE_UNACKED = Gauge(
    names.QUEUE_UNACKED, "Messages delivered and not yet acked", ["queue"], registry=REGISTRY
)
QUEUE_CONSUMERS = Gauge(names.QUEUE_CONSUMERS, "Consumers of a queue", ["queue"], registry=REGISTRY)
BATCHES_RECENT = Gauge(
    names.BATCHES_RECENT, "Batches with progress in the last 15 min", ["state"], registry=REGISTRY
)
DRIFT_COLD_FRACTION = Gauge(
    names.DRIFT_COLD_FRACTION,
    "Cold-user fraction of the latest finished batch",
    ["batch_id"],
    registry=REGISTRY,
)
_DRIFT_LABELS = ["batch_id", "reference_id"]
DRIFT_CHI2 = Gauge(
    names.DRIFT_CHI2,
    "Chi-square statistic: popularity buckets of the latest finished batch vs its reference",
    _DRIFT_LABELS,
    registry=REGISTRY,
)
DRIFT_P_VALUE = Gauge(
    names.DRIFT_P_VALUE, "p-value of the drift chi-square test", _DRIFT_LABELS, registry=REGISTRY
)
DRIFT_CRAMERS_V = Gauge(
    names.DRIFT_CRAMERS_V,
    "Cramér's V of the drift test (effect size: 0 same distribution, 1 disjoint)",
    _DRIFT_LABELS,
    registry=REGISTRY,
)


class MetricsMiddleware:
    """Counts requests and times them by route template (bounded label values).

    The labelled children are kept: looking one up costs more than the observation."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._counts: dict[tuple[str, str, int], Any] = {}
        self._durations: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            method = scope.get("method", "")
            count = self._counts.get((template, method, status))
            if count is None:
                count = HTTP_REQUESTS.labels(template, method, str(status))
                self._counts[(template, method, status)] = count
            count.inc()
            duration = self._durations.get((template, method))
            if duration is None:
                duration = self._durations[(template, method)] = HTTP_DURATION.labels(
                    template, method
                )
            duration.observe(time.perf_counter() - start)
