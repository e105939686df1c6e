"""The broker dies, is not there yet, fills up, or the network to it breaks."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pika
import pytest
import redis

from recfleet.shared.settings import Settings
from tests.support.batches import (
    BATCH_USERS,
    post_batch,
    progress,
    submit_batches,
    under_way,
    wait_complete,
    wait_fraction,
)
from tests.support.fleet import Fleet
from tests.support.invariants import assert_invariant, check_invariant
from tests.support.polling import wait_until
from tests.support.proxy import TcpProxy
from tests.support.reports import report_tally
from tests.support.services import PrivateRabbit

pytestmark = pytest.mark.faults


def via(proxy: TcpProxy) -> str:
    """The broker's URL through the proxy (settings keep AMQP URLs as validated strings)."""
    return f"amqp://guest:guest@127.0.0.1:{proxy.port}/"


def assert_refused(resp: httpx.Response) -> None:
    """Not accepted, and the client is told when to come back."""
    assert resp.status_code == 503, resp.text
    assert int(resp.headers["Retry-After"]) > 0


def test_broker_killed_and_restarted_mid_batch(
    fault_settings: Settings, private_rabbit: PrivateRabbit, tmp_path: Path
) -> None:
    with Fleet(fault_settings, tmp_path) as fleet:
        batches, _ = under_way(fleet)
        private_rabbit.kill()
        at_kill = progress(fault_settings, list(batches))
        wait_until(lambda: not fleet.ready(), 30, "the gateway to report not ready")
        assert_refused(post_batch(fleet.base_url, BATCH_USERS))
        private_rabbit.start()
        down_to_ready = time.monotonic()
        wait_until(fleet.ready, 90, "the gateway to be ready again")
        down_to_ready = time.monotonic() - down_to_ready
        # Accepted after the restart: the topology and confirms came back too.
        batches |= submit_batches(fleet.base_url, 1)
        wait_complete(fault_settings, list(batches), timeout=180)
        redelivered = fleet.redeliveries()
    tally = check_invariant(fault_settings, batches)
    report_tally(
        "RabbitMQ kill -9 + restart",
        tally,
        submitted=tally.users + len(BATCH_USERS),
        redelivered=redelivered,
        done_at_kill=at_kill.users_finished,
        refused_while_down=len(BATCH_USERS),
        ready_again_s=f"{down_to_ready:.1f}",
    )
    assert not at_kill.complete
    assert_invariant(tally)
    assert tally.dlq == 0


def test_broker_unreachable_at_start(
    fault_settings: Settings, proxy: TcpProxy, tmp_path: Path
) -> None:
    proxy.refuse()  # nothing listens where the broker should be
    settings = fault_settings.model_copy(update={"amqp_url": via(proxy)})
    with Fleet(settings, tmp_path) as fleet:
        fleet.start_gateway(wait_ready=False)
        fleet.start_workers(wait_consuming=False)
        assert fleet.api is not None and fleet.workers is not None
        wait_until(lambda: _answers(f"{fleet.base_url}/healthz"), 60, "the gateway to serve")
        wait_until(lambda: len(fleet.worker_children()) == 2, 60, "both workers to start")
        children = fleet.worker_children()
        # For a while: alive, not ready, refusing batches, and not restarting anything.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            assert not fleet.ready()
            assert fleet.api.poll() is None and fleet.workers.poll() is None
            time.sleep(0.2)
        assert_refused(post_batch(fleet.base_url, BATCH_USERS))
        assert not fleet.workers_consuming()
        assert fleet.worker_children() == children
        proxy.listen()  # the broker is up
        started = time.monotonic()
        wait_until(fleet.ready, 60, "the gateway to connect")
        wait_until(fleet.workers_consuming, 60, "the workers to connect")
        recovered_s = time.monotonic() - started
        assert fleet.worker_children() == children
        batches = submit_batches(fleet.base_url, 3)
        wait_complete(fault_settings, list(batches))
        restarts = fleet.worker_restarts()
    tally = check_invariant(fault_settings, batches)
    report_tally(
        "broker unreachable at start",
        tally,
        submitted=tally.users + len(BATCH_USERS),
        refused_while_down=len(BATCH_USERS),
        worker_restarts=len(restarts),
        recovered_s=f"{recovered_s:.1f}",
    )
    assert_invariant(tally)
    assert restarts == [], f"the supervisor restarted workers that exited with {restarts}"


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


BURST = 12


