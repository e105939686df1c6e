"""``recfleet schedule --daily-at HH:MM``: run the daily ``submit --all`` at a fixed UTC time."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import click

from recfleet.cli.context import api_url_option, pass_settings
from recfleet.cli.submit import submit_cmd
from recfleet.shared.settings import Settings

log = logging.getLogger(__name__)
_TIME = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


def parse_daily_at(text: str) -> tuple[int, int]:
    """``"HH:MM"`` (24-hour, UTC) as (hour, minute). Raises ValueError naming the problem."""
    match = _TIME.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a time of day as HH:MM (00:00 to 23:59)")
    return int(match.group(1)), int(match.group(2))


def next_run(now: datetime, hour: int, minute: int) -> datetime:
    """The first moment strictly after ``now`` at ``hour:minute`` UTC."""
    now = now.astimezone(UTC)
    candidate = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    return candidate if candidate > now else candidate + timedelta(days=1)


def run_daily(
    hour: int,
    minute: int,
    job: Callable[[], None],
    *,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    sleep: Callable[[float], None] = time.sleep,
    runs: int | None = None,
) -> None:
    """Call ``job`` every day at ``hour:minute`` UTC (``runs`` times, or forever).

    A failed run is logged and the schedule goes on: tomorrow's run must not depend on
    today's.
    """
    done = 0
    while runs is None or done < runs:
        due = next_run(clock(), hour, minute)
        log.info("next daily run at %s", due.isoformat(timespec="minutes"))
        while (wait := (due - clock()).total_seconds()) > 0:
            sleep(min(wait, 60.0))
        try:
            job()
        except Exception:  # keep the schedule alive; the failure is in the log
            log.exception("daily run failed")
        done += 1


@click.command()
@click.option(
    "--daily-at",
    "daily_at",
    required=True,
    metavar="HH:MM",
    help="time of day (UTC) to submit every user of the artifacts",
)
@api_url_option
@pass_settings
def schedule(s: Settings, daily_at: str, api_url: str | None) -> None:
    """Submit every user (as `recfleet submit --all --no-wait`) once a day, forever."""
    try:
        hour, minute = parse_daily_at(daily_at)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--daily-at") from exc

    def job() -> None:
        args = ["--all", "--no-wait", *(["--api-url", api_url] if api_url else [])]
        submit_cmd.main(args, standalone_mode=False, obj=s)

    logging.basicConfig(level=logging.INFO)
    run_daily(hour, minute, job)
