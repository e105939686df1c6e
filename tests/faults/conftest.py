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

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydantic import AmqpDsn, RedisDsn

from recfleet.shared.messages import new_id
from recfleet.shared.settings import Settings
from tests.conftest import free_port, make_settings, purge
from tests.faults import FIGURES

T = TypeVar("T")

# -- waiting on ports -----------------------------------------------------------------


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def wait_port(port: int, *, open_: bool, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while port_open(port) != open_:
        if time.monotonic() > deadline:
            state = "open" if open_ else "close"
            raise RuntimeError(f"{what}: port {port} did not {state} within {timeout:.0f}s")
        time.sleep(0.05)


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free ports (worker i serves metrics on base + i)."""
    while True:
        base = free_port()
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + n):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def kill_pid(pid: int | None, sig: signal.Signals = signal.SIGKILL) -> None:
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


# -- a private RabbitMQ node ------------------------------------------------------------


class PrivateRabbit:
    """A RabbitMQ node of its own: node name, ports, configuration and data directory.

    Debian's scripts run the node as user ``rabbitmq``, so the directory belongs to it.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.node = f"rft{new_id()[:10]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.pid_file = root / "pid"
        root.mkdir(parents=True, exist_ok=True)
        # A configuration file of its own, or the system one's listener port would win.
        (root / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (root / "rabbitmq-env.conf").write_text("ERL_EPMD_ADDRESS=127.0.0.1\n")
        (root / "enabled_plugins").write_text("[].\n")
        for path in (root, *root.rglob("*")):
            shutil.chown(path, "rabbitmq", "rabbitmq")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        r = self.root
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(r / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(r / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(r / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(r / "mnesia"),
            "RABBITMQ_LOG_BASE": str(r / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
        }

    def _ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["rabbitmqctl", "-n", self.node, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self) -> None:
        """Start the node and wait until it accepts AMQP connections."""
        self.pid_file.unlink(missing_ok=True)
        subprocess.run(["rabbitmq-server", "-detached"], env=self._env(), check=True, timeout=60)
        done = self._ctl("wait", str(self.pid_file), "--timeout", "90")
        if done.returncode != 0:
            raise RuntimeError(f"private RabbitMQ did not start: {done.stdout}{done.stderr}")
        wait_port(self.port, open_=True, timeout=30, what="private RabbitMQ")

    def kill(self) -> None:
        """SIGKILL the node: no clean shutdown, as when a host dies."""
        kill_pid(read_pid(self.pid_file))
        wait_port(self.port, open_=False, timeout=30, what="killed RabbitMQ")
        # epmd forgets the node once its connection drops; a new start needs the name free.
        deadline = time.monotonic() + 30
        while self.node.split("@")[0] in self._names_in_epmd():
            if time.monotonic() > deadline:
                raise RuntimeError("epmd still lists the killed node")
            time.sleep(0.1)

    @staticmethod
    def _names_in_epmd() -> str:
        out = subprocess.run(["epmd", "-names"], capture_output=True, text=True, timeout=10)
        return out.stdout

    def stop(self) -> None:
        """Stop the node (gracefully, or by SIGKILL when it does not answer)."""
        pid = read_pid(self.pid_file)
        if self._ctl("stop", timeout=60).returncode != 0:
            kill_pid(pid)
        with contextlib.suppress(RuntimeError):
            wait_port(self.port, open_=False, timeout=30, what="stopped RabbitMQ")


# -- a private Redis ------------------------------------------------------------------------


class PrivateRedis:
    """A Redis of its own that keeps its data across a kill: AOF, fsync on every write."""

    def __init__(self, root: Path, *, extra_args: tuple[str, ...] = ()) -> None:
        self.root = root
        self.port = free_port()
        self.pid_file = root / "redis.pid"
        self.extra_args = extra_args
        root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        options = {
            "port": self.port,
            "bind": "127.0.0.1",
            "save": "",
            "appendonly": "yes",
            "appendfsync": "always",
            "dir": self.root,
            "pidfile": self.pid_file,
            "logfile": self.root / "redis.log",
            "daemonize": "yes",
        }
        argv = ["redis-server"]
        for name, value in options.items():
            argv += [f"--{name}", str(value)]
        subprocess.run([*argv, *self.extra_args], check=True, timeout=30)
        wait_port(self.port, open_=True, timeout=30, what="private Redis")

    def kill(self) -> None:
        """SIGKILL Redis: what was acknowledged is on disk, nothing else is."""
        kill_pid(read_pid(self.pid_file))
        wait_port(self.port, open_=False, timeout=30, what="killed Redis")

    def stop(self) -> None:
        kill_pid(read_pid(self.pid_file), signal.SIGTERM)
        with contextlib.suppress(RuntimeError):
            wait_port(self.port, open_=False, timeout=30, what="stopped Redis")


# -- a TCP proxy for network faults -------------------------------------------------------


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's socket and ours to the upstream."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    holed: bool = False
    pumps: int = 2

    def abort(self) -> None:
        self.client.transport.abort()
        self.upstream.transport.abort()


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``upstream_port`` on its own event loop.

    ``refuse()`` stops accepting (as a broker that is not up), ``cut()`` resets every
    connection at once (a partition both sides see at once), ``black_hole()`` drops
    every byte of the open connections and passes no close either way (a partition
    only heartbeats can detect); new connections are forwarded normally.
    """

    def __init__(self, upstream_port: int) -> None:
        self.port = free_port()
        self.upstream_port = upstream_port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxy", daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def listen(self) -> None:
        self._call(self._listen())

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    def refuse(self) -> None:
        self._call(self._refuse())

    async def _refuse(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def cut(self) -> int:
        """Reset every open connection; returns how many were cut."""
        return self._call(self._cut())

    async def _cut(self) -> int:
        links = list(self._links)
        for link in links:
            link.abort()
        self._links.clear()
        return len(links)

    def black_hole(self) -> int:
        """Swallow the open connections; returns how many."""
        return self._call(self._black_hole())

    async def _black_hole(self) -> int:
        for link in self._links:
            link.holed = True
        return len(self._links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst, link))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: _Link
    ) -> None:
        try:
            while data := await src.read(65536):
                if link.holed:
                    continue
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            link.pumps -= 1
            # A close passes through, except into a black hole: there each side finds out
            # by itself, and the link goes once both have given up.
            if not link.holed or link.pumps == 0:
                link.abort()
                self._links.discard(link)

    def close(self) -> None:
        self._call(self._refuse())
        self._call(self._cut())
        self._call(self._cancel_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# -- fixtures ---------------------------------------------------------------------------------


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
        amqp_url=AmqpDsn(private_rabbit.url),
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