def test_full_queue_under_a_burst_refuses_what_it_cannot_confirm(
    fault_settings: Settings, tmp_path: Path
) -> None:
    settings = fault_settings.model_copy(update={"queue_max_length": 5})
    users = BATCH_USERS[:2000]  # two jobs per batch; the queue holds five jobs
    with Fleet(settings, tmp_path) as fleet:
        fleet.start_gateway()
        answers = asyncio.run(_burst(fleet.base_url, users, BURST))
        # A quorum queue tells publishers it is full a little late, so a burst can go
        # past the limit (every job of it confirmed); once past it, it refuses.
        for _ in range(20):
            if any(r.status_code != 202 for r in answers):
                break
            answers.append(post_batch(fleet.base_url, users))
        accepted = {r.json()["batch_id"]: users for r in answers if r.status_code == 202}
        refused = [r for r in answers if r.status_code != 202]
        for resp in refused:
            assert_refused(resp)
            assert "full" in resp.json()["detail"]
        assert accepted and refused
        # Every job in the queue is accounted for: the jobs of accepted batches, and the
        # confirmed part of refused ones (their ledgers count only what was confirmed).
        queued = queue_depth(settings)
        assert queued == ledger_jobs(settings)
        assert queued >= settings.queue_max_length
        # Workers start: the client's retries, after Retry-After, get in.
        fleet.start_workers()
        retries = 0
        for _ in refused:
            while True:
                resp = post_batch(fleet.base_url, users)
                if resp.status_code == 202:
                    accepted[resp.json()["batch_id"]] = users
                    break
                assert_refused(resp)
                retries += 1
                time.sleep(0.2)
        wait_complete(settings, list(accepted))
    tally = check_invariant(settings, accepted)
    report_tally(
        "full queue burst",
        tally,
        submitted=len(users) * (len(answers) + retries + len(refused)),
        queued_at_burst=queued,
        max_length=settings.queue_max_length,
        refused_first=len(refused),
        refused_retries=retries,
    )
    assert_invariant(tally)
    assert len(accepted) == len(answers)


def queue_depth(settings: Settings) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(str(settings.amqp_url)))
    try:
        ok = conn.channel().queue_declare(settings.jobs_queue, passive=True)
        return int(ok.method.message_count)
    finally:
        conn.close()


def ledger_jobs(settings: Settings) -> int:
    """Jobs counted by every batch ledger under the settings' prefix."""
    client = redis.Redis.from_url(str(settings.redis_url))
    try:
        ledgers = [
            key
            for key in client.scan_iter(match=f"{settings.redis_prefix}:b:*")
            if not key.endswith((b":done", b":dead"))
        ]
        return sum(int(client.hget(key, "jobs_total") or 0) for key in ledgers)
    finally:
        client.close()


async def _burst(base_url: str, users: list[int], n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        return await asyncio.gather(
            *(
                client.post("/api/playlist/beta_recommend/", json={"user_ids": users, "run": True})
                for _ in range(n)
            )
        )


def test_network_cut_and_black_hole_between_worker_and_broker(
    fault_settings: Settings, proxy: TcpProxy, tmp_path: Path
) -> None:
    workers = fault_settings.model_copy(update={"amqp_url": via(proxy), "heartbeat_s": 2})
    with Fleet(fault_settings, tmp_path, worker_settings=workers) as fleet:
        fleet.start_gateway()
        fleet.start_workers()
        batches = submit_batches(fleet.base_url, 60)
        cut = 0
        for at in (0.1, 0.35):
            wait_fraction(fault_settings, list(batches), at)
            cut += proxy.cut()
            # The next fault must find the workers connected again, however fast they are.
            wait_until(lambda: proxy.links() >= 2, 30, "both workers to reconnect")
        # A black hole: the sockets stay open, nothing gets through; only heartbeats tell.
        wait_fraction(fault_settings, list(batches), 0.6)
        holed = proxy.black_hole()
        wait_complete(fault_settings, list(batches), timeout=120)
        redelivered = fleet.redeliveries()
    tally = check_invariant(fault_settings, batches)
    report_tally(
        "network cut worker<->broker",
        tally,
        redelivered=redelivered,
        connections_reset=cut,
        connections_black_holed=holed,
    )
    # Each cut resets the connections open at that moment: at least both workers' once.
    assert cut >= 2 and holed >= 2
    assert_invariant(tally)
    assert tally.dlq == 0


def test_broker_silent_to_the_gateway_gets_503_never_202(
    fault_settings: Settings, proxy: TcpProxy, tmp_path: Path
) -> None:
    gateway = fault_settings.model_copy(update={"amqp_url": via(proxy), "publish_timeout_s": 2.0})
    with Fleet(gateway, tmp_path, worker_settings=fault_settings) as fleet:
        fleet.start_gateway()
        fleet.start_workers()
        proxy.black_hole()  # the gateway's publishes and their confirms vanish
        started = time.monotonic()
        refused = post_batch(fleet.base_url, BATCH_USERS)
        waited_s = time.monotonic() - started
        assert_refused(refused)
        assert "did not confirm in time" in refused.json()["detail"]
        proxy.cut()  # the connection dies; aio-pika's robust connection comes back
        wait_until(fleet.ready, 60, "the gateway to reconnect")
        batches = submit_batches(fleet.base_url, 2)
        wait_complete(fault_settings, list(batches))
    tally = check_invariant(fault_settings, batches)
    report_tally(
        "broker silent to the gateway",
        tally,
        submitted=tally.users + len(BATCH_USERS),
        refused_unconfirmed=len(BATCH_USERS),
        waited_s=f"{waited_s:.1f}",
    )
    assert_invariant(tally)
