"""``recfleet db``: the feedback database's schema migrations."""

from __future__ import annotations

from pathlib import Path

import click
import psycopg

from recfleet.cli.context import settings_from
from recfleet.shared.migrate import MIGRATIONS_DIR, MigrationError
from recfleet.shared.migrate import status as migration_status
from recfleet.shared.migrate import upgrade as apply_migrations

database_url_option = click.option(
    "--database-url", default=None, help="PostgreSQL URL (default RECFLEET_DATABASE_URL)"
)
migrations_option = click.option(
    "--dir",
    "directory",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=MIGRATIONS_DIR,
    show_default=True,
    help="directory of NNNN_name.sql migrations",
)


def resolve_database_url(database_url: str | None) -> str:
    """The URL given on the command line, else the configured one."""
    if database_url:
        return database_url
    return str(settings_from(click.get_current_context()).database_url)


@click.group()
def db() -> None:
    """The feedback database (PostgreSQL): apply and inspect schema migrations."""


@db.command("upgrade")
@database_url_option
@migrations_option
def upgrade(database_url: str | None, directory: Path) -> None:
    """Apply pending migrations, all in one transaction under an advisory lock."""
    url = resolve_database_url(database_url)
    try:
        applied = apply_migrations(url, directory)
    except (MigrationError, psycopg.Error) as exc:
        raise click.ClickException(f"nothing applied: {exc}") from exc
    for m in applied:
        click.echo(f"applied {m.version:04d}_{m.name}")
    if not applied:
        click.echo("up to date")


@db.command("status")
@database_url_option
@migrations_option
def status(database_url: str | None, directory: Path) -> None:
    """List applied and pending migrations."""
    url = resolve_database_url(database_url)
    try:
        done, todo = migration_status(url, directory)
    except (MigrationError, psycopg.Error) as exc:
        raise click.ClickException(str(exc)) from exc
    for m in done:
        click.echo(f"applied  {m.version:04d}_{m.name}")
    for m in todo:
        click.echo(f"pending  {m.version:04d}_{m.name}")
