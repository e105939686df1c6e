"""Jobs that are slow, malformed, poisonous or delivered more than once."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
import redis
from prometheus_client import REGISTRY

from recfleet.cli.fleet import RECFLEET, settings_env
from recfleet.shared.messages import Job
from recfleet.shared.settings import Settings
from recfleet.worker.consumer import Consumer
from recfleet.worker.handler import JobHandler, PendingJob
from recfleet.worker.models import ModelStore
from tests.support.batches import BATCH_USERS, submit_batches, wait_complete
from tests.support.fleet import Fleet
from tests.support.invariants import assert_invariant, check_invariant, dead_letters
from tests.support.polling import wait_until
from tests.support.queues import publish, read_queue
from tests.support.reports import report_tally

pytestmark = pytest.mark.faults


# -- a job slower than two heartbeat intervals -------------------------------------------------


class SlowHandler(JobHandler):
    """The real handler, after a pause longer than several heartbeat intervals."""

    def __init__(self, *args: object, pause_s: float, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.pause_s = pause_s
        self.calls: Counter[str] = Counter()

    def start(self, job: Job, *, want_results: bool = False) -> PendingJob:
        self.calls[job.job_id] += 1
        time.sleep(self.pause_s)
        return super().start(job, want_results=want_results)


@pytest.fixture
def slow_consumer(fault_settings: Settings) -> Iterator[tuple[Consumer, SlowHandler]]:
    settings = fault_settings.model_copy(update={"heartbeat_s": 1})
    client = redis.Redis.from_url(str(settings.redis_url))
    models = ModelStore(settings.artifacts, k=settings.top_k)
    handler = SlowHandler(settings, models, client, pause_s=5 * settings.heartbeat_s)
    consumer = Consumer(settings, handler)
    thread = threading.Thread(target=consumer.run, name="consumer", daemon=True)
    thread.start()
    try:
        wait_until(lambda: consumer.healthy, 30, "the consumer to start")
        yield consumer, handler
    finally:
        consumer.stop()
        thread.join(timeout=30)
        client.close()


def test_a_job_slower_than_two_heartbeats_keeps_its_connection(
    fault_settings: Settings, slow_consumer: tuple[Consumer, SlowHandler], tmp_path: Path
) -> None:
    consumer, handler = slow_consumer
    connection = consumer._connection
    assert connection is not None and connection._impl.params.heartbeat == 1
    redelivered_before = _sample("recfleet_worker_redeliveries_total")
    with Fleet(fault_settings, tmp_path) as fleet:
        fleet.start_gateway()
        batches = submit_batches(fleet.base_url, 1, BATCH_USERS[:2000])
        wait_complete(fault_settings, list(batches), timeout=60)
    redelivered = _sample("recfleet_worker_redeliveries_total") - redelivered_before
    tally = check_invariant(fault_settings, batches)
    report_tally(
        "job slower than 2 heartbeats",
        tally,
        redelivered=int(redelivered),
        heartbeat_s=1,
        job_s=handler.pause_s,
        reconnects=0 if consumer._connection is connection else 1,
    )
    assert_invariant(tally)
    # The I/O thread kept heartbeating while the compute thread was busy.
    assert consumer._connection is connection and connection.is_open
    assert redelivered == 0 and set(handler.calls.values()) == {1}


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


# -- malformed messages and a poison job -----------------------------------------------------

POISON_USER = 4321  # in the fifth job of a batch of BATCH_USERS
# A worker whose handler kills its process on one user: a job that crashes every worker
# that takes it. Written to a file, so that multiprocessing's spawned children (which
# import the parent's main script) are patched too; production code knows nothing of it.
POISON_WORKER = f"""
import os
import sys

from recfleet.worker.handler import JobHandler

_start = JobHandler.start


def start(self, job, **kwargs):
    if {POISON_USER} in job.user_ids:
        os._exit(70)
    return _start(self, job, **kwargs)


JobHandler.start = start

if __name__ == "__main__":
    from recfleet.cli.main import main

    sys.exit(main())
