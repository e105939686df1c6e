"""Real clusters on loopback for the cluster tests: 6 redis-server processes in a Redis
Cluster (3 primaries, 3 replicas) and 3 RabbitMQ nodes joined into one cluster.

Every process is started here and stopped here by its pid; temporary directories are
removed. Ports are picked free.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on loopback right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():  # type: ignore[operator]
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f}s")
        time.sleep(0.2)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(n: int) -> list[int]:
    """``n`` free ports whose cluster bus ports (port + 10000) are free too."""
    ports: list[int] = []
    for candidate in random.sample(range(20000, 50000), 400):
        if _port_free(candidate) and _port_free(candidate + 10000):
            ports.append(candidate)
            if len(ports) == n:
                return ports
    raise RuntimeError("no free ports for a Redis Cluster")


@dataclass
class RedisClusterNodes:
    """3 primaries + 3 replicas; ``cluster-node-timeout`` small so failover is quick."""

    ports: list[int] = field(default_factory=lambda: cluster_ports(6))
    node_timeout_ms: int = 1000
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rf-rcluster-")))
    pids: dict[int, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> None:
        """Start the 6 nodes and create the cluster. Raises TimeoutError if it never forms."""
        for port in self.ports:
            (self.base / str(port)).mkdir()
            self._spawn(port)
        for port in self.ports:
            pidfile = self.base / str(port) / "pid"
            _wait(pidfile.is_file, 30, f"redis {port} wrote no pid file")
            self.pids[port] = int(pidfile.read_text())
            _wait(lambda p=port: redis.Redis(port=p).ping(), 10, f"redis {port} did not answer")
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        _wait(self.healthy, 30, "the Redis Cluster did not reach cluster_state:ok")
        _wait(self._replicas_synced, 30, "the replicas did not finish their first sync")

    def _replicas_synced(self) -> bool:
        roles = [redis.Redis(port=p).info("replication") for p in self.ports]
        replicas = [r for r in roles if r["role"] == "slave"]
        return len(replicas) == 3 and all(r["master_link_status"] == "up" for r in replicas)

    def _spawn(self, port: int) -> None:
        d = self.base / str(port)
        (d / "pid").unlink(missing_ok=True)
        subprocess.run(
            [
                "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                "--cluster-node-timeout", str(self.node_timeout_ms),
                # A replica fails over however long it was apart from its primary,
                # and replicas sync at once (no 5 s wait to batch diskless syncs).
                "--cluster-replica-validity-factor", "0",
                "--repl-diskless-sync-delay", "0",
                "--save", "", "--appendonly", "no", "--dir", str(d),
                "--daemonize", "yes", "--pidfile", str(d / "pid"), "--logfile", str(d / "log"),
            ],
            check=True,
        )  # fmt: skip

    def restart(self, port: int) -> None:
        """Start a killed node again; it rejoins (as a replica of whoever took over) and
        the cluster is healthy again. Raises TimeoutError if it does not."""
        self._spawn(port)
        pidfile = self.base / str(port) / "pid"
        _wait(pidfile.is_file, 30, f"redis {port} wrote no pid file")
        self.pids[port] = int(pidfile.read_text())
        _wait(self.healthy, 30, "the Redis Cluster did not heal")
        _wait(self._replicas_synced, 30, "the replicas did not sync again")

    def healthy(self) -> bool:
        """Every live node says the cluster is ok and 3 primaries serve the slots."""
        live = [p for p in self.ports if p in self.pids]
        for port in live:
            info = redis.Redis(port=port, socket_timeout=2).cluster("info")
            if info.get("cluster_state") != "ok":
                return False
        return len(self.primaries()) == 3

    def primaries(self) -> list[int]:
        """Ports of the live primaries that own slots."""
        port = next(p for p in self.ports if p in self.pids)
        nodes = redis.Redis(port=port, socket_timeout=2).cluster("nodes")
        return sorted(
            int(addr.split(":")[1].split("@")[0])
            for addr, n in nodes.items()
            if "master" in n["flags"] and "fail" not in n["flags"] and n["slots"]
        )

    def primary_of(self, key: str) -> int:
        """The port of the primary serving ``key``'s slot."""
        port = next(p for p in self.ports if p in self.pids)
        slot = redis.Redis(port=port).cluster("keyslot", key)
        for start, end, primary, *_ in redis.Redis(port=port).execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                return int(primary[1])
        raise KeyError(key)

    def kill(self, port: int) -> None:
        """kill -9 one node."""
        os.kill(self.pids.pop(port), signal.SIGKILL)

    def stop(self) -> None:
        for port in self.ports:
            pidfile = self.base / str(port) / "pid"
            if port not in self.pids and pidfile.is_file():
                self.pids[port] = int(pidfile.read_text())  # started, not yet recorded
        for port in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pids.pop(port), signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)


