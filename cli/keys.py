"""``recfleet keys``: mint API keys for the gateway."""

from __future__ import annotations

import click

from recfleet.api.auth import Role, entry, new_key


@click.group()
def keys() -> None:
    """API keys: the gateway keeps only their SHA-256 (RECFLEET_API_KEYS)."""


@keys.command("new")
@click.option(
    "--roles",
    required=True,
    help="comma-separated: " + ", ".join(r.value for r in Role),
)
@click.option("--name", default="client", show_default=True, help="a label for logs and 403s")
def new(roles: str, name: str) -> None:
    """Mint a key. Prints the key (give it to the client, e.g. as RECFLEET_API_KEY) and the
    entry for the gateway's RECFLEET_API_KEYS (or RECFLEET_API_KEYS_FILE)."""
    try:
        parsed = [Role(r.strip()) for r in roles.split(",") if r.strip()]
    except ValueError as exc:
        raise click.BadParameter(
            f"roles are {', '.join(r.value for r in Role)}", param_hint="--roles"
        ) from exc
    if not parsed or not name.replace("-", "").replace("_", "").isalnum():
        raise click.UsageError("give at least one role, and a name of letters, digits, - and _")
    key = new_key()
    click.echo(f"key:   {key}")
    click.echo(f"entry: {entry(name, key, parsed)}")
