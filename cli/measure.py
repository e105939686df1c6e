"""One measured run of a local fleet: submit users over HTTP, wait for every result."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pika
import psutil
import redis

from recfleet.cli.client import auth_headers, submit, wait
from recfleet.cli.fleet import LocalFleet
from recfleet.shared.redis import redis_client
from recfleet.shared.retention import unlink_matching
from recfleet.shared.settings import Settings
from recfleet.shared.shards import shard_count
from recfleet.shared.topology import delete_blocking, topology


@dataclass
class FleetRun:
    processes: int
    users: int
    jobs: int
    submit_s: float
    total_s: float
    cold_users: int
    dead_users: int
    batch_ids: list[str]
    cpu_s: dict[str, float]

    @property
    def users_per_s(self) -> float:
        return self.users / self.total_s if self.total_s else 0.0

    def figures(self) -> dict[str, Any]:
        return {
            "processes": self.processes,
            "users": self.users,
            "jobs": self.jobs,
            "submit_s": round(self.submit_s, 3),
            "total_s": round(self.total_s, 3),
            "users_per_s": round(self.users_per_s, 1),
            "cold_users": self.cold_users,
            "dead_users": self.dead_users,
            "cpu_s": {part: round(seconds, 2) for part, seconds in self.cpu_s.items()},
        }


def measure(
    settings: Settings, user_ids: list[int], processes: int, log_dir: Path, *, show: bool = True
) -> FleetRun:
    """Start a gateway and ``processes`` workers, submit, wait until all results are in Redis.

    The clock starts at the first POST, once every worker is consuming, and stops when the
    last job's progress is recorded. ``cpu_s`` is the CPU time each part of the fleet
    spent from the first POST until every batch was seen done (see ``CpuMeter``).
    """
    with LocalFleet(settings, processes, log_dir) as fleet:
        fleet.wait_workers_consuming()
        meter = CpuMeter(settings, fleet)
        with httpx.Client(
            base_url=fleet.base_url, timeout=120, headers=auth_headers(settings)
        ) as client:
            before = meter.read()
            start = time.perf_counter()
            sub = submit(client, user_ids, settings.max_users_per_request, run=True)
            statuses = wait(client, sub.batch_ids, sub.users, show=show)
            total = max(st["last_done_at"] or 0 for st in statuses) - _epoch(start)
            after = meter.read()
        meter.close()
    return FleetRun(
        processes=processes,
        users=sub.users,
        jobs=sub.jobs,
        submit_s=sub.seconds,
        total_s=max(total, sub.seconds),
        cold_users=sum(st["cold_users"] for st in statuses),
        dead_users=sum(st["users_dead"] for st in statuses),
        batch_ids=sub.batch_ids,
        cpu_s={part: after[part] - before[part] for part in after if part in before},
    )


class CpuMeter:
    """CPU seconds (user + system) used so far by each part of a local fleet: the gateway,
    the worker processes, Redis (its own ``INFO cpu``), the broker (a local RabbitMQ's
    ``beam.smp``, when this host runs one) and this client (submitting and polling)."""

    def __init__(self, settings: Settings, fleet: LocalFleet) -> None:
        self._redis = redis.Redis.from_url(str(settings.redis_url))
        self._gateway = [psutil.Process(fleet.api.pid)] if fleet.api else []
        supervisor = psutil.Process(fleet.workers.pid) if fleet.workers else None
        self._workers = [supervisor, *supervisor.children(recursive=True)] if supervisor else []
        self._broker = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "beam.smp"]

    def close(self) -> None:
        self._redis.close()

    def read(self) -> dict[str, float]:
        info = self._redis.info("cpu")
        parts = {
            "gateway": _cpu(self._gateway),
            "workers": _cpu(self._workers),
            "redis": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
            "client": _cpu([psutil.Process()]),
        }
        if self._broker:
            parts["broker"] = _cpu(self._broker)
        return parts


def _cpu(processes: list[psutil.Process]) -> float:
    """User + system CPU seconds of live processes (children's times not included)."""
    total = 0.0
    for p in processes:
        try:
            times = p.cpu_times()
        except psutil.Error:  # exited, or not ours to read
            continue
        total += times.user + times.system
    return total


def _epoch(perf_start: float) -> float:
    """Wall-clock time of a perf_counter reading (batch timestamps are wall-clock)."""
    return time.time() - (time.perf_counter() - perf_start)


def cleanup(settings: Settings) -> None:
    """Delete a run's Redis keys (by prefix, without blocking Redis) and its queues."""
    client = redis_client(settings)
    unlink_matching(client, f"{settings.redis_prefix}:*", chunk=1000)
    client.close()
    conn = pika.BlockingConnection([pika.URLParameters(u) for u in settings.amqp_urls])
    channel = conn.channel()
    delete_blocking(channel, topology(settings, shard_count(settings.artifacts)))
    conn.close()
