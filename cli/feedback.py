"""``recfleet feedback``: click-through rate, training triplets, and simulated users.

``simulate`` plays users of a synthetic artifact directory against a running gateway
(see ``cli.simulation``). ``baseline`` writes a copy of an artifact directory that serves everyone
the popularity fallback, so the trained model and the fallback can be compared.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import httpx
import numpy as np
import psycopg

from recfleet.cli.client import auth_headers
from recfleet.cli.context import api_url_option, pass_settings
from recfleet.cli.db import database_url_option, resolve_database_url
from recfleet.cli.simulation import Arm, World, visit
from recfleet.shared.artifacts import load_artifacts, read_manifest, write_manifest
from recfleet.shared.errors import ArtifactError
from recfleet.shared.feedback import (
    CtrRow,
    click_through,
    export_triplets,
    save_triplets,
    start_of_day,
)
from recfleet.shared.settings import Settings

BASELINE_SUFFIX = "-popularity"


@click.group()
def feedback() -> None:
    """Feedback from the page: click-through rate, training triplets, simulated users."""


def _since(day: datetime | None, default_days: int) -> datetime:
    today = datetime.now(UTC).date()
    return start_of_day(day.date() if day else today - timedelta(days=default_days))


@feedback.command("ctr")
@click.option(
    "--since",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=None,
    help="first UTC day counted (default: 6 days ago)",
)
@click.option("--json", "as_json", is_flag=True, help="one JSON object instead of tables")
@database_url_option
def ctr(since: datetime | None, as_json: bool, database_url: str | None) -> None:
    """Click-through rate (impressions that got a like) per model version and per day."""
    start = _since(since, 6)
    try:
        with psycopg.connect(resolve_database_url(database_url), connect_timeout=10) as conn:
            totals = click_through(conn, start, by_day=False)
            days = click_through(conn, start, by_day=True)
    except psycopg.Error as exc:
        raise click.ClickException(f"cannot read feedback: {exc}") from exc
    if as_json:
        click.echo(
            json.dumps(
                {
                    "since": start.date().isoformat(),
                    "models": {r.model_version: _row_json(r) for r in totals},
                    "days": [
                        {"day": str(r.day), "model_version": r.model_version, **_row_json(r)}
                        for r in days
                    ],
                }
            )
        )
        return
    click.echo(f"click-through rate since {start.date()} (share of impressions liked)\n")
    width = max([len("model_version"), *(len(r.model_version) for r in totals)])
    header = f"{'impressions':>11} {'clicked':>8} {'likes':>8} {'ctr':>7}"
    click.echo(f"{'model_version':<{width}} {header}")
    for r in totals:
        click.echo(f"{r.model_version:<{width}} {_figures(r)}")
    click.echo(f"\n{'day':<10} {'model_version':<{width}} {header}")
    for r in days:
        click.echo(f"{r.day!s:<10} {r.model_version:<{width}} {_figures(r)}")
    if not totals:
        click.echo("(no impressions yet)")


def _row_json(r: CtrRow) -> dict[str, float]:
    return {"impressions": r.impressions, "clicked": r.clicked, "likes": r.likes, "ctr": r.ctr}


def _figures(r: CtrRow) -> str:
    return f"{r.impressions:>11} {r.clicked:>8} {r.likes:>8} {r.ctr:>7.1%}"


@feedback.command("export")
@click.option(
    "--since", type=click.DateTime(formats=["%Y-%m-%d"]), required=True, help="first UTC day"
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@database_url_option
def export(since: datetime, out: Path, database_url: str | None) -> None:
    """BPR training triplets (user, liked playlist, shown but not liked playlist) of the likes
    since DATE, as int64 [n, 3] .npy of external ids; `recfleet artifacts build --feedback`
    reads it."""
    try:
        with psycopg.connect(resolve_database_url(database_url), connect_timeout=10) as conn:
            triplets = export_triplets(conn, _since(since, 0))
    except psycopg.Error as exc:
        raise click.ClickException(f"cannot read feedback: {exc}") from exc
    save_triplets(out, triplets)
    users = len(np.unique(triplets[:, 0]))
    click.echo(f"wrote {len(triplets)} triplets of {users} users to {out}")


@feedback.command("simulate")
@click.option("--users", type=click.IntRange(1), required=True, help="users to simulate")
@api_url_option
@click.option(
    "--artifacts",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="artifact directory with synthetic_truth.npz (default RECFLEET_ARTIFACTS)",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--draws",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="listens per visit drawn from the user's true taste; a shown one is liked",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@pass_settings
def simulate(
    settings: Settings,
    users: int,
    api_url: str | None,
    artifacts: Path | None,
    seed: int,
    draws: int,
    as_json: bool,
) -> None:
    """Play USERS random users of the artifacts: each looks up their list through the gateway
    (an impression) and likes what their synthetic ground truth picks. Prints the CTR per
    model version, observed and expected."""
    world = World.load(artifacts or settings.artifacts)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(
        np.asarray(world.user_ids), size=min(users, len(world.user_ids)), replace=False
    )
    arms: dict[str, Arm] = defaultdict(Arm)
    missing = 0
    url = api_url or settings.api_url
    with httpx.Client(base_url=url, timeout=30, headers=auth_headers(settings)) as client:
        try:
            for user_id in chosen.tolist():
                missing += not visit(client, world, int(user_id), rng, draws, arms)
        except httpx.HTTPError as exc:
            raise click.ClickException(f"gateway unreachable at {url}: {exc}") from exc
    models = {version: arm.summary() for version, arm in sorted(arms.items())}
    if as_json:
        click.echo(json.dumps({"users": len(chosen), "no_result": missing, "models": models}))
        return
    click.echo(f"simulated {len(chosen)} users ({missing} without a result yet)")
    for version, s in models.items():
        click.echo(
            f"{version}: {s['impressions']} impressions, {s['likes']} likes, "
            f"CTR {s['ctr']:.1%} (expected {s['expected_ctr']:.1%})"
        )


@feedback.command("baseline")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="directory to write")
def baseline(source: Path, out: Path) -> None:
    """Copy an artifact directory into one that serves every user the popularity fallback,
    as model version '<version>-popularity'. Roll it out (a model root's CURRENT), rank the
    users again and simulate them again to compare the trained model's CTR with the
    fallback's. Its users are all cold: its batches need RECFLEET_GATE_MAX_COLD_FRACTION=1
    (or `recfleet generations activate`) to become current."""
    if out.exists():
        raise click.ClickException(f"{out} already exists")
    try:
        manifest = read_manifest(source)
    except ArtifactError as exc:
        raise click.ClickException(str(exc)) from exc
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    # No user has candidates, so the workers give everyone the fallback list.
    np.save(tmp / "candidates_indptr.npy", np.zeros(int(manifest["n_users"]) + 1, np.int64))
    np.save(tmp / "candidates_indices.npy", np.zeros(0, np.int32))
    version = f"{manifest['model_version']}{BASELINE_SUFFIX}"
    manifest.update(
        model_version=version,
        metrics={},
        params={
            **manifest.get("params", {}),
            "baseline": "popularity fallback",
            "source_model_version": manifest["model_version"],
        },
    )
    write_manifest(tmp, manifest)
    try:
        load_artifacts(tmp)
    except ArtifactError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise click.ClickException(f"baseline does not load: {exc}") from exc
    tmp.rename(out)
    click.echo(f"wrote {out} (model {version})")
