"""The one settings object. Nothing else in recfleet reads the environment."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import (
    AmqpDsn,
    Field,
    PostgresDsn,
    RedisDsn,
    SecretStr,
    TypeAdapter,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Typed configuration, read from ``RECFLEET_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="RECFLEET_", env_file=None, extra="ignore")

    environment: Literal["development", "test", "production"] = "development"

    # One URL, or a comma-separated list of the nodes of a RabbitMQ cluster (see amqp_urls).
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    redis_url: RedisDsn = RedisDsn("redis://127.0.0.1:6379/0")
    # RECFLEET_REDIS_URL names any one node of a Redis Cluster (see shared.redis).
    redis_cluster: bool = False
    database_url: PostgresDsn = PostgresDsn("postgresql://postgres@127.0.0.1:5432/postgres")
    artifacts: Path = Path("artifacts/demo")

    # Broker topology. Tests give each run its own names.
    jobs_queue: str = "recfleet.jobs"
    dead_letter_exchange: str = "recfleet.dlx"
    dead_letter_queue: str = "recfleet.jobs.dlq"
    # A copy of every dead letter, consumed by workers to count it in its batch ledger.
    dead_events_queue: str = "recfleet.jobs.dead-events"
    # Small synchronous requests, served ahead of batch jobs (request/reply).
    sync_queue: str = "recfleet.sync"
    sync_timeout_s: float = Field(default=5.0, gt=0, le=60)
    max_users_sync: int = Field(default=100, ge=1, le=1000)
    delivery_limit: int = Field(default=5, ge=1, description="deliveries before dead-lettering")
    queue_max_length: int = Field(default=1_000_000, ge=1)
    # Members of each quorum queue on a RabbitMQ cluster (3 for a 3-node cluster); None on
    # one node. When set, the sync queues are quorum queues too (see shared.topology).
    quorum_replicas: int | None = Field(default=None, ge=1, le=9)

    # Redis key prefix; every key recfleet writes starts with it.
    redis_prefix: str = Field(default="rf", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    batch_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    # A batch opened (POST /api/batches) that never gets a user is forgotten sooner.
    open_batch_ttl_s: int = Field(default=3600, ge=60)
    # Generations: how often the gateway re-reads the active list, and the switch gates.
    generation_refresh_s: float = Field(default=1.0, gt=0)
    gate_min_coverage: float = Field(default=0.9, ge=0, le=1)
    gate_max_dead_fraction: float = Field(default=0.01, ge=0, le=1)
    gate_max_cold_fraction: float = Field(default=0.5, ge=0, le=1)

    # Gateway limits.
    job_size: int = Field(default=1000, ge=1, le=1000)
    max_users_per_request: int = Field(default=100_000, ge=1)
    publish_timeout_s: float = Field(default=10.0, gt=0)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    idempotency_window_s: int = Field(default=24 * 3600, ge=1)

    # Worker.
    prefetch: int = Field(default=4, ge=1, le=1000)
    top_k: int = Field(default=10, ge=1, le=100)
    heartbeat_s: int = Field(default=30, ge=0)
    torch_threads: int = Field(default=1, ge=1)
    # The shard of a sharded model this worker serves (recfleet worker --shard K).
    shard: int | None = Field(default=None, ge=0)
    metrics_port: int = Field(default=9100, ge=0, le=65535)
    # /healthz turns 503 while one job has run longer than this (a stuck compute lane).
    job_stuck_after_s: float = Field(default=300.0, gt=0)

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    # The gateway's /metrics on a port of its own (0: none), for Prometheus on the private
    # network; on the public port /metrics needs an operator key.
    api_metrics_port: int = Field(default=0, ge=0, le=65535)

    # Authentication (api/auth.py). The gateway's keys: entries name:sha256-hex:role+role,
    # comma or newline separated, here and/or in a file (a mounted Secret).
    api_keys: SecretStr = SecretStr("")
    api_keys_file: Path | None = None
    # The key the CLI, the demo and the scheduler send (Authorization: Bearer).
    api_key: SecretStr | None = None
    # Signs the feedback page's tokens; every gateway replica needs the same one.
    page_secret: SecretStr | None = None

    # Transport limits the gateway enforces itself (cli: recfleet api).
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    header_timeout_s: float = Field(default=10.0, gt=0)
    keep_alive_s: float = Field(default=5.0, gt=0)
    body_timeout_s: float = Field(default=10.0, gt=0)
    max_concurrency: int = Field(default=200, ge=1)

    log_json: bool = False
    log_level: str = "INFO"

    @property
    def api_url(self) -> str:
        """The gateway's base URL, as clients on this host reach it."""
        return f"http://{self.api_host}:{self.api_port}"

    @field_validator("amqp_url", mode="before")
    @classmethod
    def _check_amqp_urls(cls, value: object) -> str:
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
        if not parts:
            raise ValueError("RECFLEET_AMQP_URL names no broker")
        return ",".join(str(_AMQP_DSN.validate_python(p)) for p in parts)

    @property
    def amqp_urls(self) -> list[str]:
        """The broker URLs: one node, or every node of a cluster to fail over between."""
        return self.amqp_url.split(",")

    def isolated(self, name: str, **overrides: object) -> Settings:
        """A copy whose queues, exchange and Redis prefix all carry ``name``, so that a
        benchmark or test run touches nothing else (and can delete all it made)."""
        # Validated (unlike model_copy), so overrides may be given as plain strings.
        return type(self).model_validate(
            {
                **self.model_dump(),
                "jobs_queue": f"{name}.jobs",
                "dead_letter_queue": f"{name}.dlq",
                "dead_letter_exchange": f"{name}.dlx",
                "dead_events_queue": f"{name}.dead-events",
                "sync_queue": f"{name}.sync",
                "redis_prefix": name,
                **overrides,
            }
        )

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> Settings:
        if self.environment != "production":
            return self
        problems = []
        amqp = [_AMQP_DSN.validate_python(u) for u in self.amqp_urls]
        if any(u.username in (None, "guest") or u.password in (None, "guest") for u in amqp):
            problems.append("RECFLEET_AMQP_URL uses the default guest/guest account")
        if not self.redis_url.password:
            problems.append("RECFLEET_REDIS_URL has no password")
        if not self.database_url.hosts()[0].get("password"):
            problems.append("RECFLEET_DATABASE_URL has no password")
        if not self.api_keys.get_secret_value().strip() and self.api_keys_file is None:
            problems.append("no API keys (RECFLEET_API_KEYS or RECFLEET_API_KEYS_FILE)")
        if self.page_secret is None or len(self.page_secret.get_secret_value()) < 16:
            problems.append("RECFLEET_PAGE_SECRET is missing or shorter than 16 characters")
        if problems:
            raise ValueError("refusing to start in production: " + "; ".join(problems))
        return self


_AMQP_DSN: TypeAdapter[AmqpDsn] = TypeAdapter(AmqpDsn)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read once from the environment."""
    return Settings()
