"""``recfleet artifacts shard``: split a model directory into shards by user-id range."""

from __future__ import annotations

from pathlib import Path

import click

from recfleet.shared.errors import ArtifactError
from recfleet.shared.logs import configure_logging


@click.command("shard")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--shards", type=click.IntRange(1, 4096), required=True, help="number of shards")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="directory to write")
def artifacts_shard(src: Path, shards: int, out: Path) -> None:
    """Split the artifact directory SRC into SHARDS shards by user-id range, at OUT.

    The playlist table and the fallback list are written once and shared; each shard
    gets its users' embeddings, candidates and ids; shards.json maps ranges to shards.
    """
    from recfleet.offline.shard import shard_artifacts
    from recfleet.shared.artifacts import current_dir

    configure_logging()
    try:
        doc = shard_artifacts(current_dir(src), out, shards)
    except (ArtifactError, ValueError, FileExistsError) as exc:
        raise click.ClickException(str(exc)) from exc
    ranges = ", ".join(
        f"{s['lo']}..{'' if s['hi'] is None else s['hi'] - 1}" for s in doc["shards"]
    )
    click.echo(f"wrote {out}: {shards} shards of model {doc['model_version']} ({ranges})")
