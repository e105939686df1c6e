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
from recfleet.cli.measure import cleanup, measure
from recfleet.shared.messages import new_id
from recfleet.shared.settings import Settings, get_settings


@click.group()
def bench() -> None:
    """Benchmarks (programs, not tests): ranking alone, or the whole fleet."""


@bench.command("rank", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def bench_rank(ctx: click.Context) -> None:
    """Ranking throughput of one torch thread, without a broker (see --help of the program)."""
    from recfleet.worker.bench_rank import main as rank_main

    rank_main(list(ctx.args))


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
    Redis. Uses its own queues and Redis prefix, deleted afterwards.

    With --shards N: one worker per shard of --sharded-artifacts against N workers on the
    unsharded --artifacts, with each worker process's private and shared memory."""
    base = get_settings()
    if shards is not None:
        _bench_shards(
            base, users, repeats, artifacts or base.artifacts, shards, sharded_artifacts, as_json
        )
        return
    rows: list[dict[str, Any]] = []
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
            console.print(
                f"processes {n}: {run.users:,} users in {run.total_s:.2f}s "
                f"(submit {run.submit_s:.2f}s) = {run.users_per_s:,.0f} users/s, "
                f"cold {run.cold_users:,}"
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
    if as_json:
        click.echo(
            json.dumps(
                {"benchmark": "fleet", "users_per_s": best["users_per_s"], "by_processes": rows}
            )
        )
    else:
        for r in rows:
            click.echo(
                f"processes={r['processes']:<3} users={r['users']:<9} "
                f"median total {r['total_s']:.2f}s  {r['users_per_s']:,.0f} users/s"
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
