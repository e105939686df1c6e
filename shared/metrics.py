"""Metric names: the gateway and workers export them, dashboards and alert rules query them.

Only names live here; each process defines its own collectors.
"""

from __future__ import annotations

# Gateway
HTTP_REQUESTS = "recfleet_http_requests_total"  # labels: route, method, status
HTTP_DURATION = "recfleet_http_request_duration_seconds"  # labels: route, method
JOBS_PUBLISHED = "recfleet_jobs_published_total"
USERS_PUBLISHED = "recfleet_users_published_total"
PUBLISH_FAILURES = "recfleet_publish_failures_total"  # labels: reason
BATCHES_ACCEPTED = "recfleet_batches_accepted_total"

# Worker
WORKER_JOBS = "recfleet_worker_jobs_total"  # labels: outcome = done | dead | requeued
WORKER_USERS = "recfleet_worker_users_total"
WORKER_COLD_USERS = "recfleet_worker_cold_users_total"
WORKER_JOB_DURATION = "recfleet_worker_job_duration_seconds"
WORKER_RANK_DURATION = "recfleet_worker_rank_duration_seconds"
WORKER_REDIS_WRITE_DURATION = "recfleet_worker_redis_write_duration_seconds"
WORKER_CANDIDATES = "recfleet_worker_candidates_per_user"  # per-job mean
WORKER_CANDIDATES_TOTAL = "recfleet_worker_candidates_total"
WORKER_REDELIVERIES = "recfleet_worker_redeliveries_total"
WORKER_DEAD_LETTERED = "recfleet_worker_dead_lettered_total"  # labels: reason
MODEL_INFO = "recfleet_model_info"  # labels: model_version; value 1
RECOMMENDED_BY_POPULARITY = "recfleet_recommended_total"  # labels: popularity_bucket

# Queue (sampled by workers through a passive declare)
QUEUE_MESSAGES = "recfleet_queue_messages"  # labels: queue
QUEUE_CONSUMERS = "recfleet_queue_consumers"  # labels: queue

# Feedback (gateway; the CTR gauges are refreshed from PostgreSQL every minute)
FEEDBACK_CTR = "recfleet_feedback_ctr"  # labels: model_version; impressions liked, last 24 h
FEEDBACK_WINDOW_IMPRESSIONS = "recfleet_feedback_window_impressions"  # labels: model_version
FEEDBACK_IMPRESSIONS = "recfleet_feedback_impressions_total"  # labels: model_version
FEEDBACK_LIKES = "recfleet_feedback_likes_total"  # labels: model_version
FEEDBACK_FAILURES = "recfleet_feedback_failures_total"  # labels: reason

# Queue, sampled by the gateway from the broker's management API (also ready and consumers,
# under the names above, so the figures survive a fleet with no worker running)
QUEUE_UNACKED = "recfleet_queue_messages_unacked"  # labels: queue

# Batches and drift (gateway; refreshed from the batch ledgers in Redis every few seconds)
BATCHES_RECENT = "recfleet_batches_recent"  # labels: state; batches with progress in 15 min
DRIFT_COLD_FRACTION = "recfleet_drift_cold_fraction"  # labels: batch_id; latest finished batch
DRIFT_CHI2 = "recfleet_drift_chi2_statistic"  # labels: batch_id, reference_id
DRIFT_P_VALUE = "recfleet_drift_chi2_p_value"  # labels: batch_id, reference_id
DRIFT_CRAMERS_V = "recfleet_drift_cramers_v"  # labels: batch_id, reference_id
