"""``recfleet``: run the gateway and workers, build artifacts, submit batches, benchmark.

Each command group lives in its own module; this one only assembles them.
"""

from __future__ import annotations

import click

from recfleet.cli.artifacts import artifacts
from recfleet.cli.bench import bench
from recfleet.cli.db import db
from recfleet.cli.demo import demo
from recfleet.cli.dlq import dlq
from recfleet.cli.drift import drift
from recfleet.cli.feedback import feedback
from recfleet.cli.generations import generations
from recfleet.cli.keys import keys
from recfleet.cli.schedule import schedule
from recfleet.cli.serve import api, worker
from recfleet.cli.submit import status, submit_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """recfleet: daily playlist recommendations for every user, computed by a worker fleet."""


for command in (
    api,
    worker,
    artifacts,
    submit_cmd,
    status,
    bench,
    demo,
    dlq,
    generations,
    schedule,
    drift,
    db,
    feedback,
    keys,
):
    cli.add_command(command)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
