"""Fault injection: run batches through a real gateway and real workers while something
breaks, then check the promise.

The promise: every user of every batch the gateway accepted ends with a result in the
batch's generation keyspace, or sits in a job in the dead-letter queue. Nothing is lost,
and a job delivered twice changes nothing (results equal a direct ranking, each job is
counted once in its ledger).

This module holds the harness the tests share: a fleet of child processes (gateway and
worker supervisor, each with its own settings, so a worker can reach the broker through
a proxy while the gateway does not), batch helpers, the invariant and the figures line.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pika
import redis

from recfleet.cli.fleet import settings_env
from recfleet.shared.codec import HEADER, encode_results, model_tag
from recfleet.shared.errors import UndecodableMessage
from recfleet.shared.keys import Keys
from recfleet.shared.ledger import LedgerStatus
from recfleet.shared.messages import decode_job
from recfleet.shared.settings import Settings
from recfleet.shared.topology import HEADER_BATCH_ID

REPO = Path(__file__).resolve().parents[2]
# Figures lines of this session, repeated in the terminal summary.
FIGURES: list[str] = []
# The users of every test batch: the small artifacts know 0..5999; the rest are cold.
BATCH_USERS = list(range(8000))


def report(name: str, **figures: object) -> str:
    """Print one figures line (``name: users N accepted N results N lost 0 ...``)."""
    line = f"{name}: " + " ".join(
        f"{key.replace('_', '-')} {value}" for key, value in figures.items()
    )
    print(line)
    FIGURES.append(line)
    return line


def report_tally(name: str, tally: Tally, *, submitted: int | None = None, **extra: object) -> str:
    """The figures line of a checked run: users submitted (default: the accepted ones),
    accepted, results, lost and dlq from ``tally``, then the test's own figures."""
    return report(
        name,
        users=tally.users if submitted is None else submitted,
        accepted=tally.users,
        results=tally.results,
        lost=tally.lost,
        dlq=tally.dlq,
        **extra,
    )


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


# -- the fleet ---------------------------------------------------------------------------------


