"""``recfleet artifacts``: build and check model artifact directories."""

from __future__ import annotations

from pathlib import Path

import click

from recfleet.cli.shards import artifacts_shard
from recfleet.shared.errors import ArtifactError
from recfleet.shared.logs import configure_logging


@click.group()
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
    """Generate interactions, pair users, train BPR and write a versioned artifact directory
    (with ``--shards N``, split by user-id range as ``recfleet artifacts shard`` does)."""
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
    except ArtifactError as exc:
        raise click.ClickException(str(exc)) from exc
    art = arts[0]
    click.echo(
        f"ok: {art.model_version}, {sum(a.n_users for a in arts)} users in {len(arts)} "
        f"shard(s), {art.n_playlists} playlists, "
        f"{sum(len(a.candidates_indices) for a in arts)} candidates"
    )


artifacts.add_command(artifacts_shard)
