"""``recfleet artifacts``: build and check model artifact directories."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from recfleet.cli.client import console
from recfleet.cli.shards import artifacts_shard
from recfleet.shared.errors import ArtifactError
from recfleet.shared.logs import configure_logging


class _StageDisplay:
    """A live line per build stage (spinner, then its seconds); off when not on a terminal."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, stage: str, seconds: float | None) -> None:
        if seconds is None:
            self._tasks[stage] = self._progress.add_task(stage, total=1)
            return
        task = self._tasks.pop(stage, None)
        if task is None:  # a step timed inside a stage: shown once it is done
            task = self._progress.add_task(f"  {stage}", total=1)
        self._progress.update(task, completed=1, description=f"{stage} ({seconds:.1f}s)")


def _timings_table(timings: dict[str, float]) -> Table:
    table = Table("stage", "seconds", title="build stages")
    for stage, seconds in timings.items():
        table.add_row(stage, f"{seconds:.1f}")
    return table


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
@click.option(
    "--threads",
    type=click.IntRange(1),
    default=os.cpu_count() or 1,
    show_default="all cores",
    help="threads for all stages but the SVD (the same artifacts for any count)",
)
@click.option(
    "--candidates-from",
    type=click.Choice(["train", "validation"]),
    default="train",
    show_default=True,
    help="count the neighbours' votes for the shipped candidate lists again over the whole "
    "training split, or ship the lists validation ranked, minus each user's validation playlist",
)
def artifacts_build(
    out: Path,
    users: int,
    playlists: int,
    seed: int,
    feedback: Path | None,
    shards: int | None,
    threads: int,
    candidates_from: str,
) -> None:
    """Generate interactions, pair users, train BPR and write a versioned artifact directory
    (with ``--shards N``, split by user-id range as ``recfleet artifacts shard`` does).

    On a terminal each stage shows live; the stage timings are printed at the end.
    """
    from recfleet.offline.build import build_artifacts
    from recfleet.offline.shard import build_sharded

    configure_logging()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    live = console.is_terminal
    with Progress(*columns, console=console, disable=not live) as progress:
        build_args: dict[str, Any] = {
            "n_users": users,
            "n_playlists": playlists,
            "seed": seed,
            "feedback": feedback,
            "threads": threads,
            "candidates_from": candidates_from,
            "listener": _StageDisplay(progress),
        }
        if shards is None:
            manifest = build_artifacts(out, **build_args)
        else:
            manifest = build_sharded(out, shards, **build_args)
    if "timings" in manifest:
        console.print(_timings_table(manifest["timings"]))
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
