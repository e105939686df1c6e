"""Worker processes die or are told to stop while they hold jobs."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from recfleet.shared.settings import Settings
from tests.support.batches import progress, under_way, wait_complete
from tests.support.fleet import Fleet
from tests.support.invariants import assert_invariant, check_invariant
from tests.support.polling import wait_until
from tests.support.reports import report_tally

pytestmark = pytest.mark.faults


def test_kill_9_a_worker_mid_job(fault_settings: Settings, tmp_path: Path) -> None:
    with Fleet(fault_settings, tmp_path) as fleet:
        batches, _ = under_way(fleet)
        victim = fleet.worker_children()[0]
        os.kill(victim, signal.SIGKILL)
        wait_complete(fault_settings, list(batches))
        wait_until(
            lambda: victim not in fleet.worker_children() and len(fleet.worker_children()) == 2,
            30,
            "the supervisor to replace the killed worker",
        )
        redelivered = fleet.redeliveries()
        handled = fleet.jobs_handled()
    tally = check_invariant(fault_settings, batches)
    report_tally(
        "kill -9 worker",
        tally,
        redelivered=redelivered,
        handled_twice=sum(1 for n in handled.values() if n > 1),
    )
    assert_invariant(tally)
    assert tally.dlq == 0
    # The killed worker held unacked jobs: they came back to the others.
    assert redelivered >= 1


def test_sigterm_drains_the_job_in_hand_and_requeues_the_rest(
    fault_settings: Settings, tmp_path: Path
) -> None:
    with Fleet(fault_settings, tmp_path) as fleet:
        batches, _ = under_way(fleet)
        # As an orchestrator stops a pod: SIGTERM to the supervisor, which tells each worker.
        exit_code = fleet.stop_workers(signal.SIGTERM, timeout=60)
        stopped_at = progress(fault_settings, list(batches))
        fleet.start_workers()
        wait_complete(fault_settings, list(batches))
        redelivered = fleet.redeliveries()
        handled = fleet.jobs_handled()
    tally = check_invariant(fault_settings, batches)
    twice = sorted(job for job, n in handled.items() if n > 1)
    report_tally(
        "SIGTERM workers",
        tally,
        redelivered=redelivered,
        handled_twice=len(twice),
        done_before_restart=stopped_at.users_finished,
    )
    assert exit_code == 0
    assert not stopped_at.complete, "the batches finished before SIGTERM landed"
    assert_invariant(tally)
    assert tally.dlq == 0
    # Draining acks every job it finished: none of them is handled again.
    assert twice == [], twice
    assert sum(handled.values()) == stopped_at.jobs_total
