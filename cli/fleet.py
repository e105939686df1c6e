"""Start a gateway and workers on this host as child processes (for the demo, benchmarks
and tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import httpx
from pydantic import SecretStr

from recfleet.shared.settings import Settings

# The ``recfleet`` program, as this interpreter runs it.
RECFLEET = (sys.executable, "-m", "recfleet.cli.main")


class FleetError(Exception):
    """A local gateway or worker did not start, or exited."""


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that hands ``settings`` to a child process."""
    env = dict(os.environ)
    for name, value in settings.model_dump(mode="json").items():
        raw = getattr(settings, name)
        if raw is None:
            # An unset optional setting (a shard, a replica count): unset in the child too.
            env.pop(f"RECFLEET_{name.upper()}", None)
            continue
        if isinstance(raw, SecretStr):  # dumped masked; the child needs the secret
            value = raw.get_secret_value()
        env[f"RECFLEET_{name.upper()}"] = (
            str(value).lower() if isinstance(value, bool) else str(value)
        )
    return env


def children_of(pid: int) -> list[int]:
    """Live child processes of ``pid``, leaving out multiprocessing's resource tracker
    (from /proc; none where there is no /proc)."""
    proc = Path("/proc")
    out = []
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # Fields after the command name, which may itself hold spaces: state, ppid, ...
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z" and "resource_tracker" not in cmdline:
            out.append(int(entry.name))
    return sorted(out)


def _answers_200(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class LocalFleet:
    """A gateway and a worker supervisor (``recfleet worker --processes N``) as child
    processes, stopped gracefully on exit.

    ``with LocalFleet(...)`` starts both and waits for the gateway. The parts can also be
    driven one by one (start the gateway or the workers, stop and start the workers again),
    the gateway and the workers can have settings of their own, and ``worker_argv`` runs
    the workers with another program (a wrapper script) in place of ``recfleet``.
    """

    def __init__(
        self,
        settings: Settings,
        processes: int,
        log_dir: Path,
        *,
        start_api: bool = True,
        api_settings: Settings | None = None,
        worker_settings: Settings | None = None,
        worker_argv: Sequence[str] = RECFLEET,
    ) -> None:
        self.settings = settings
        self.processes = processes
        self.log_dir = log_dir
        self.with_api = start_api
        self.api_settings = api_settings or settings
        self.worker_settings = worker_settings or settings
        self.worker_argv = list(worker_argv)
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: subprocess.Popen[bytes] | None = None
        self.worker_runs = 0
        self.base_url = settings.api_url

    def _spawn(self, log_name: str, argv: list[str], settings: Settings) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # The child keeps its own copy of the descriptor; ours closes at once.
        with (self.log_dir / log_name).open("ab") as log:
            return subprocess.Popen(
                argv, env=settings_env(settings), stdout=log, stderr=subprocess.STDOUT
            )

    def __enter__(self) -> LocalFleet:
        if self.processes:
            self.start_workers(wait_consuming=False)
        if self.with_api:
            try:
                self.start_gateway()
            except BaseException:  # stop the workers too: __exit__ will not run
                self.__exit__(None, None, None)
                raise
        return self

    def start_gateway(self, *, wait_ready: bool = True, timeout: float = 60) -> None:
        """Start ``recfleet api``; wait for ``/readyz``. Raises FleetError if it exits or is
        not ready in time."""
        self.api = self._spawn("api.log", [*RECFLEET, "api"], self.api_settings)
        if wait_ready:
            self._wait(self.ready, timeout, f"{self.base_url}/readyz to answer 200", "api.log")

    def start_workers(self, *, wait_consuming: bool = True, timeout: float = 120) -> None:
        """Start the worker supervisor (again); its log is worker.log, then worker-2.log, ...
        Raises FleetError if it exits or a worker does not consume in time."""
        self.worker_runs += 1
        log = "worker.log" if self.worker_runs == 1 else f"worker-{self.worker_runs}.log"
        argv = [*self.worker_argv, "worker", "--processes", str(self.processes)]
        self.workers = self._spawn(log, argv, self.worker_settings)
        if wait_consuming:
            self._wait(self.workers_consuming, timeout, "every worker to consume", log)

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str, log: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise FleetError(f"timed out waiting for {what}; see {self.log_dir / log}")
            time.sleep(0.2)

    def ready(self) -> bool:
        """Whether the gateway answers ``/readyz`` now. Raises FleetError if it exited."""
        if self.api is None or self.api.poll() is not None:
            raise FleetError(f"the gateway is not running; see {self.log_dir / 'api.log'}")
        return _answers_200(f"{self.base_url}/readyz")

    def worker_metrics_ports(self) -> list[int]:
        return [self.worker_settings.metrics_port + i for i in range(self.processes)]

    def workers_consuming(self) -> bool:
        """Whether every worker process answers its health check (model loaded, consuming).
        Raises FleetError if the supervisor exited."""
        if self.workers is None or self.workers.poll() is not None:
            raise FleetError(f"the workers are not running; see {self.log_dir}")
        return all(
            _answers_200(f"http://127.0.0.1:{port}/healthz") for port in self.worker_metrics_ports()
        )

    def wait_workers_consuming(self, timeout: float = 120) -> None:
        """Wait until every worker process consumes. Raises FleetError if the supervisor
        exits or time runs out."""
        self._wait(self.workers_consuming, timeout, "every worker to consume", "worker.log")

    def worker_children(self) -> list[int]:
        """Pids of the supervisor's worker processes."""
        return [] if self.workers is None else children_of(self.workers.pid)

    def stop_workers(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the supervisor and wait for it; returns its exit code. Raises FleetError
        (after killing it and its children) if it does not stop in time."""
        assert self.workers is not None, "no workers started"
        if self.workers.poll() is None:
            self.workers.send_signal(sig)
        try:
            return self.workers.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(self.workers)
            raise FleetError(f"the workers did not stop within {timeout:.0f}s") from None

    def stop(self) -> None:
        """SIGTERM the gateway and the workers; kill what has not stopped 30 s later."""
        running = [p for p in (self.api, self.workers) if p is not None]
        for proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _kill_tree(proc)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    for pid in children_of(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait()
