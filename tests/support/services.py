"""Private RabbitMQ nodes and Redis servers on free ports, for tests that kill, cut or
reconfigure a service: the shared ones on the standard ports are never touched.

Each instance lives in a directory of its own, is started and stopped by the pid in its
pid file, and can be killed with SIGKILL (as when a host dies) and started again on the
same port with the same data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from recfleet.shared.messages import new_id
from tests.support.net import free_port, wait_port


def read_pid(path: Path) -> int | None:
    """The pid written in ``path``, or None if there is none (yet)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def kill_pid(pid: int | None, sig: signal.Signals = signal.SIGKILL) -> None:
    """Send ``sig`` to ``pid`` if it still runs (nothing for None)."""
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


# -- a private RabbitMQ node ------------------------------------------------------------


class PrivateRabbit:
    """A RabbitMQ node of its own: node name, ports, configuration and data directory.

    Debian's scripts run the node as user ``rabbitmq``, so the directory must be one that
    user can reach (not under pytest's temporary root); it is handed to that user.
    ``config`` adds lines to the node's rabbitmq.conf (cluster peers, say); ``node``
    names it (default: a fresh ``rft…@localhost``); ports default to free ones.
    """

    def __init__(
        self,
        root: Path,
        *,
        node: str | None = None,
        port: int | None = None,
        dist_port: int | None = None,
        config: str = "",
    ) -> None:
        self.root = root
        self.node = node or f"rft{new_id()[:10]}@localhost"
        self.port = port or free_port()
        self.dist_port = dist_port or free_port()
        self.pid_file = root / "pid"
        root.mkdir(parents=True, exist_ok=True)
        # A configuration file of its own, or the system one's listener port would win.
        (root / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n{config}"
        )
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

    @property
    def pid(self) -> int | None:
        return read_pid(self.pid_file)

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
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
        done = self.ctl("wait", str(self.pid_file), "--timeout", "90")
        if done.returncode != 0:
            raise RuntimeError(f"private RabbitMQ did not start: {done.stdout}{done.stderr}")
        wait_port(self.port, open_=True, timeout=30, what="private RabbitMQ")

    def kill(self) -> None:
        """SIGKILL the node: no clean shutdown, as when a host dies."""
        kill_pid(self.pid)
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
        pid = self.pid
        if self.ctl("stop", timeout=60).returncode != 0:
            kill_pid(pid)
        with contextlib.suppress(RuntimeError):
            wait_port(self.port, open_=False, timeout=30, what="stopped RabbitMQ")


# -- a private Redis ------------------------------------------------------------------------


class PrivateRedis:
    """A Redis of its own that keeps its data across a kill: AOF, fsync on every write."""

    def __init__(
        self, root: Path, *, port: int | None = None, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.root = root
        self.port = port or free_port()
        self.pid_file = root / "redis.pid"
        self.extra_args = extra_args
        root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return read_pid(self.pid_file)

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
        kill_pid(self.pid)
        wait_port(self.port, open_=False, timeout=30, what="killed Redis")

    def stop(self) -> None:
        kill_pid(self.pid, signal.SIGTERM)
        with contextlib.suppress(RuntimeError):
            wait_port(self.port, open_=False, timeout=30, what="stopped Redis")
