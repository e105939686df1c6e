"""Redis dies mid-batch and comes back with what it acknowledged (append-only file)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from recfleet.shared.settings import Settings
from tests.support.batches import BATCH_USERS, post_batch, under_way, wait_complete
from tests.support.fleet import Fleet
from tests.support.invariants import assert_invariant, check_invariant
from tests.support.polling import wait_until
from tests.support.reports import report_tally
from tests.support.services import PrivateRedis

pytestmark = pytest.mark.faults
OUTAGE_S = 3.0


def test_redis_killed_and_restarted_mid_batch(
    fault_settings: Settings, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    with Fleet(fault_settings, tmp_path) as fleet:
        batches, at_kill = under_way(fleet)
        private_redis.kill()
        killed = time.monotonic()
        wait_until(lambda: not fleet.ready(), 30, "the gateway to report not ready")
        refused = post_batch(fleet.base_url, BATCH_USERS)
        status = httpx.get(f"{fleet.base_url}/api/batches/{next(iter(batches))}", timeout=10)
        # Workers hold their jobs and retry in place meanwhile.
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - killed)))
        private_redis.start()
        wait_until(fleet.ready, 60, "the gateway to be ready again")
        wait_complete(fault_settings, list(batches), timeout=120)
        redelivered = fleet.redeliveries()
        requeued = fleet.metric('recfleet_worker_jobs_total{outcome="requeued"}')
        done = fleet.metric('recfleet_worker_jobs_total{outcome="done"}')
    tally = check_invariant(fault_settings, batches)
    report_tally(
        "Redis kill -9 + restart",
        tally,
        submitted=tally.users + len(BATCH_USERS),
        redelivered=redelivered,
        requeued=int(requeued),
        outage_s=OUTAGE_S,
        refused_while_down=len(BATCH_USERS),
    )
    for resp in (refused, status):
        assert resp.status_code == 503, resp.text
        assert int(resp.headers["Retry-After"]) > 0
    assert at_kill.users_finished < at_kill.users_total
    assert_invariant(tally)
    assert tally.dlq == 0
    # A short outage is ridden out in place: no job goes back to the queue.
    assert done > 0, "the workers' counters were not read"
    assert requeued == 0 and redelivered == 0, (requeued, redelivered)