@dataclass
class RabbitCluster:
    """3 RabbitMQ nodes on loopback joined into one cluster (as the services page shows)."""

    ports: list[int] = field(default_factory=lambda: free_ports(3))
    dist_ports: list[int] = field(default_factory=lambda: free_ports(3))
    tag: str = field(default_factory=lambda: f"rfc{os.getpid() % 100000}")
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rf-rabbit-")))
    pids: dict[str, int] = field(default_factory=dict)

    def node(self, i: int) -> str:
        return f"{self.tag}n{i}@localhost"

    @property
    def nodes(self) -> list[str]:
        return [self.node(i) for i in range(3)]

    def url(self, i: int) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.ports[i]}/"

    @property
    def urls(self) -> str:
        """All nodes, comma-separated, as RECFLEET_AMQP_URL takes them."""
        return ",".join(self.url(i) for i in range(3))

    def start(self) -> None:
        """Start 3 nodes and join nodes 1 and 2 to node 0. Raises on a failed step."""
        self.base.chmod(0o755)
        for i in range(3):
            d = self.base / f"n{i}"
            d.mkdir()
            (d / "enabled_plugins").write_text("[].\n")
            # guest may connect from loopback only; the listener is this node's own.
            (d / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.ports[i]}\n")
            (d / "rabbitmq-env.conf").write_text("ERL_EPMD_ADDRESS=127.0.0.1\n")
            subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(d)], check=True)
            d.chmod(0o755)
            env = {
                **os.environ,
                "RABBITMQ_NODENAME": self.node(i),
                "RABBITMQ_NODE_PORT": str(self.ports[i]),
                "RABBITMQ_DIST_PORT": str(self.dist_ports[i]),
                "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
                "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
                "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
                "RABBITMQ_LOG_BASE": str(d / "log"),
                "RABBITMQ_PID_FILE": str(d / "pid"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            }
            subprocess.run(["rabbitmq-server", "-detached"], env=env, check=True)
        for i in range(3):
            self.ctl(i, "wait", str(self.base / f"n{i}" / "pid"), "--timeout", "120")
            self.pids[self.node(i)] = int((self.base / f"n{i}" / "pid").read_text())
        for i in (1, 2):
            self.ctl(i, "stop_app")
            self.ctl(i, "join_cluster", self.node(0))
            self.ctl(i, "start_app")
        self.ctl(0, "await_online_nodes", "3", "--timeout", "60")

    def ctl(self, i: int, *args: str, timeout: float = 150) -> str:
        """``rabbitmqctl -n NODE ...``; raises CalledProcessError when it fails."""
        return subprocess.run(
            ["rabbitmqctl", "-n", self.node(i), *args],
            check=True, capture_output=True, text=True, timeout=timeout,
        ).stdout  # fmt: skip

    def leader(self, queue: str, via: int = 0) -> int:
        """Index of the node that leads quorum queue ``queue``."""
        out = self.ctl(via, "list_queues", "name", "leader", "--no-table-headers", "-q")
        for line in out.splitlines():
            name, _, leader = line.strip().partition("\t")
            if name == queue:
                return self.nodes.index(leader.strip())
        raise KeyError(queue)

    def stop_node(self, i: int) -> None:
        """Stop one node's Erlang VM (what an operator or a crash does to it)."""
        self.ctl(i, "stop")
        self.pids.pop(self.node(i), None)

    def stop(self) -> None:
        for node, pid in list(self.pids.items()):
            i = self.nodes.index(node)
            try:
                self.ctl(i, "stop", timeout=60)
            except (subprocess.SubprocessError, OSError):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.pids.pop(node, None)
        shutil.rmtree(self.base, ignore_errors=True)
