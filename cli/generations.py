"""``recfleet generations``: list, roll back to, and prune generations of results."""

from __future__ import annotations

import time

import click
import redis

from recfleet.shared.generations import activate, history
from recfleet.shared.keys import BASE, Keys
from recfleet.shared.ledger import LedgerStatus
from recfleet.shared.redis import redis_client
from recfleet.shared.retention import prune, usage
from recfleet.shared.settings import Settings, get_settings


def _client() -> tuple[redis.Redis, Keys, Settings]:
    s = get_settings()
    return redis_client(s), Keys(s.redis_prefix), s


@click.group()
def generations() -> None:
    """Generations of results: one per declared run; the newest active one is current,
    and a read falls through every active one (then `live`) to the first result."""


@generations.command("list")
def list_cmd() -> None:
    """Active generations, current first, with the users and bytes each holds (users
    counted exactly; bytes = MEMORY USAGE of sampled buckets x buckets), then any other
    keyspace still holding results (pending, rejected or retired runs not yet pruned)."""
    client, keys, _ = _client()
    rows = history(client, keys)
    held = usage(client, keys)
    if not rows:
        click.echo("no active generation yet")
    for i, (name, activated) in enumerate(rows):
        st = LedgerStatus.parse(name, client.hgetall(keys.batch(name)))
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(activated))
        u = held.pop(name, None)
        click.echo(
            f"{'*' if i == 0 else ' '} {name}  activated {when} UTC  "
            f"users {u.users if u else 0:>10}  bytes {u.bytes if u else 0:>12}  "
            f"cold {st.cold_users:>8}  model {st.model_version or '-'}"
        )
    for name, u in sorted(held.items()):
        state = "base" if name == BASE else client.hget(keys.batch(name), "gen_state")
        label = state.decode() if isinstance(state, bytes) else (state or "no ledger")
        click.echo(f"  {name}  {label:<9}  users {u.users:>10}  bytes {u.bytes:>12}")


@generations.command("activate")
@click.argument("batch_id")
def activate_cmd(batch_id: str) -> None:
    """Make BATCH_ID current now (roll back to it); newer generations are retired."""
    client, keys, s = _client()
    try:
        retired = activate(client, keys, batch_id, s.batch_ttl_s)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{batch_id} is current" + (f"; retired {' '.join(retired)}" if retired else ""))


@generations.command("prune")
@click.option(
    "--keep",
    type=click.IntRange(1),
    required=True,
    help="how many of the newest active generations to keep",
)
def prune_cmd(keep: int) -> None:
    """Retire all but the KEEP newest generations and delete the results of every run
    neither active nor still running (retired, rejected), without blocking Redis."""
    client, keys, s = _client()
    pruned = prune(client, keys, keep, s.batch_ttl_s)
    click.echo(
        f"deleted the results of {len(pruned)} runs" + (f": {' '.join(pruned)}" if pruned else "")
    )
