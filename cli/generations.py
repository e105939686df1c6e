"""``recfleet generations``: list, roll back to, and prune generations of results."""

from __future__ import annotations

import time

import click
import redis

from recfleet.shared.generations import activate, history, prune
from recfleet.shared.keys import Keys
from recfleet.shared.ledger import LedgerStatus
from recfleet.shared.settings import get_settings


def _client() -> tuple[redis.Redis, Keys]:
    s = get_settings()
    return redis.Redis.from_url(str(s.redis_url)), Keys(s.redis_prefix)


@click.group()
def generations() -> None:
    """Generations of results: one per batch, the newest active one is current."""


@generations.command("list")
def list_cmd() -> None:
    """Active generations, current first."""
    client, keys = _client()
    rows = history(client, keys)
    if not rows:
        click.echo("no active generation yet")
    for i, (name, activated) in enumerate(rows):
        st = LedgerStatus.parse(name, client.hgetall(keys.batch(name)))
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(activated))
        click.echo(
            f"{'*' if i == 0 else ' '} {name}  activated {when} UTC  users {st.users_done:>10}"
            f"  cold {st.cold_users:>8}  model {st.model_version or '-'}"
        )


@generations.command("activate")
@click.argument("batch_id")
def activate_cmd(batch_id: str) -> None:
    """Make BATCH_ID current now (roll back to it); newer generations are retired."""
    client, keys = _client()
    try:
        retired = activate(client, keys, batch_id)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{batch_id} is current" + (f"; retired {' '.join(retired)}" if retired else ""))


@generations.command("prune")
@click.option(
    "--keep",
    type=click.IntRange(1),
    required=True,
    help="how many of the newest generations to keep",
)
def prune_cmd(keep: int) -> None:
    """Delete the results of all but the KEEP newest generations (without blocking Redis)."""
    client, keys = _client()
    pruned = prune(client, keys, keep)
    click.echo(f"pruned {len(pruned)} generations" + (f": {' '.join(pruned)}" if pruned else ""))
