"""``recfleet bench``: benchmark programs that print their figures (JSON on request)."""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import click

from recfleet.cli.bench_hostile import bench_hostile
from recfleet.cli.bench_reads import bench_reads
from recfleet.cli.bench_store import bench_store
from recfleet.cli.client import console
from recfleet.cli.context import settings_from
from recfleet.cli.measure import cleanup, measure
from recfleet.shared.messages import new_id
from recfleet.shared.settings import Settings


@click.group()
def bench() -> None:
    """Benchmarks (programs, not tests): ranking alone, or the whole fleet."""


@bench.command("rank")
@click.option("--users", type=click.IntRange(2), default=1_000_000, show_default=True)
@click.option("--playlists", type=click.IntRange(2), default=1_000_000, show_default=True)
@click.option("--dim", type=click.IntRange(1), default=128, show_default=True)
@click.option("--k", type=click.IntRange(1), default=10, show_default=True)
@click.option(
    "--distribution", type=click.Choice(["zipf", "uniform"]), default="zipf", show_default=True
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16"]),
    default=None,
    help="playlist table dtype: an artifact table is converted to it (default: ranked as "
    "stored); synthetic tables default to float32",
)
@click.option(
    "--order",
    type=click.Choice(["random", "consecutive"]),
    default="random",
    show_default=True,
    help="each job: random users, or a consecutive run of user rows",
)
@click.option("--job-size", type=click.IntRange(1), default=1000, show_default=True)
@click.option(
    "--jobs", type=click.IntRange(1), default=40, show_default=True, help="jobs timed per repeat"
)
@click.option("--repeats", type=click.IntRange(1), default=7, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--artifacts",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="rank a real artifact directory instead of synthetic tables",
)
@click.option(
    "--compare", is_flag=True, help="also time the old kernel, the per-user loop and padded bmm"
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on the last line")
def bench_rank(as_json: bool, **options: Any) -> None:
    """Ranking throughput of one thread, without a broker: users/s, median of repeats."""
    from recfleet.worker import bench_rank as program

    options["jobs_per_repeat"] = options.pop("jobs")
    result = program.run(**options)
    click.echo(program.table(result))
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))


def _counts(spec: str) -> list[int]:
    try:
        counts = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{spec!r} is not a comma-separated list of integers") from None
    if not counts or min(counts) < 1:
        raise click.BadParameter("process counts must be positive")
    return counts


