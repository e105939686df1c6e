"""``recfleet api`` and ``recfleet worker``: run the gateway and the ranking workers."""

from __future__ import annotations

import sys

import click

from recfleet.cli.context import pass_settings
from recfleet.shared.errors import ArtifactError
from recfleet.shared.logs import configure_logging
from recfleet.shared.settings import Settings


@click.command()
@click.option("--host", default=None, help="bind address (default RECFLEET_API_HOST)")
@click.option("--port", type=int, default=None, help="port (default RECFLEET_API_PORT)")
@pass_settings
def api(s: Settings, host: str | None, port: int | None) -> None:
    """Run the HTTP gateway."""
    from recfleet.api.app import create_app
    from recfleet.api.limits import run_gateway

    configure_logging(s.log_level, s.log_json)
    run_gateway(create_app(s), s, host or s.api_host, port or s.api_port)


@click.command()
@click.option(
    "--processes",
    "-p",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="worker processes on this host, one torch thread each",
)
@click.option(
    "--shard", type=click.IntRange(0), default=None, help="serve shard K of a sharded model"
)
@pass_settings
def worker(s: Settings, processes: int, shard: int | None) -> None:
    """Run ranking workers that consume jobs from RabbitMQ and write results to Redis.

    With ``--shard K`` they load only shard K of a sharded model (plus the shared
    playlist table) and consume that shard's queues."""
    from recfleet.worker.main import run_fleet

    s = s if shard is None else s.model_copy(update={"shard": shard})
    configure_logging(s.log_level, s.log_json)
    try:
        sys.exit(run_fleet(s, processes))
    except ArtifactError as exc:
        raise click.ClickException(f"cannot load artifacts from {s.artifacts}: {exc}") from exc
