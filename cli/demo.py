"""``recfleet demo``: the whole fleet on this host, from artifacts to results in Redis."""

from __future__ import annotations

import time
from pathlib import Path

import click
import httpx
import psycopg
from rich.table import Table

from recfleet.cli.client import GatewayError, auth_headers, console, submit, wait
from recfleet.cli.context import pass_settings
from recfleet.cli.fleet import FleetError, LocalFleet
from recfleet.shared.artifacts import current_dir, read_manifest
from recfleet.shared.errors import ArtifactError
from recfleet.shared.logs import configure_logging
from recfleet.shared.migrate import MigrationError, upgrade
from recfleet.shared.settings import Settings


def ensure_artifacts(path: Path, users: int, playlists: int) -> dict:
    """Reuse a valid artifact directory, or build one."""
    try:
        return read_manifest(current_dir(path))
    except ArtifactError:
        pass
    from recfleet.offline.build import build_artifacts

    console.print(f"building demo artifacts in {path}: {users:,} users, {playlists:,} playlists")
    start = time.perf_counter()
    manifest = build_artifacts(path, n_users=users, n_playlists=playlists, seed=0)
    console.print(f"built in {time.perf_counter() - start:.1f}s")
    return manifest


@click.command()
@click.option("--users", type=click.IntRange(100), default=200_000, show_default=True)
@click.option("--playlists", type=click.IntRange(100), default=100_000, show_default=True)
@click.option("--processes", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option(
    "--logs",
    type=click.Path(path_type=Path),
    default=Path("demo-logs"),
    show_default=True,
    help="where the gateway and workers write their logs",
)
@pass_settings
def demo(s: Settings, users: int, playlists: int, processes: int, logs: Path) -> None:
    """Build artifacts, start a gateway and worker processes, rank every user, show results."""
    configure_logging("WARNING")
    manifest = ensure_artifacts(s.artifacts, users, playlists)
    try:
        applied = upgrade(str(s.database_url))
        console.print(f"feedback database ready ({len(applied)} migrations applied)")
    except (MigrationError, psycopg.Error) as exc:
        console.print(f"[yellow]feedback database unavailable ({exc}); the page at / will say so")
    metrics = manifest.get("metrics", {})
    if metrics:
        console.print(f"model {manifest['model_version']}: held-out metrics {metrics}")
    n_users = int(manifest["n_users"])
    try:
        with LocalFleet(s, processes, logs) as fleet:
            console.print(
                f"gateway {fleet.base_url} (docs at {fleet.base_url}/docs), "
                f"{processes} worker processes; logs in {logs}/"
            )
            fleet.wait_workers_consuming()
            with httpx.Client(
                base_url=fleet.base_url, timeout=120, headers=auth_headers(s)
            ) as client:
                start = time.perf_counter()
                sub = submit(client, list(range(n_users)), s.max_users_per_request, run=True)
                console.print(
                    f"accepted {sub.users:,} users as {sub.jobs:,} jobs in "
                    f"one batch in {sub.seconds:.2f}s"
                )
                statuses = wait(client, sub.batch_ids, sub.users)
                elapsed = time.perf_counter() - start
                _show_samples(client, [0, 1, n_users // 2, n_users - 1, n_users + 5])
    except (FleetError, GatewayError) as exc:
        raise click.ClickException(str(exc)) from exc
    done = sum(st["users_done"] for st in statuses)
    cold = sum(st["cold_users"] for st in statuses)
    console.print(
        f"[bold]{done:,} users ranked in {elapsed:.2f}s = {done / elapsed:,.0f} users/s"
        f"[/bold] over HTTP → RabbitMQ → {processes} workers → Redis ({cold:,} cold)"
    )


def _show_samples(client: httpx.Client, user_ids: list[int]) -> None:
    table = Table(title="a few users' recommendations (GET /api/playlist/{user_id})")
    for col in ("user", "playlists (best first)", "cold", "model"):
        table.add_column(col)
    for uid in user_ids:
        resp = client.get(f"/api/playlist/{uid}")
        if resp.status_code == 404:
            table.add_row(str(uid), "[dim]404: no result (not in this batch)[/dim]", "", "")
            continue
        body = resp.json()
        table.add_row(
            str(uid),
            " ".join(map(str, body["playlists"])),
            str(body["cold"]),
            body["model_version"],
        )
    console.print(table)
