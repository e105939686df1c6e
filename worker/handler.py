"""Turns one decoded job into results in Redis: candidate lookup, ranking, one pipelined write.

The consumer calls ``JobHandler.handle``; nothing here knows about RabbitMQ.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from recfleet.shared.codec import result_records, split_records
from recfleet.shared.drift import POPULARITY_LABELS
from recfleet.shared.errors import TransientError
from recfleet.shared.generations import finalize_steps, run_steps
from recfleet.shared.keys import BASE, BucketGroups, Keys
from recfleet.shared.ledger import (
    ALREADY_COUNTED,
    COMPLETED,
    PIN_SCRIPT,
    PROGRESS_SCRIPT,
    REVIVE_SCRIPT,
    LedgerStatus,
    popularity_args,
)
from recfleet.shared.messages import Job
from recfleet.shared.settings import Settings
from recfleet.worker import metrics
from recfleet.worker.models import Model, ModelStore
from recfleet.worker.resp import SentCommands, compile_packer, pack_hsets, send_commands

log = logging.getLogger(__name__)

MAX_PINS = 4096


@dataclass(frozen=True)
class JobSummary:
    users: int
    cold: int
    rank_s: float
    write_s: float
    model_version: str
    results: list[list[int]] | None = None  # external playlist ids, when asked for


@dataclass(frozen=True)
class _Call:
    """One command of a job's write: a plain command (``args``), or a script run with
    ``keys`` and ``args``."""

    args: tuple[Any, ...]
    script: Script | None = None
    keys: tuple[str, ...] = ()

    def command(self) -> tuple[Any, ...]:
        if self.script is None:
            return self.args
        return ("EVALSHA", self.script.sha, len(self.keys), *self.keys, *self.args)


@dataclass
class _JobWrite:
    """One job's write: its result hashes and its other calls; ``packed`` once laid out as
    protocol bytes, ``sent`` while its replies are unread."""

    keys: list[str]
    groups: BucketGroups
    records: np.ndarray
    expire: int | None
    calls: list[_Call]
    ledger: bool  # the calls end with the progress script and a ZADD
    packed: tuple[np.ndarray, list[tuple[Any, ...]]] | None = None  # HSETs, then the rest
    sent: SentCommands | None = None
    failure: redis.RedisError | None = None  # of the last send
    seconds: float = 0.0  # spent sending and reading


@dataclass(frozen=True)
class PendingJob:
    """A ranked job whose write is sent (``JobHandler.start``) and not yet confirmed."""

    job: Job
    summary: JobSummary  # write_s filled in by ``finish``
    recommended: dict[str, int]
    n_candidates: np.ndarray
    write: _JobWrite


@dataclass(frozen=True)
class BatchInfo:
    """What a worker needs to know about a job's batch, read once per batch."""

    model_version: str
    run: bool  # a declared run: results go to its own generation
    ledger: bool  # False for synchronous requests: no progress to count


