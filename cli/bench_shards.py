"""``recfleet bench fleet --shards N``: one worker per shard against one shard with N
workers, on the same model, with each worker process's private and shared memory.

Memory comes from ``/proc/PID/smaps_rollup`` once the batch is done: ``private`` is
what only that process holds (Private_Clean + Private_Dirty), ``shared`` what it shares
with others (Shared_*: the memory-mapped model in the page cache, the interpreter and
torch pages inherited from the supervisor), ``pss`` its proportional share of both;
``model`` is the resident part of the model files it maps (from ``smaps``).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from recfleet.cli.client import submit, wait
from recfleet.cli.fleet import LocalFleet, children_of
from recfleet.cli.measure import cleanup
from recfleet.shared.messages import new_id
from recfleet.shared.settings import Settings
from recfleet.shared.shards import interleave, shard_count

SMAPS_FIELDS = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty")


def process_memory_mb(pid: int) -> dict[str, float]:
    """Rss, Pss, private and shared memory of one process in MB (from smaps_rollup).

    Raises OSError when the process is gone or /proc has no smaps_rollup.
    """
    kb: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in SMAPS_FIELDS:
            kb[name] = int(rest.split()[0])
    mb = {k: v / 1024 for k, v in kb.items()}
    return {
        "rss_mb": round(mb["Rss"], 1),
        "pss_mb": round(mb["Pss"], 1),
        "private_mb": round(mb["Private_Clean"] + mb["Private_Dirty"], 1),
        "shared_mb": round(mb["Shared_Clean"] + mb["Shared_Dirty"], 1),
    }


def model_resident_mb(pid: int, model_dir: Path) -> float:
    """Resident MB of the model files a process maps (mappings under ``model_dir``).

    Raises OSError when the process is gone.
    """
    root = str(model_dir.resolve())
    kb, in_model = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and ":" not in head[0]:
            in_model = len(head) == 6 and head[5].startswith(root)
        elif in_model and line.startswith("Rss:"):
            kb += int(line.split()[1])
    return round(kb / 1024, 1)


@dataclass
class LayoutRun:
    layout: str
    users: int
    total_s: float
    memory: list[dict[str, float]] = field(default_factory=list)

    @property
    def users_per_s(self) -> float:
        return self.users / self.total_s if self.total_s else 0.0


def _worker_fleets(s: Settings, layout: str, workers: int, logs: Path) -> list[LocalFleet]:
    if layout == "one-shard":
        return [LocalFleet(s, workers, logs / "workers", start_api=False)]
    return [
        LocalFleet(
            s,
            1,
            logs / f"shard-{k}",
            start_api=False,
            worker_settings=s.model_copy(update={"shard": k, "metrics_port": s.metrics_port + k}),
        )
        for k in range(workers)
    ]


def _worker_pids(fleets: list[LocalFleet]) -> list[int]:
    pids = []
    for fleet in fleets:
        assert fleet.workers is not None
        # One process runs in the supervisor itself; more are its children.
        pids += [fleet.workers.pid] if fleet.processes == 1 else children_of(fleet.workers.pid)
    return pids


def run_layout(
    s: Settings, layout: str, workers: int, user_ids: list[int], logs: Path, show: bool
) -> LayoutRun:
    """Start a gateway and the workers of ``layout``, submit, wait for every result, then
    read each worker's memory. The clock runs from the first POST to the last progress."""
    with contextlib.ExitStack() as stack:
        gateway = stack.enter_context(LocalFleet(s, 0, logs / "gateway"))
        fleets = [stack.enter_context(f) for f in _worker_fleets(s, layout, workers, logs)]
        for fleet in fleets:
            fleet.wait_workers_consuming()
        with httpx.Client(base_url=gateway.base_url, timeout=120) as client:
            start = time.perf_counter()
            sub = submit(client, user_ids, s.max_users_per_request)
            statuses = wait(client, sub.batch_ids, sub.users, show=show)
        last = max(st["last_done_at"] or 0 for st in statuses)
        total = last - (time.time() - (time.perf_counter() - start))
        memory = [
            {**process_memory_mb(pid), "model_mb": model_resident_mb(pid, s.artifacts)}
            for pid in _worker_pids(fleets)
        ]
    return LayoutRun(layout, sub.users, max(total, sub.seconds), memory)


def compare(
    base: Settings,
    *,
    whole: Path,
    sharded: Path,
    shards: int,
    users: int,
    repeats: int,
    logs: Path,
    show: bool,
) -> list[dict[str, Any]]:
    """Median figures of each layout over ``repeats`` runs, alternating the layouts.

    Raises ValueError when ``sharded`` does not hold ``shards`` shards or ``whole`` is sharded.
    """
    if shard_count(sharded) != shards:
        raise ValueError(f"{sharded} holds {shard_count(sharded)} shards, not {shards}")
    if shard_count(whole) != 1:
        raise ValueError(f"{whole} is sharded; the baseline needs an unsharded model")
    runs: dict[str, list[LayoutRun]] = {"one-shard": [], "sharded": []}
    for r in range(repeats):
        for layout, artifacts in (("one-shard", whole), ("sharded", sharded)):
            s = base.isolated(
                f"bench-{new_id()[:8]}",
                artifacts=artifacts,
                api_port=base.api_port + 17,
                metrics_port=base.metrics_port + 17,
                log_level="WARNING",
            )
            try:
                ids = interleaved(users, shards)
                run = run_layout(s, layout, shards, ids, logs / f"{layout}-{r}", show)
            finally:
                cleanup(s)
            runs[layout].append(run)
    return [_summary(layout, shards, rs) for layout, rs in runs.items()]


def interleaved(users: int, parts: int) -> list[int]:
    """Ids 0..users-1 taken round-robin from ``parts`` contiguous runs (0, n, 2n, 1, ...):
    every request then holds users of every shard. Both layouts get the same order."""
    return interleave([r.tolist() for r in np.array_split(np.arange(users), parts)])


def _summary(layout: str, shards: int, runs: list[LayoutRun]) -> dict[str, Any]:
    def med(key: str) -> float:
        return round(statistics.median(m[key] for run in runs for m in run.memory), 1)

    return {
        "layout": (
            f"1 shard x {shards} workers"
            if layout == "one-shard"
            else f"{shards} shards x 1 worker"
        ),
        "users": runs[0].users,
        "users_per_s": round(statistics.median(r.users_per_s for r in runs)),
        "runs_users_per_s": [round(r.users_per_s) for r in runs],
        "worker_private_mb": med("private_mb"),
        "worker_shared_mb": med("shared_mb"),
        "worker_pss_mb": med("pss_mb"),
        "worker_rss_mb": med("rss_mb"),
        "worker_model_mb": med("model_mb"),
    }


def print_table(rows: list[dict[str, Any]]) -> list[str]:
    """The comparison as text lines (what ``bench fleet --shards`` prints)."""
    lines = [
        f"{'layout':<24} {'users/s':>9} {'private MB':>11} {'shared MB':>10} {'PSS MB':>8} "
        f"{'model MB':>9}  (median per worker process)"
    ]
    for r in rows:
        lines.append(
            f"{r['layout']:<24} {r['users_per_s']:>9,} {r['worker_private_mb']:>11,.1f} "
            f"{r['worker_shared_mb']:>10,.1f} {r['worker_pss_mb']:>8,.1f} "
            f"{r['worker_model_mb']:>9,.1f}"
        )
    return lines
