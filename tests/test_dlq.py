"""``recfleet dlq`` against the real RabbitMQ."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pika
import pytest
from click.testing import CliRunner

from recfleet.cli.fleet import settings_env
from recfleet.cli.main import cli
from recfleet.shared.messages import make_jobs
from recfleet.shared.settings import Settings, get_settings
from recfleet.shared.topology import HEADER_BATCH_ID, HEADER_USERS, declare_blocking, topology


@pytest.fixture
def dead_jobs(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> Iterator[pika.channel.Channel]:
    for name, value in settings_env(settings).items():
        if name.startswith("RECFLEET_"):
            monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    conn = pika.BlockingConnection(pika.URLParameters(str(settings.amqp_url)))
    channel = conn.channel()
    declare_blocking(channel, topology(settings))
    channel.confirm_delivery()
    for batch in ("batchA", "batchB"):
        for job in make_jobs(batch, list(range(20)), 10):
            props = pika.BasicProperties(
                message_id=job.job_id,
                delivery_mode=2,
                content_type="application/json",
                headers={HEADER_BATCH_ID: batch, HEADER_USERS: len(job.user_ids)},
            )
            channel.basic_publish(
                settings.dead_letter_exchange, settings.dead_letter_queue, job.encode(), props
            )
    yield channel
    conn.close()
    get_settings.cache_clear()


def _count(channel: pika.channel.Channel, queue: str, want: int) -> int:
    """The queue's message count once it reaches ``want`` (or after 10 s): a quorum queue
    applies returned messages through its log, a moment after the client settled them."""
    deadline = time.monotonic() + 10
    while True:
        count = int(channel.queue_declare(queue, passive=True).method.message_count)
        if count == want or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


def test_list_replay_purge_by_batch_and_job(
    dead_jobs: pika.channel.Channel, settings: Settings
) -> None:
    runner = CliRunner()
    listed = runner.invoke(cli, ["dlq", "list", "--batch", "batchA"])
    assert listed.exit_code == 0, listed.output
    assert "batchA-0" in listed.output and "batchA-1" in listed.output
    assert "batchB-0" not in listed.output
    assert _count(dead_jobs, settings.dead_letter_queue, 4) == 4  # listing changes nothing

    replayed = runner.invoke(cli, ["dlq", "replay", "--job", "batchA-1"])
    assert replayed.exit_code == 0 and "replayed 1 jobs" in replayed.output
    method, props, _ = dead_jobs.basic_get(settings.jobs_queue, auto_ack=True)
    assert method is not None and props.message_id == "batchA-1"
    assert _count(dead_jobs, settings.dead_letter_queue, 3) == 3

    purged = runner.invoke(cli, ["dlq", "purge", "--batch", "batchB", "--yes"])
    assert purged.exit_code == 0 and "dropped 2 jobs" in purged.output
    assert _count(dead_jobs, settings.dead_letter_queue, 1) == 1
    remaining = runner.invoke(cli, ["dlq", "list"])
    assert "batchA-0" in remaining.output and "batchB" not in remaining.output