class JobHandler:
    """Ranks jobs with the batch's model and writes results where the batch's kind says:
    a declared run into its own generation, anything else into the current one."""

    def __init__(
        self,
        settings: Settings,
        models: ModelStore,
        client: redis.Redis,
        *,
        packed_writes: bool | None = None,
    ) -> None:
        """``packed_writes``: write results as RESP packed here (default: unless ``client``
        is a cluster client, whose pipeline routes each key to its node)."""
        self.settings = settings
        self.packed_writes = (
            not isinstance(client, redis.RedisCluster) if packed_writes is None else packed_writes
        )
        self.models = models
        self.redis = client
        self.keys = Keys(settings.redis_prefix)
        self._progress = client.register_script(PROGRESS_SCRIPT)
        self._pin = client.register_script(PIN_SCRIPT)
        self._revive = client.register_script(REVIVE_SCRIPT)
        self._pins: dict[str, BatchInfo] = {}
        if self.packed_writes:
            compile_packer()  # before the first job, as the Ranker compiles its loop

    def batch_info(self, job: Job) -> BatchInfo:
        """The job's batch: its pinned model (pinning the current one on first use) and kind.

        Raises TransientError when Redis is unreachable.
        """
        info = self._pins.get(job.batch_id)
        if info is None:
            current = self.models.current().version
            try:
                pinned = self._pin(keys=[self.keys.batch(job.batch_id)], args=[current])
            except redis.RedisError as exc:
                raise TransientError(f"Redis unavailable: {exc}") from exc
            if pinned:
                version, run = pinned
                # Ledgers written before ad-hoc batches existed have no run field: runs.
                info = BatchInfo(version.decode(), run is None or run == b"1", ledger=True)
            else:
                info = BatchInfo(current, run=False, ledger=False)
            if len(self._pins) >= MAX_PINS:
                self._pins.clear()
            self._pins[job.batch_id] = info
        return info

    def model_for(self, job: Job) -> Model:
        """The model pinned to the job's batch.

        Raises TransientError when Redis is unreachable or the pinned model is not here.
        """
        version = self.batch_info(job).model_version
        current = self.models.current()
        return current if version == current.version else self.models.get(version)

    def target(self, job: Job) -> str:
        """The keyspace the job's results go to: the run's own generation, else the
        current generation at the time of writing (``live`` while there is none).

        Raises TransientError when Redis is unreachable.
        """
        if job.generation:
            return job.generation
        if self.batch_info(job).run:
            return job.batch_id
        try:
            current: list[bytes] = self.redis.zrevrange(self.keys.history, 0, 0)  # type: ignore[assignment]
        except redis.RedisError as exc:
            raise TransientError(f"Redis unavailable: {exc}") from exc
        return current[0].decode() if current else BASE

    def handle(self, job: Job, *, want_results: bool = False) -> JobSummary:
        """Rank every user of the job and write all results and the job's progress at once
        (``start`` then ``finish``).

        Writing is idempotent: a redelivered job writes the same bytes and counts once.
        The job that completes a sealed batch also runs the generation switch.
        Raises TransientError when Redis cannot be reached.
        """
        return self.finish(self.start(job, want_results=want_results))

    def start(self, job: Job, *, want_results: bool = False) -> PendingJob:
        """Rank the job and send its write; ``finish`` reads Redis's replies, so a worker
        can rank its next job meanwhile (on a Redis Cluster the pipeline runs in
        ``finish``). Raises TransientError when Redis cannot be reached for the batch's
        model or target; a failed send surfaces in ``finish``, which sends again."""
        start = time.perf_counter()
        model = self.model_for(job)
        art = model.artifacts
        user_ids = np.asarray(job.user_ids, dtype=np.int64)
        ranked = model.ranker.rank(art.user_rows(user_ids))
        rows = ranked.playlists
        external = np.where(rows >= 0, art.playlist_ids[np.maximum(rows, 0)], -1)
        records = result_records(external, ranked.cold, int(job.created_at), model.tag)
        recommended = self.recommended_by_bucket(model, rows)
        rank_s = time.perf_counter() - start

        cold = int(ranked.cold.sum())
        write = self._prepare_write(job, model, user_ids, records, cold, recommended)
        self._send(write)
        results = [[int(p) for p in row if p >= 0] for row in external] if want_results else None
        summary = JobSummary(len(user_ids), cold, rank_s, 0.0, model.version, results)
        return PendingJob(job, summary, recommended, ranked.n_candidates, write)

    def finish(self, pending: PendingJob) -> JobSummary:
        """Read the replies of a started job's write (sending it again first when the last
        attempt failed), run the generation switch if the job completed its batch, and
        return its summary. May be called again after a TransientError."""
        write = pending.write
        try:
            replies = self._replies(write)
        except redis.RedisError as exc:
            raise TransientError(f"Redis unavailable: {exc}") from exc
        if write.ledger:
            counted = int(replies[-2])
            if counted == COMPLETED:
                self.finalize(pending.job.batch_id)
            elif counted == ALREADY_COUNTED:
                # Written before (its replies were lost, or the job came back after a
                # crash): the attempt that completed the batch may never have switched it.
                self._finalize_if_complete(pending.job.batch_id)
        summary = replace(pending.summary, write_s=write.seconds)
        self._observe(
            pending.recommended,
            pending.n_candidates,
            summary.users,
            summary.cold,
            summary.rank_s,
            summary.write_s,
        )
        return summary

    def finalize(self, batch_id: str) -> None:
        """Run the gates of a complete batch and make it current if they pass."""
        try:
            reason = run_steps(self.redis, finalize_steps(batch_id, self.settings, self.keys))
        except redis.RedisError as exc:
            raise TransientError(f"Redis unavailable: {exc}") from exc
        if reason is None:
            log.info(
                "batch %s is now the current generation", batch_id, extra={"batch_id": batch_id}
            )
        else:
            log.warning(
                "batch %s not made current: %s", batch_id, reason, extra={"batch_id": batch_id}
            )

    def _finalize_if_complete(self, batch_id: str) -> None:
        """``finalize`` a batch whose every job is done or dead but whose switch has not
        run. Raises TransientError."""
        try:
            fields = self.redis.hgetall(self.keys.batch(batch_id))
        except redis.RedisError as exc:
            raise TransientError(f"Redis unavailable: {exc}") from exc
        if not fields:
            return
        if LedgerStatus.parse(batch_id, fields).awaits_switch:
            self.finalize(batch_id)

    @staticmethod
    def recommended_by_bucket(model: Model, rows: np.ndarray) -> dict[str, int]:
        """How many of the recommended playlist rows fall in each popularity-rank bucket."""
        shown = rows[rows >= 0]
        hist = np.bincount(model.popularity_bucket[shown], minlength=len(POPULARITY_LABELS))
        return dict(zip(POPULARITY_LABELS, hist.tolist(), strict=True))

    def _prepare_write(
        self,
        job: Job,
        model: Model,
        user_ids: np.ndarray,
        records: np.ndarray,
        cold: int,
        recommended: dict[str, int],
    ) -> _JobWrite:
        """Every result, the job's bookkeeping and its progress as one write.

        Raises TransientError when Redis cannot be reached.
        """
        info = self.batch_info(job)
        generation = self.target(job)
        now = time.time()
        calls = [_Call(("HSET", self.keys.models, model.tag, model.version))]
        if info.run:  # prune finds the run's keyspace here once it is retired
            calls.append(_Call(("ZADD", self.keys.runs, "NX", now, job.batch_id)))
        if info.ledger:
            batch_id = job.batch_id
            ledger = self.keys.batch(batch_id)
            dead = (self.keys.batch_dead(batch_id), self.keys.batch_dead_users(batch_id))
            progress = [job.job_id, len(user_ids), cold, f"{now:.3f}", self.settings.batch_ttl_s]
            calls += [
                _Call((job.job_id, len(user_ids)), self._revive, (ledger, *dead)),
                _Call(
                    (*progress, "done", *popularity_args(recommended)),
                    self._progress,
                    (ledger, self.keys.batch_done(batch_id)),
                ),
                # Lets monitoring find recent batches without scanning the keyspace.
                _Call(("ZADD", self.keys.batches, now, batch_id)),
            ]
        groups = BucketGroups.of(user_ids)
        keys = [self.keys.result_bucket(generation, first) for first in groups.firsts]
        # No run owns the live keyspace, so prune never deletes it: its hashes expire.
        expire = self.settings.batch_ttl_s if generation == BASE else None
        return _JobWrite(keys, groups, records, expire, calls, info.ledger)

    def _send(self, write: _JobWrite) -> None:
        """Send a packed write (a cluster's pipeline waits for ``_replies``). A failed
        send is left for ``_replies`` to retry and report."""
        if not self.packed_writes:
            return
        start = time.perf_counter()
        if write.packed is None:
            groups = write.groups
            hsets = pack_hsets(write.keys, groups.ends, groups.fields, write.records[groups.order])
            expire = write.expire
            head = [("EXPIRE", key, expire) for key in write.keys] if expire is not None else []
            commands = head + [call.command() for call in write.calls]
            write.packed = (hsets, commands)
        hsets, commands = write.packed
        try:
            sent = send_commands(self.redis, [hsets], len(write.keys), commands)
            write.sent, write.failure = sent, None
        except redis.RedisError as exc:
            write.sent, write.failure = None, exc
        write.seconds += time.perf_counter() - start

    def _replies(self, write: _JobWrite) -> list[Any]:
        """The replies of ``write``'s calls: the packed write's (sent first when it is not
        in flight, and again after loading the scripts when Redis has forgotten them: the
        same bytes, the same counts, every step is idempotent), or the cluster pipeline's.
        Raises redis.RedisError."""
        if not self.packed_writes:
            start = time.perf_counter()
            replies = self._write_pipelined(
                write.keys, write.groups, write.records, write.expire, write.calls
            )
            write.seconds += time.perf_counter() - start
            return replies
        try:
            replies = self._read(write)
        except NoScriptError:
            for call in write.calls:
                if call.script is not None:
                    self.redis.script_load(call.script.script)
            replies = self._read(write)
        return replies[len(replies) - len(write.calls) :]

    def _read(self, write: _JobWrite) -> list[Any]:
        """Every reply of the packed write, sending it first when it is not in flight (a
        failed send is reported here). Raises redis.RedisError."""
        if write.sent is None:
            self._send(write)
        sent, write.sent = write.sent, None
        start = time.perf_counter()
        try:
            if sent is None:
                raise write.failure or redis.ConnectionError("the write was not sent")
            return sent.read()
        finally:
            write.seconds += time.perf_counter() - start

    def _write_pipelined(
        self,
        keys: list[str],
        groups: BucketGroups,
        records: np.ndarray,
        expire: int | None,
        calls: list[_Call],
    ) -> list[Any]:
        """The same writes through redis-py's pipeline (a Redis Cluster routes each key to
        its node); returns the replies of ``calls``."""
        mappings = groups.mappings(split_records(records))
        with self.redis.pipeline(transaction=False) as pipe:
            for key, mapping in zip(keys, mappings, strict=True):
                pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
                if expire is not None:
                    pipe.expire(key, expire)
            for call in calls:
                if call.script is None:
                    pipe.execute_command(*call.args)
                else:
                    call.script(keys=list(call.keys), args=list(call.args), client=pipe)
            replies = pipe.execute()
        return replies[len(replies) - len(calls) :]

    def _observe(
        self,
        recommended: dict[str, int],
        n_candidates: np.ndarray,
        users: int,
        cold: int,
        rank_s: float,
        write_s: float,
    ) -> None:
        metrics.USERS.inc(users)
        metrics.COLD_USERS.inc(cold)
        metrics.RANK_DURATION.observe(rank_s)
        metrics.REDIS_WRITE_DURATION.observe(write_s)
        # Per-user observations would cost a Python call per user; the per-job mean and
        # the running total carry the same signal at a fixed cost.
        if users:
            metrics.CANDIDATES.observe(float(n_candidates.mean()))
            metrics.CANDIDATES_TOTAL.inc(int(n_candidates.sum()))
        for label, n in recommended.items():
            if n:
                metrics.RECOMMENDED.labels(label).inc(n)

    def record_dead(
        self, batch_id: str, job_id: str, users: int, user_ids: list[int] | None = None
    ) -> None:
        """Count a dead-lettered job in its batch ledger (once), finalizing the batch if that
        was its last job. A job already done (its ack was lost, then it reached the delivery
        limit) stays done. Raises TransientError."""
        try:
            if self.redis.sismember(self.keys.batch_done(batch_id), job_id):
                return
            with self.redis.pipeline(transaction=False) as pipe:
                self._progress(
                    keys=[self.keys.batch(batch_id), self.keys.batch_dead(batch_id)],
                    args=[
                        job_id,
                        users,
                        0,
                        f"{time.time():.3f}",
                        self.settings.batch_ttl_s,
                        "dead",
                    ],
                    client=pipe,
                )
                pipe.zadd(self.keys.batches, {batch_id: time.time()})
                if user_ids:
                    failed = self.keys.batch_dead_users(batch_id)
                    pipe.hset(failed, job_id, np.asarray(user_ids, dtype="<i8").tobytes())
                    pipe.expire(failed, self.settings.batch_ttl_s)
                outcome = pipe.execute()[0]
        except redis.RedisError as exc:
            raise TransientError(f"Redis unavailable: {exc}") from exc
        if outcome == COMPLETED:
            self.finalize(batch_id)