@bench.command("fleet")
@click.option(
    "--users",
    type=click.IntRange(1),
    default=1_000_000,
    show_default=True,
    help="users to submit (ids 0..N-1; ids beyond the artifacts are cold)",
)
@click.option(
    "--processes",
    default="2",
    show_default=True,
    help="worker process counts to compare, e.g. 1,2,4",
)
@click.option("--repeats", type=click.IntRange(1), default=1, show_default=True)
@click.option(
    "--artifacts",
    type=click.Path(path_type=Path),
    default=None,
    help="artifact directory (default RECFLEET_ARTIFACTS)",
)
@click.option(
    "--shards",
    type=click.IntRange(2),
    default=None,
    help="compare N shards x 1 worker (--sharded-artifacts) with 1 shard x N workers",
)
@click.option(
    "--sharded-artifacts",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="the same model split into --shards shards (recfleet artifacts shard)",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on the last line")
def bench_fleet(
    users: int,
    processes: str,
    repeats: int,
    artifacts: Path | None,
    shards: int | None,
    sharded_artifacts: Path | None,
    as_json: bool,
) -> None:
    """Submit users over HTTP to a local gateway and N workers; time until every result is in
    Redis. Uses its own queues and Redis prefix, deleted afterwards. After each run, one
    thread ranks jobs of the same model alone (no broker; its table as stored; random jobs
    as `bench rank` makes them, and runs of consecutive users as the fleet got them), so
    the fleet's figure has a same-run yardstick. Each run also reports the CPU seconds of
    each part of the fleet.

    With --shards N: one worker per shard of --sharded-artifacts against N workers on the
    unsharded --artifacts, with each worker process's private and shared memory."""
    from recfleet.shared.artifacts import current_dir
    from recfleet.worker import bench_rank as rank_program

    base = settings_from(click.get_current_context())
    if shards is not None:
        _bench_shards(
            base, users, repeats, artifacts or base.artifacts, shards, sharded_artifacts, as_json
        )
        return
    model_dir = current_dir(artifacts or base.artifacts)
    rows: list[dict[str, Any]] = []
    alone: dict[str, list[float]] = {"random": [], "consecutive": []}
    for n in _counts(processes):
        runs = []
        for _ in range(repeats):
            run_id = new_id()[:8]
            s = base.isolated(
                f"bench-{run_id}",
                artifacts=artifacts or base.artifacts,
                api_port=base.api_port + 17,
                metrics_port=base.metrics_port + 17,
                log_level="WARNING",
            )
            try:
                with tempfile.TemporaryDirectory(prefix="recfleet-bench-") as logs:
                    run = measure(s, list(range(users)), n, Path(logs), show=not as_json)
            finally:
                cleanup(s)
            runs.append(run.figures())
            # The yardstick: one thread ranking the same model (its table as stored) with
            # `bench rank`'s random jobs; the fleet's own jobs are runs of consecutive users.
            for order in ("random", "consecutive"):
                figures = rank_program.run(
                    artifacts=model_dir, repeats=3, jobs_per_repeat=20, order=order
                )
                alone[order].append(figures["users_per_s"])
            console.print(
                f"processes {n}: {run.users:,} users in {run.total_s:.2f}s "
                f"(submit {run.submit_s:.2f}s) = {run.users_per_s:,.0f} users/s, "
                f"cold {run.cold_users:,}; ranking alone, one thread: "
                f"{alone['random'][-1]:,.0f} users/s (random jobs), "
                f"{alone['consecutive'][-1]:,.0f} (consecutive users)"
            )
            console.print(
                "  CPU seconds: "
                + ", ".join(f"{part} {seconds:.2f}" for part, seconds in run.cpu_s.items())
            )
        rows.append(
            {
                "processes": n,
                "users": users,
                "users_per_s": statistics.median(r["users_per_s"] for r in runs),
                "total_s": statistics.median(r["total_s"] for r in runs),
                "submit_s": statistics.median(r["submit_s"] for r in runs),
                "runs": runs,
            }
        )
    best = max(rows, key=lambda r: r["users_per_s"])
    ranking = statistics.median(alone["random"])
    consecutive = statistics.median(alone["consecutive"])
    if as_json:
        figures = {
            "benchmark": "fleet",
            "users_per_s": best["users_per_s"],
            "ranking_alone_users_per_s": ranking,
            "fleet_over_ranking_alone": best["users_per_s"] / ranking,
            "ranking_alone_consecutive_users_per_s": consecutive,
            "fleet_over_ranking_alone_consecutive": best["users_per_s"] / consecutive,
            "by_processes": rows,
        }
        click.echo(json.dumps(figures))
    else:
        for r in rows:
            click.echo(
                f"processes={r['processes']:<3} users={r['users']:<9} "
                f"median total {r['total_s']:.2f}s  {r['users_per_s']:,.0f} users/s "
                f"({r['users_per_s'] / ranking:.2f}x ranking alone on one thread, "
                f"{r['users_per_s'] / consecutive:.2f}x on consecutive users)"
            )


def _bench_shards(
    base: Settings,
    users: int,
    repeats: int,
    whole: Path,
    shards: int,
    sharded: Path | None,
    as_json: bool,
) -> None:
    from recfleet.cli.bench_shards import compare, print_table

    if sharded is None:
        raise click.UsageError("--shards needs --sharded-artifacts (recfleet artifacts shard)")
    with tempfile.TemporaryDirectory(prefix="recfleet-bench-") as logs:
        try:
            rows = compare(
                base,
                whole=whole,
                sharded=sharded,
                shards=shards,
                users=users,
                repeats=repeats,
                logs=Path(logs),
                show=not as_json,
            )
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
    for line in print_table(rows):
        click.echo(line)
    if as_json:
        click.echo(json.dumps({"benchmark": "fleet-shards", "shards": shards, "layouts": rows}))


bench.add_command(bench_store)
bench.add_command(bench_reads)
bench.add_command(bench_hostile)
