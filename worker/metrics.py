"""The worker's Prometheus collectors (one registry per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from recfleet.shared import metrics as names
from recfleet.shared.drift import POPULARITY_LABELS

_JOB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

JOBS = Counter(names.WORKER_JOBS, "Jobs handled", ["outcome"])
USERS = Counter(names.WORKER_USERS, "Users ranked and written")
COLD_USERS = Counter(names.WORKER_COLD_USERS, "Users given the fallback list")
JOB_DURATION = Histogram(names.WORKER_JOB_DURATION, "Whole job time", buckets=_JOB_BUCKETS)
RANK_DURATION = Histogram(names.WORKER_RANK_DURATION, "Ranking time per job", buckets=_JOB_BUCKETS)
REDIS_WRITE_DURATION = Histogram(
    names.WORKER_REDIS_WRITE_DURATION, "Redis write time per job", buckets=_JOB_BUCKETS
)
CANDIDATES = Histogram(
    names.WORKER_CANDIDATES,
    "Mean candidates per user, one observation per job",
    buckets=(0, 10, 20, 40, 60, 80, 100, 200),
)
CANDIDATES_TOTAL = Counter(names.WORKER_CANDIDATES_TOTAL, "Candidates scored")
REDELIVERIES = Counter(names.WORKER_REDELIVERIES, "Jobs received as redeliveries")
DEAD_LETTERED = Counter(names.WORKER_DEAD_LETTERED, "Jobs dead-lettered by this worker", ["reason"])
MODEL_INFO = Gauge(names.MODEL_INFO, "Model version loaded by this worker", ["model_version"])
RECOMMENDED = Counter(
    names.RECOMMENDED_BY_POPULARITY,
    "Recommended playlists by popularity-rank bucket of the playlist",
    ["popularity_bucket"],
)
QUEUE_MESSAGES = Gauge(names.QUEUE_MESSAGES, "Messages ready in a queue", ["queue"])
QUEUE_CONSUMERS = Gauge(names.QUEUE_CONSUMERS, "Consumers of a queue", ["queue"])

# Every known label value exported from the start, so rates and alerts see a zero
# rather than no series at all.
for _outcome in ("done", "dead", "requeued"):
    JOBS.labels(_outcome)
DEAD_LETTERED.labels("undecodable")
DEAD_LETTERED.labels("failed")
for _bucket in POPULARITY_LABELS:
    RECOMMENDED.labels(_bucket)