class Fleet:
    """A gateway and a worker supervisor (``recfleet worker --processes N``) as child
    processes, stopped on exit. Workers may get settings of their own."""

    def __init__(
        self,
        settings: Settings,
        log_dir: Path,
        *,
        processes: int = 2,
        worker_settings: Settings | None = None,
        worker_argv: Sequence[str] | None = None,
    ) -> None:
        self.settings = settings
        self.worker_settings = worker_settings or settings
        self.log_dir = log_dir
        self.processes = processes
        # A replacement for ``python -m recfleet.cli.main`` (a test's wrapper script, say).
        self.worker_argv = list(worker_argv or [sys.executable, "-m", "recfleet.cli.main"])
        self.gateway: subprocess.Popen[bytes] | None = None
        self.workers: subprocess.Popen[bytes] | None = None
        self._worker_runs = 0
        self.base_url = settings.api_url
        log_dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, argv: list[str], settings: Settings, log: str) -> subprocess.Popen[bytes]:
        env = settings_env(settings)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with (self.log_dir / log).open("ab") as out:
            return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)

    def start_gateway(self, *, wait_ready: bool = True) -> None:
        gateway_settings = self.settings.model_copy(update={"log_level": "INFO"})
        self.gateway = self._spawn(
            [sys.executable, "-m", "recfleet.cli.main", "api"], gateway_settings, "gateway.log"
        )
        if wait_ready:
            wait_until(self.ready, 60, "the gateway to be ready")

    def ready(self) -> bool:
        assert self.gateway is not None
        if self.gateway.poll() is not None:
            raise AssertionError(f"gateway exited; see {self.log_dir / 'gateway.log'}")
        try:
            return httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def start_workers(self, *, wait_consuming: bool = True) -> None:
        self._worker_runs += 1
        self.workers = self._spawn(
            [*self.worker_argv, "worker", "--processes", str(self.processes)],
            self.worker_settings,
            f"worker-{self._worker_runs}.log",
        )
        if wait_consuming:
            wait_until(self.workers_consuming, 120, "every worker process to consume")

    def metrics_ports(self) -> list[int]:
        return [self.worker_settings.metrics_port + i for i in range(self.processes)]

    def workers_consuming(self) -> bool:
        assert self.workers is not None
        if self.workers.poll() is not None:
            raise AssertionError(f"workers exited; see {self.log_dir}")
        for port in self.metrics_ports():
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code != 200:
                    return False
            except httpx.HTTPError:
                return False
        return True

    def worker_children(self) -> list[int]:
        """Pids of the supervisor's worker processes (not multiprocessing's helpers)."""
        assert self.workers is not None
        return children_of(self.workers.pid)

    def metric(self, name: str) -> float:
        """The sum of one counter over every worker process that answers."""
        total = 0.0
        pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+]+)$", re.M)
        for port in self.metrics_ports():
            with contextlib.suppress(httpx.HTTPError):
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
                total += sum(float(v) for v in pattern.findall(text))
        return total

    def redeliveries(self) -> int:
        return int(self.metric("recfleet_worker_redeliveries_total"))

    def jobs_handled(self) -> Counter[str]:
        """How often each job id was handled to the end, from the workers' JSON logs."""
        handled: Counter[str] = Counter()
        for path in self.log_dir.glob("worker-*.log"):
            for line in path.read_text(errors="replace").splitlines():
                if '"job done' not in line:
                    continue
                with contextlib.suppress(ValueError):
                    handled[json.loads(line)["job_id"]] += 1
        return handled

    def stop_workers(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the supervisor and wait for it; returns its exit code."""
        assert self.workers is not None
        if self.workers.poll() is None:
            self.workers.send_signal(sig)
        try:
            return self.workers.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_tree(self.workers)
            raise AssertionError(f"workers did not stop within {timeout:.0f}s") from None

    def stop(self) -> None:
        for proc in (self.gateway, self.workers):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (self.gateway, self.workers):
            if proc is None:
                continue
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._kill_tree(proc)

    @staticmethod
    def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
        for pid in children_of(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


def children_of(pid: int) -> list[int]:
    """Live child processes of ``pid``, leaving out multiprocessing's resource tracker."""
    out = []
    for entry in Path("/proc").iterdir():
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


# -- batches ---------------------------------------------------------------------------------


def post_batch(
    base_url: str, user_ids: Sequence[int], *, client: httpx.Client | None = None
) -> httpx.Response:
    body = {"user_ids": list(user_ids)}
    if client is not None:
        return client.post("/api/playlist/beta_recommend/", json=body)
    return httpx.post(f"{base_url}/api/playlist/beta_recommend/", json=body, timeout=30)


def submit_batches(
    base_url: str, count: int, users: Sequence[int] = BATCH_USERS
) -> dict[str, list[int]]:
    """Submit ``count`` batches of ``users``; every one must be accepted."""
    accepted: dict[str, list[int]] = {}
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for _ in range(count):
            resp = post_batch(base_url, users, client=client)
            assert resp.status_code == 202, resp.text
            accepted[resp.json()["batch_id"]] = list(users)
    return accepted


@dataclass
class Progress:
    jobs_total: int
    jobs_finished: int
    users_total: int
    users_finished: int

    @property
    def complete(self) -> bool:
        return self.jobs_finished >= self.jobs_total

    @property
    def fraction(self) -> float:
        return self.users_finished / max(self.users_total, 1)


def progress(settings: Settings, batch_ids: Sequence[str]) -> Progress:
    """Progress of the batches, read from their ledgers in Redis (the gateway may be down)."""
    keys = Keys(settings.redis_prefix)
    client = redis.Redis.from_url(str(settings.redis_url), socket_timeout=5)
    try:
        with client.pipeline(transaction=False) as pipe:
            for batch_id in batch_ids:
                pipe.hgetall(keys.batch(batch_id))
            ledgers = [
                LedgerStatus.parse(b, f) for b, f in zip(batch_ids, pipe.execute(), strict=True)
            ]
    finally:
        client.close()
    return Progress(
        jobs_total=sum(s.jobs_total for s in ledgers),
        jobs_finished=sum(s.jobs_done + s.jobs_dead for s in ledgers),
        users_total=sum(s.users_total for s in ledgers),
        users_finished=sum(s.users_done + s.users_dead for s in ledgers),
    )


def safe_progress(settings: Settings, batch_ids: Sequence[str]) -> Progress | None:
    try:
        return progress(settings, batch_ids)
    except redis.RedisError:
        return None


def wait_fraction(
    settings: Settings, batch_ids: Sequence[str], at_least: float, timeout: float = 60
) -> Progress:
    """Wait until at least this fraction of the batches' users is finished; the batches
    must not be complete yet (else the fault would land after the work)."""
    found: list[Progress] = []

    def reached() -> bool:
        p = safe_progress(settings, batch_ids)
        if p is not None and p.fraction >= at_least:
            found.append(p)
            return True
        return False

    wait_until(reached, timeout, f"{at_least:.0%} of the users to finish")
    assert not found[0].complete, "the batches finished before the fault: make them bigger"
    return found[0]


def wait_complete(settings: Settings, batch_ids: Sequence[str], timeout: float = 120) -> None:
    def complete() -> bool:
        p = safe_progress(settings, batch_ids)
        return p is not None and p.complete

    wait_until(complete, timeout, "every batch to complete")


# -- the invariant ----------------------------------------------------------------------------


@dataclass
class DeadLetter:
    job_id: str | None
    batch_id: str | None
    user_ids: list[int] | None  # None when the body does not decode
    body: bytes


def dead_letters(settings: Settings) -> list[DeadLetter]:
    """Everything in the dead-letter queue, left in place."""
    conn = pika.BlockingConnection(pika.URLParameters(str(settings.amqp_url)))
    out = []
    try:
        channel = conn.channel()
        while True:
            method, props, body = channel.basic_get(settings.dead_letter_queue, auto_ack=False)
            if method is None:
                break
            try:
                users: list[int] | None = decode_job(body).user_ids
            except UndecodableMessage:
                users = None
            batch_id = (props.headers or {}).get(HEADER_BATCH_ID)
            out.append(DeadLetter(props.message_id, batch_id, users, body))
    finally:
        conn.close()  # unsettled messages go back to the queue
    return out


@functools.cache
def _direct(
    artifacts: Path, top_k: int, users: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, int]:
    """Rank ``users`` directly (no broker, no Redis): external ids, cold flags, model tag."""
    from recfleet.shared.artifacts import load_artifacts
    from recfleet.worker.ranking import Ranker

    art = load_artifacts(artifacts)
    ranked = Ranker.from_artifacts(art, k=top_k).rank(art.user_rows(np.asarray(users)))
    rows = ranked.playlists
    external = np.where(rows >= 0, art.playlist_ids[np.maximum(rows, 0)], -1)
    return external, ranked.cold, model_tag(art.model_version)


@dataclass
class Tally:
    users: int = 0  # users in accepted batches
    results: int = 0
    lost: int = 0
    dlq: int = 0
    dead_jobs: int = 0
    wrong: int = 0  # results that differ from a direct ranking
    problems: list[str] = field(default_factory=list)


def check_invariant(
    settings: Settings,
    accepted: Mapping[str, Sequence[int]],
    dead: Sequence[DeadLetter] | None = None,
) -> Tally:
    """Check every accepted batch: each user has a result equal to a direct ranking or
    sits in a dead-lettered job; the ledger counts every job exactly once."""
    dead = dead_letters(settings) if dead is None else dead
    dead_ids = {d.job_id for d in dead}
    tally = Tally(dead_jobs=len(dead))
    keys = gen_keys = Keys(settings.redis_prefix)
    client = redis.Redis.from_url(str(settings.redis_url))
    try:
        for batch_id, users in accepted.items():
            stored = _read_results(client, gen_keys, batch_id, users)
            _check_results(settings, batch_id, users, stored, dead_ids, tally)
            _check_ledger(client, keys, batch_id, len(users), tally)
    finally:
        client.close()
    return tally


def _read_results(
    client: redis.Redis, gen_keys: Keys, batch_id: str, users: Sequence[int]
) -> list[bytes | None]:
    buckets = sorted({gen_keys.result_bucket(batch_id, u) for u in users})
    with client.pipeline(transaction=False) as pipe:
        for key in buckets:
            pipe.hgetall(key)
        by_key = dict(zip(buckets, pipe.execute(), strict=True))
    return [
        by_key[gen_keys.result_bucket(batch_id, u)].get(str(gen_keys.result_field(u)).encode())
        for u in users
    ]


def _check_results(
    settings: Settings,
    batch_id: str,
    users: Sequence[int],
    stored: list[bytes | None],
    dead_ids: set[str | None],
    tally: Tally,
) -> None:
    present = [raw for raw in stored if raw is not None]
    if present:
        generated_at = HEADER.unpack_from(present[0])[1]
        external, cold, tag = _direct(settings.artifacts, settings.top_k, tuple(users))
        expected = encode_results(external, cold, generated_at, tag)
    for pos, raw in enumerate(stored):
        tally.users += 1
        if raw is not None:
            tally.results += 1
            if raw != expected[pos]:
                tally.wrong += 1
        elif f"{batch_id}-{pos // settings.job_size}" in dead_ids:
            tally.dlq += 1
        else:
            tally.lost += 1


def _check_ledger(client: redis.Redis, keys: Keys, batch_id: str, users: int, tally: Tally) -> None:
    status = LedgerStatus.parse(batch_id, client.hgetall(keys.batch(batch_id))).document()
    done = client.scard(keys.batch_done(batch_id))
    dead = client.scard(keys.batch_dead(batch_id))
    problems = []
    if status["state"] not in ("done", "failed"):
        problems.append(f"state {status['state']}")
    if (status["jobs_done"], status["jobs_dead"]) != (done, dead):
        problems.append(
            f"jobs counted {status['jobs_done']}+{status['jobs_dead']}, sets {done}+{dead}"
        )
    if status["jobs_done"] + status["jobs_dead"] != status["jobs_total"]:
        problems.append(
            f"{status['jobs_done']}+{status['jobs_dead']} of {status['jobs_total']} jobs"
        )
    if (
        status["users_done"] + status["users_dead"] != status["users_total"]
        or status["users_total"] != users
    ):
        problems.append(
            f"users {status['users_done']}+{status['users_dead']} of {status['users_total']}"
        )
    tally.problems += [f"batch {batch_id}: {p}" for p in problems]


def assert_invariant(tally: Tally) -> None:
    assert tally.lost == 0, f"{tally.lost} users lost"
    assert tally.wrong == 0, f"{tally.wrong} results differ from a direct ranking"
    assert not tally.problems, tally.problems
