"""Private settings for a test: its own queue names, Redis prefix and ports."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from recfleet.cli.measure import cleanup
from recfleet.shared.messages import new_id
from recfleet.shared.settings import Settings
from tests.support.net import free_port


def make_settings(artifacts: Path, **overrides: object) -> Settings:
    """Settings with private queue names, Redis prefix and ports."""
    values: dict[str, object] = {
        "artifacts": artifacts,
        "api_port": free_port(),
        "metrics_port": free_port(),
        "heartbeat_s": 10,
        **overrides,
    }
    return Settings(environment="test").isolated(f"rftest-{new_id()[:10]}", **values)


def purge(settings: Settings) -> None:
    """Delete the Redis keys and broker objects of one settings object."""
    cleanup(settings)


def database_url_for(name: str) -> str:
    """The configured PostgreSQL server's URL with another database name."""
    parts = urlsplit(str(Settings().database_url))
    return urlunsplit(parts._replace(path=f"/{name}"))
