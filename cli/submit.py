"""``recfleet submit`` and ``recfleet status``: send users to the gateway, follow batches."""

from __future__ import annotations

from pathlib import Path

import click
import httpx

from recfleet.cli.client import GatewayError, auth_headers, batch_status, console, submit, wait
from recfleet.cli.context import api_url_option, pass_settings
from recfleet.shared.errors import ArtifactError
from recfleet.shared.settings import Settings


def read_ids(path: Path) -> list[int]:
    """User ids, one per line (blank lines skipped). Raises click.ClickException naming the
    first line that is not an integer."""
    ids = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            ids.append(int(line))
        except ValueError:
            raise click.ClickException(f"{path}:{n}: {line!r} is not an integer user id") from None
    return ids


def all_user_ids(s: Settings) -> list[int]:
    """Every user id of the current artifacts, round-robin over the shards of a sharded
    model (so every request feeds every shard). Raises click.ClickException if they do
    not read."""
    from recfleet.shared.artifacts import current_dir
    from recfleet.shared.shards import submit_order

    try:
        return submit_order(current_dir(s.artifacts))
    except ArtifactError as exc:
        raise click.ClickException(str(exc)) from exc


@click.command("submit")
@click.argument(
    "users_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=False
)
@click.option("--all", "all_users", is_flag=True, help="every user of the artifacts")
@api_url_option
@click.option(
    "--chunk",
    type=click.IntRange(1),
    default=100_000,
    show_default=True,
    help="user ids per request",
)
@click.option("--no-wait", is_flag=True, help="return once the batches are accepted")
@pass_settings
def submit_cmd(
    s: Settings,
    users_file: Path | None,
    all_users: bool,
    api_url: str | None,
    chunk: int,
    no_wait: bool,
) -> None:
    """Submit users (one id per line in USERS_FILE, or --all) and follow the batch.

    --all is a declared run: a new generation, made current when complete and past its
    gates. A USERS_FILE is ad-hoc: it updates those users in the current generation."""
    if bool(users_file) == all_users:
        raise click.UsageError("give either USERS_FILE or --all")
    ids = all_user_ids(s) if users_file is None else read_ids(users_file)
    with httpx.Client(
        base_url=api_url or s.api_url, timeout=120, headers=auth_headers(s)
    ) as client:
        try:
            sub = submit(client, ids, min(chunk, s.max_users_per_request), run=all_users)
            console.print(
                f"accepted {sub.users:,} users in {sub.jobs:,} jobs, "
                f"batches: {' '.join(sub.batch_ids)}"
            )
            if no_wait:
                return
            try:
                statuses = wait(client, sub.batch_ids, sub.users)
            except KeyboardInterrupt:
                console.print(
                    "stopped following; the batches keep running. Follow with: "
                    f"recfleet status {sub.batch_ids[0]}"
                )
                return
        except GatewayError as exc:
            raise click.ClickException(str(exc)) from exc
    done = sum(st["users_done"] for st in statuses)
    dead = sum(st["users_dead"] for st in statuses)
    cold = sum(st["cold_users"] for st in statuses)
    console.print(f"done: {done:,} users ranked ({cold:,} cold), {dead:,} in dead-lettered jobs")


@click.command()
@click.argument("batch_id")
@api_url_option
@click.option("--failed", is_flag=True, help="also list the users of dead-lettered jobs")
@pass_settings
def status(s: Settings, batch_id: str, api_url: str | None, failed: bool) -> None:
    """Show a batch's progress."""
    with httpx.Client(base_url=api_url or s.api_url, timeout=30, headers=auth_headers(s)) as client:
        try:
            st = batch_status(client, batch_id, failed_users=failed)
        except GatewayError as exc:
            raise click.ClickException(str(exc)) from exc
    for key, value in st.items():
        click.echo(f"{key:14} {value}")
