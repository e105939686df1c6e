"""Fixtures of the fault-injection suite: private RabbitMQ and Redis, a TCP proxy, settings.

Destructive faults (kill the broker, kill Redis, cut connections) never touch the
services on the standard ports: the session starts its own RabbitMQ node and its own
Redis (append-only file, fsync on every write, as a Redis that must not lose results
runs), and stops them at the end even when a test fails. Each test gets its own queue
names and Redis prefix on them, deleted afterwards.

Every test prints one figures line; the terminal summary repeats them all and
``test-artifacts/faults.txt`` keeps them.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import RedisDsn

from recfleet.shared.settings import Settings
from tests.support.net import free_ports, port_open
from tests.support.proxy import TcpProxy
from tests.support.reports import FIGURES
from tests.support.services import PrivateRabbit, PrivateRedis
from tests.support.settings import make_settings, purge


@pytest.fixture(scope="session")
def private_rabbit() -> Iterator[PrivateRabbit]:
    # Not under pytest's temporary root: user rabbitmq must be able to reach the directory.
    root = Path(tempfile.mkdtemp(prefix="rftest-rabbit-"))
    rabbit = PrivateRabbit(root)
    try:
        rabbit.start()
        yield rabbit
    finally:
        rabbit.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(private_rabbit: PrivateRabbit) -> Iterator[TcpProxy]:
    """A proxy in front of the private broker, listening."""
    p = TcpProxy(private_rabbit.port)
    try:
        p.listen()
        yield p
    finally:
        p.close()


@pytest.fixture
def fault_settings(
    private_rabbit: PrivateRabbit, private_redis: PrivateRedis, small_artifacts: Path
) -> Iterator[Settings]:
    """Private names on the private broker and Redis. Every complete batch may become
    current: most users of the test batches are unknown, so cold."""
    s = make_settings(
        small_artifacts,
        amqp_url=private_rabbit.url,
        redis_url=RedisDsn(private_redis.url),
        gate_max_cold_fraction=1.0,
        metrics_port=free_ports(2),
        log_json=True,
        log_level="DEBUG",
    )
    yield s
    # A failed test may leave its fault in place: bring both back before purging.
    if not port_open(private_rabbit.port):
        private_rabbit.start()
    if not port_open(private_redis.port):
        private_redis.start()
    purge(s)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("fault injection figures")
    for line in FIGURES:
        terminalreporter.write_line(line)
    out = terminalreporter.config.rootpath / "test-artifacts" / "faults.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(line + "\n" for line in FIGURES))
