"""``recfleet``: run the gateway and workers, build artifacts, submit batches, benchmark."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import httpx

from recfleet.cli.client import GatewayError, batch_status, console, submit, wait
from recfleet.shared.errors import ArtifactError
from recfleet.shared.logs import configure_logging
from recfleet.shared.settings import Settings, get_settings


def _settings() -> Settings:
    try:
        return get_settings()
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise click.ClickException(f"bad configuration: {exc}") from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """recfleet: daily playlist recommendations for every user, computed by a worker fleet."""


@cli.command()
@click.option("--host", default=None, help="bind address (default RECFLEET_API_HOST)")
@click.option("--port", type=int, default=None, help="port (default RECFLEET_API_PORT)")
def api(host: str | None, port: int | None) -> None:
    """Run the HTTP gateway."""
    import uvicorn

    from recfleet.api.app import create_app

    s = _settings()
    configure_logging(s.log_level, s.log_json)
    uvicorn.run(
        create_app(s),
        host=host or s.api_host,
        port=port or s.api_port,
        log_level=s.log_level.lower(),
        access_log=False,
    )


@cli.command()
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
def worker(processes: int, shard: int | None) -> None:
    """Run ranking workers that consume jobs from RabbitMQ and write results to Redis."""
    from recfleet.worker.main import run_fleet

    s = _settings()
    s = s if shard is None else s.model_copy(update={"shard": shard})
    configure_logging(s.log_level, s.log_json)
    try:
        sys.exit(run_fleet(s, processes))
    except ArtifactError as exc:
        raise click.ClickException(f"cannot load artifacts from {s.artifacts}: {exc}") from exc


@cli.group()
def artifacts() -> None:
    """Build and check model artifact directories."""


@artifacts.command("build")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="directory to write")
@click.option("--users", type=click.IntRange(2), default=200_000, show_default=True)
@click.option("--playlists", type=click.IntRange(20), default=100_000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--feedback",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="training triplets (.npy) exported from feedback",
)
@click.option("--shards", type=click.IntRange(1), default=None, help="split into N shards")
def artifacts_build(
    out: Path, users: int, playlists: int, seed: int, feedback: Path | None, shards: int | None
) -> None:
    """Generate interactions, pair users, train BPR and write a versioned artifact directory."""
    from recfleet.offline.build import build_artifacts
    from recfleet.offline.shard import build_sharded

    configure_logging()
    if shards is None:
        manifest = build_artifacts(
            out, n_users=users, n_playlists=playlists, seed=seed, feedback=feedback
        )
    else:
        manifest = build_sharded(
            out, shards, n_users=users, n_playlists=playlists, seed=seed, feedback=feedback
        )
    click.echo(f"wrote {out} (model {manifest['model_version']})")


@artifacts.command("check")
@click.argument("path", type=click.Path(path_type=Path))
def artifacts_check(path: Path) -> None:
    """Verify an artifact directory: files, checksums, shapes and format version."""
    from recfleet.shared.artifacts import current_dir
    from recfleet.shared.shards import load_model, read_shard_map

    try:
        directory = current_dir(path)
        smap = read_shard_map(directory)
        arts = [load_model(directory, k if smap.sharded else None) for k in range(smap.count)]
        art = arts[0]
    except ArtifactError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"ok: {art.model_version}, {sum(a.n_users for a in arts)} users in {len(arts)} "
        f"shard(s), {art.n_playlists} playlists, "
        f"{sum(len(a.candidates_indices) for a in arts)} candidates"
    )


def _read_ids(path: Path) -> list[int]:
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


@cli.command("submit")
@click.argument(
    "users_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=False
)
@click.option("--all", "all_users", is_flag=True, help="every user of the artifacts")
@click.option("--api-url", default=None, help="gateway URL (default from settings)")
@click.option(
    "--chunk",
    type=click.IntRange(1),
    default=100_000,
    show_default=True,
    help="user ids per request",
)
@click.option("--no-wait", is_flag=True, help="return once the batches are accepted")
def submit_cmd(
    users_file: Path | None, all_users: bool, api_url: str | None, chunk: int, no_wait: bool
) -> None:
    """Submit users (one id per line in USERS_FILE, or --all) and follow the batch."""
    s = _settings()
    if bool(users_file) == all_users:
        raise click.UsageError("give either USERS_FILE or --all")
    if all_users:
        from recfleet.shared.artifacts import current_dir, read_manifest

        try:
            ids = list(range(int(read_manifest(current_dir(s.artifacts))["n_users"])))
        except ArtifactError as exc:
            raise click.ClickException(str(exc)) from exc
    else:
        assert users_file is not None
        ids = _read_ids(users_file)
    url = api_url or f"http://{s.api_host}:{s.api_port}"
    with httpx.Client(base_url=url, timeout=120) as client:
        try:
            sub = submit(client, ids, min(chunk, s.max_users_per_request))
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


@cli.command()
@click.argument("batch_id")
@click.option("--api-url", default=None, help="gateway URL (default from settings)")
@click.option("--failed", is_flag=True, help="also list the users of dead-lettered jobs")
def status(batch_id: str, api_url: str | None, failed: bool) -> None:
    """Show a batch's progress."""
    s = _settings()
    url = api_url or f"http://{s.api_host}:{s.api_port}"
    with httpx.Client(base_url=url, timeout=30) as client:
        try:
            st = batch_status(client, batch_id, failed_users=failed)
        except GatewayError as exc:
            raise click.ClickException(str(exc)) from exc
    for key, value in st.items():
        click.echo(f"{key:14} {value}")


from recfleet.cli.bench import bench  # noqa: E402
from recfleet.cli.db import db  # noqa: E402
from recfleet.cli.demo import demo  # noqa: E402
from recfleet.cli.dlq import dlq  # noqa: E402
from recfleet.cli.drift import drift  # noqa: E402
from recfleet.cli.feedback import feedback  # noqa: E402
from recfleet.cli.generations import generations  # noqa: E402
from recfleet.cli.schedule import schedule  # noqa: E402
from recfleet.cli.shards import artifacts_shard  # noqa: E402

cli.add_command(bench)
cli.add_command(demo)
cli.add_command(dlq)
cli.add_command(generations)
artifacts.add_command(artifacts_shard)
cli.add_command(schedule)
cli.add_command(drift)
cli.add_command(db)
cli.add_command(feedback)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