"""
MALFORMED = {
    "not-json": b"\x00\x01 not json",
    "future-schema": b'{"schema_version": 99, "job_id": "x", "batch_id": "y"}',
    "negative-user": Job(job_id="neg-0", batch_id="neg", user_ids=[1], created_at=1.0)
    .encode()
    .replace(b"[1]", b"[-1]"),
}


def recfleet(settings: Settings, *args: str) -> str:
    done = subprocess.run(
        [*RECFLEET, *args],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout + done.stderr


def test_malformed_messages_and_a_poison_job_end_in_the_dead_letter_queue(
    fault_settings: Settings, tmp_path: Path
) -> None:
    settings = fault_settings.model_copy(update={"delivery_limit": 2})
    script = tmp_path / "poison_worker.py"
    script.write_text(POISON_WORKER)
    with Fleet(settings, tmp_path, worker_argv=[sys.executable, str(script)]) as fleet:
        fleet.start_gateway()
        batches = submit_batches(fleet.base_url, 1)
        publish(
            settings,
            [(body, pika.BasicProperties(message_id=name)) for name, body in MALFORMED.items()],
        )
        fleet.start_workers()
        wait_complete(settings, list(batches), timeout=180)
        redelivered = fleet.redeliveries()
        crashes = fleet.worker_restarts().count("70")
        dead = dead_letters(settings)
        tally = check_invariant(settings, batches, dead)
        listing = recfleet(settings, "dlq", "list")

        # The bug is fixed (ordinary workers): the operator replays the batch's dead jobs.
        assert fleet.stop_workers() == 0
        fleet.worker_argv = list(RECFLEET)
        fleet.start_workers()
        (batch_id,) = batches
        replayed = recfleet(settings, "dlq", "replay", "--batch", batch_id)
        wait_until(
            lambda: check_invariant(settings, batches, []).lost == 0, 60, "the replayed jobs"
        )
        after_replay = check_invariant(settings, batches, [])
    dead_ids = sorted(d.job_id or "-" for d in dead)
    report_tally(
        "malformed + poison",
        tally,
        redelivered=redelivered,
        crashes=crashes,
        dead_jobs=len(dead),
        malformed=len(MALFORMED),
        after_replay_results=after_replay.results,
    )
    assert_invariant(tally)
    poison_job = f"{batch_id}-{BATCH_USERS.index(POISON_USER) // settings.job_size}"
    assert poison_job in dead_ids and set(MALFORMED) <= set(dead_ids), dead_ids
    # Only the poison job's users lack results: the jobs delivered with it ran before it
    # crashed a worker again (one may still sit in the queue, done, if a crash beat its ack).
    assert tally.dlq == settings.job_size
    assert crashes >= settings.delivery_limit
    assert "delivery limit reached" in listing and "rejected by a worker" in listing
    assert "replayed" in replayed
    assert after_replay.results == tally.users and not after_replay.problems, after_replay


# -- the same job delivered more than once -----------------------------------------------------


def snapshot(settings: Settings) -> dict[bytes, object]:
    """Every key of the run: ledgers, job sets, result buckets, generation history.

    Leaves out the recent-batches index, whose scores are the time of the last write.
    """
    client = redis.Redis.from_url(str(settings.redis_url))
    out: dict[bytes, object] = {}
    try:
        for key in client.scan_iter(match=f"{settings.redis_prefix}:*"):
            kind = client.type(key)
            if kind == b"hash":
                out[key] = client.hgetall(key)
            elif kind == b"set":
                out[key] = client.smembers(key)
            elif kind == b"zset" and not key.endswith(b":batches"):
                out[key] = client.zrange(key, 0, -1, withscores=True)
    finally:
        client.close()
    return out


def test_the_same_job_delivered_twice_changes_nothing(
    fault_settings: Settings, tmp_path: Path
) -> None:
    with Fleet(fault_settings, tmp_path) as fleet:
        fleet.start_gateway()
        batches = submit_batches(fleet.base_url, 2)
        messages = read_queue(fault_settings, fault_settings.jobs_queue)
        fleet.start_workers()
        wait_complete(fault_settings, list(batches))
        wait_until(
            lambda: sum(fleet.jobs_handled().values()) == len(messages),
            60,
            "every job to be handled once",
        )
        after_first = snapshot(fault_settings)
        # Twice more, both copies of a job in the queue at once, after the batches
        # completed and became current.
        publish(fault_settings, messages * 2)
        wait_until(
            lambda: sum(fleet.jobs_handled().values()) == 3 * len(messages),
            60,
            "the 2nd and 3rd copies to be handled",
        )
        after_more = snapshot(fault_settings)
        handled = fleet.jobs_handled()
    tally = check_invariant(fault_settings, batches)
    report_tally(
        "same job delivered 2-3 times",
        tally,
        deliveries=sum(handled.values()),
        jobs=len(messages),
        keys_changed=sum(
            1
            for k in after_first.keys() | after_more.keys()
            if after_first.get(k) != after_more.get(k)
        ),
    )
    assert_invariant(tally)
    assert set(handled.values()) == {3}
    assert after_first, "the snapshot holds the run's keys"
    assert after_more == after_first
