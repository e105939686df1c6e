"""A fleet of child processes for fault tests: ``LocalFleet`` driven part by part, plus
what a test reads off it (worker metrics, jobs handled, supervisor restarts)."""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import httpx

from recfleet.cli.fleet import RECFLEET, LocalFleet
from recfleet.shared.settings import Settings

# The supervisor's line when a worker process dies and is started again (worker/main.py).
_RESTART = re.compile(r"worker \d+ exited with (-?\d+|None); restarting")


class Fleet(LocalFleet):
    """A gateway and a worker supervisor with ``processes`` workers. Entering starts
    nothing: the test starts each part when its fault needs it; leaving stops both.
    The gateway logs at INFO whatever the settings say (fault tests log DEBUG)."""

    def __init__(
        self,
        settings: Settings,
        log_dir: Path,
        *,
        processes: int = 2,
        worker_settings: Settings | None = None,
        worker_argv: Sequence[str] = RECFLEET,
    ) -> None:
        super().__init__(
            settings,
            processes,
            log_dir,
            api_settings=settings.model_copy(update={"log_level": "INFO"}),
            worker_settings=worker_settings,
            worker_argv=worker_argv,
        )

    def __enter__(self) -> Fleet:
        return self

    def worker_logs(self) -> list[Path]:
        return sorted(self.log_dir.glob("worker*.log"))

    def metric(self, name: str) -> float:
        """The sum of one counter over every worker process that answers."""
        total = 0.0
        pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+]+)$", re.M)
        for port in self.worker_metrics_ports():
            with contextlib.suppress(httpx.HTTPError):
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
                total += sum(float(v) for v in pattern.findall(text))
        return total

    def redeliveries(self) -> int:
        return int(self.metric("recfleet_worker_redeliveries_total"))

    def jobs_handled(self) -> Counter[str]:
        """How often each job id was handled to the end, from the workers' JSON logs."""
        handled: Counter[str] = Counter()
        for path in self.worker_logs():
            for line in path.read_text(errors="replace").splitlines():
                if '"job done' not in line:
                    continue
                with contextlib.suppress(ValueError):
                    handled[json.loads(line)["job_id"]] += 1
        return handled

    def worker_restarts(self) -> list[str]:
        """The exit code of every worker process the supervisor had to start again, from
        its logs."""
        return [code for path in self.worker_logs() for code in _RESTART.findall(path.read_text())]
