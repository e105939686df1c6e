"""``recfleet artifacts``: build and check model artifact directories."""

from __future__ import annotations

from pathlib import Path

import click

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
def artifacts_build(
    out: Path, users: int, playlists: int, seed: int, feedback: Path | None
) -> None:
    """Generate interactions, pair users, train BPR and write a versioned artifact directory."""
    from recfleet.offline.build import build_artifacts

    configure_logging()
    manifest = build_artifacts(
        out, n_users=users, n_playlists=playlists, seed=seed, feedback=feedback
    )
    click.echo(f"wrote {out} (model {manifest['model_version']})")


@artifacts.command("check")
@click.argument("path", type=click.Path(path_type=Path))
def artifacts_check(path: Path) -> None:
    """Verify an artifact directory: files, checksums, shapes and format version."""
    from recfleet.shared.artifacts import current_dir, load_artifacts

    try:
        art = load_artifacts(current_dir(path))
    except ArtifactError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"ok: {art.model_version}, {art.n_users} users, {art.n_playlists} playlists, "
        f"{len(art.candidates_indices)} candidates"
    )
