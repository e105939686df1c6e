"""Scaling down during a batch: SIGTERM to half the workers loses nothing, cuts off no job."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest

from recfleet.shared.settings import Settings
from tests.support.batches import progress, submit_batches, wait_complete, wait_fraction
from tests.support.fleet import Fleet
from tests.support.invariants import assert_invariant, check_invariant
from tests.support.net import free_ports
from tests.support.polling import wait_until
from tests.support.reports import report_tally

pytestmark = pytest.mark.faults


def test_sigterm_to_half_the_workers_mid_batch(fault_settings: Settings, tmp_path: Path) -> None:
    # Two worker groups of two processes, as two replicas; the second is scaled away.
    leaving = fault_settings.model_copy(update={"metrics_port": free_ports(2)})
    with (
        Fleet(fault_settings, tmp_path / "staying") as staying,
        Fleet(fault_settings, tmp_path / "leaving", worker_settings=leaving) as scaled_away,
    ):
        staying.start_gateway()
        # The work is queued before any worker starts, so that the scale-down lands in
        # the middle of it however fast the workers are (they kept pace with the POSTs).
        batches = submit_batches(staying.base_url, 100)
        staying.start_workers(wait_consuming=False)
        scaled_away.start_workers(wait_consuming=False)
        wait_until(
            lambda: staying.workers_consuming() and scaled_away.workers_consuming(),
            120,
            "both worker groups to consume",
        )
        wait_fraction(fault_settings, list(batches), 0.1)
        at_scale_down = progress(fault_settings, list(batches))
        exit_code = scaled_away.stop_workers(signal.SIGTERM, timeout=60)
        wait_complete(fault_settings, list(batches))
        redelivered = staying.redeliveries()
        handled: Counter[str] = staying.jobs_handled() + scaled_away.jobs_handled()
    tally = check_invariant(fault_settings, batches)
    twice = sorted(job for job, n in handled.items() if n > 1)
    report_tally(
        "scale down (SIGTERM half the workers)",
        tally,
        redelivered=redelivered,
        handled_twice=len(twice),
        done_at_scale_down=at_scale_down.users_finished,
    )
    assert exit_code == 0
    assert not at_scale_down.complete, "the batches finished before the scale-down"
    assert_invariant(tally)
    assert tally.dlq == 0
    # The leaving workers acked every job they finished: no job ran twice.
    assert twice == [], twice
