"""The daily scheduler's next-run computation and loop (no real waiting)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from recfleet.cli.main import cli
from recfleet.cli.schedule import next_run, parse_daily_at, run_daily


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (datetime(2026, 11, 24, 1, 0, tzinfo=UTC), datetime(2026, 11, 24, 2, 30, tzinfo=UTC)),
        (datetime(2026, 11, 24, 2, 30, tzinfo=UTC), datetime(2026, 11, 25, 2, 30, tzinfo=UTC)),
        (datetime(2026, 11, 24, 23, 59, tzinfo=UTC), datetime(2026, 11, 25, 2, 30, tzinfo=UTC)),
        (datetime(2026, 12, 31, 3, 0, tzinfo=UTC), datetime(2027, 1, 1, 2, 30, tzinfo=UTC)),
    ],
)
def test_next_run(now: datetime, expected: datetime) -> None:
    assert next_run(now, 2, 30) == expected


def test_next_run_converts_other_time_zones_to_utc() -> None:
    from zoneinfo import ZoneInfo

    now = datetime(2026, 11, 24, 3, 0, tzinfo=ZoneInfo("Europe/Stockholm"))  # 02:00 UTC
    assert next_run(now, 2, 30) == datetime(2026, 11, 24, 2, 30, tzinfo=UTC)


@pytest.mark.parametrize("bad", ["24:00", "7:30", "07:60", "0730", "", "ab:cd"])
def test_bad_times_are_refused_with_the_reason(bad: str) -> None:
    with pytest.raises(ValueError, match="HH:MM"):
        parse_daily_at(bad)
    result = CliRunner().invoke(cli, ["schedule", "--daily-at", bad])
    assert result.exit_code == 2 and "HH:MM" in result.output


def test_runs_once_a_day_and_survives_a_failed_run() -> None:
    now = [datetime(2026, 11, 24, 12, 0, tzinfo=UTC)]
    calls: list[datetime] = []

    def job() -> None:
        calls.append(now[0])
        if len(calls) == 1:
            raise RuntimeError("the gateway was down")

    def sleep(seconds: float) -> None:
        now[0] += timedelta(seconds=seconds)

    run_daily(6, 0, job, clock=lambda: now[0], sleep=sleep, runs=3)
    assert calls == [datetime(2026, 11, d, 6, 0, tzinfo=UTC) for d in (25, 26, 27)]
