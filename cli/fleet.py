"""Start a gateway and workers on this host as child processes (for the demo and benchmarks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

from recfleet.shared.settings import Settings


class FleetError(Exception):
    """A local gateway or worker did not start."""


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that hands ``settings`` to a child process."""
    env = dict(os.environ)
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            # An unset optional setting (a shard, a replica count): unset in the child too.
            env.pop(f"RECFLEET_{name.upper()}", None)
            continue
        env[f"RECFLEET_{name.upper()}"] = (
            str(value).lower() if isinstance(value, bool) else str(value)
        )
    return env


class LocalFleet:
    """A gateway and a worker supervisor with N processes, stopped gracefully on exit."""

    def __init__(
        self, settings: Settings, processes: int, log_dir: Path, *, start_api: bool = True
    ) -> None:
        self.settings = settings
        self.processes = processes
        self.log_dir = log_dir
        self.start_api = start_api
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: subprocess.Popen[bytes] | None = None
        self.base_url = settings.api_url

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # The child keeps its own copy of the descriptor; ours closes at once.
        with (self.log_dir / f"{name}.log").open("ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "recfleet.cli.main", *args],
                env=settings_env(self.settings),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def __enter__(self) -> LocalFleet:
        if self.processes:
            self.workers = self._spawn("worker", ["worker", "--processes", str(self.processes)])
        if self.start_api:
            self.api = self._spawn("api", ["api"])
            self._wait_ready()
        return self

    def _wait_ok(
        self, url: str, proc: subprocess.Popen[bytes] | None, name: str, deadline: float
    ) -> None:
        """Poll ``url`` until it answers 200. Raises FleetError if ``proc`` exits or time runs
        out, naming the log to read."""
        log = self.log_dir / f"{name}.log"
        while True:
            if proc is not None and proc.poll() is not None:
                raise FleetError(f"{name} exited; see {log}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise FleetError(f"{url} did not answer 200 in time; see {log}")
            time.sleep(0.2)

    def _wait_ready(self, timeout: float = 60) -> None:
        self._wait_ok(f"{self.base_url}/readyz", self.api, "api", time.monotonic() + timeout)

    def worker_metrics_ports(self) -> list[int]:
        return [self.settings.metrics_port + i for i in range(self.processes)]

    def wait_workers_consuming(self, timeout: float = 120) -> None:
        """Wait until every worker process answers its health check (model loaded, consuming)."""
        deadline = time.monotonic() + timeout
        for port in self.worker_metrics_ports():
            self._wait_ok(f"http://127.0.0.1:{port}/healthz", self.workers, "worker", deadline)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for proc in (self.api, self.workers):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (self.api, self.workers):
            if proc is None:
                continue
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
