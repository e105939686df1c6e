"""Results packed as Redis protocol bytes by the worker (worker/resp.py), on real Redis."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.connection import Connection

from recfleet.shared.errors import TransientError
from recfleet.shared.keys import Keys
from recfleet.shared.ledger import new_batch_fields
from recfleet.shared.messages import Job, make_jobs
from recfleet.shared.settings import Settings
from recfleet.worker.handler import JobHandler, PendingJob
from recfleet.worker.models import ModelStore
from recfleet.worker.resp import pack_hsets, send_packed

from .support.settings import purge
from .test_worker import _snapshot


def _groups(sizes: list[int]) -> np.ndarray:
    return np.cumsum(sizes, dtype=np.int64) if sizes else np.zeros(0, dtype=np.int64)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=40),
            st.lists(st.integers(0, 2**62), min_size=0, max_size=12),
        ),
        max_size=6,
    ),
    st.integers(1, 70),
    st.randoms(use_true_random=False),
)
def test_packed_hsets_are_the_bytes_redis_py_sends(
    commands: list[tuple[str, list[int]]], width: int, rnd: object
) -> None:
    keys = [key for key, _ in commands]
    fields = np.array([f for _, fs in commands for f in fs], dtype=np.int64)
    values = np.frombuffer(
        bytes(rnd.getrandbits(8) for _ in range(len(fields) * width)),  # type: ignore[attr-defined]
        dtype=np.uint8,
    ).reshape(len(fields), width)
    packed = pack_hsets(keys, _groups([len(fs) for _, fs in commands]), fields, values)
    expected: list[list[object]] = []
    row = 0
    for key, fs in commands:
        args: list[object] = ["HSET", key]
        for f in fs:
            args += [f, values[row].tobytes()]
            row += 1
        expected.append(args)
    assert packed.tobytes() == b"".join(Connection().pack_commands(expected))


def test_packing_refuses_mismatched_shapes() -> None:
    values = np.zeros((2, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="one field and one value row"):
        pack_hsets(["k"], _groups([2]), np.array([1]), values)
    with pytest.raises(ValueError, match="ascend"):
        pack_hsets(["k"], _groups([1]), np.array([1, 2]), values)
    with pytest.raises(ValueError, match="non-negative"):
        pack_hsets(["k"], _groups([2]), np.array([1, -2]), values)


def test_sent_commands_apply_and_an_error_reply_leaves_the_connection_in_step(
    redis_client: redis.Redis, settings: Settings
) -> None:
    p = settings.redis_prefix
    values = np.frombuffer(b"aaaabbbbcccc", dtype=np.uint8).reshape(3, 4)
    hsets = pack_hsets([f"{p}:h1", f"{p}:h2"], _groups([2, 1]), np.array([7, 8, 9]), values)
    replies = send_packed(redis_client, [hsets], 2, [("SET", f"{p}:s", "x")])
    assert replies == [2, 1, b"OK"]  # raw replies: no redis-py response callbacks
    assert redis_client.hgetall(f"{p}:h1") == {b"7": b"aaaa", b"8": b"bbbb"}
    assert redis_client.hgetall(f"{p}:h2") == {b"9": b"cccc"}

    # An HSET on a string key fails; the commands after it still run, as in a pipeline.
    wrong = pack_hsets([f"{p}:s"], _groups([1]), np.array([1]), values[:1])
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        send_packed(redis_client, [wrong], 1, [("SET", f"{p}:after", "y")])
    assert redis_client.get(f"{p}:after") == b"y"
    # Every pooled connection still answers its own commands.
    for _ in range(3):
        assert send_packed(redis_client, [], 0, [("GET", f"{p}:after")]) == [b"y"]


def _handled(
    settings: Settings,
    jobs: list[Job],
    *,
    packed: bool,
    flush_scripts: bool = False,
    overlapped: bool = False,
) -> dict:  # type: ignore[type-arg]
    """Redis's state after handling ``jobs`` (times of day left out). ``overlapped``: as
    the consumer does, each job is started before the previous one is finished, and the
    replies of every other job are lost once (the connection drops) before ``finish``."""
    client = redis.Redis.from_url(str(settings.redis_url))
    models = ModelStore(settings.artifacts, k=settings.top_k)
    handler = JobHandler(settings, models, client, packed_writes=packed)
    keys = Keys(settings.redis_prefix)
    users = sum(len(job.user_ids) for job in jobs)
    client.hset(keys.batch("b1"), mapping=new_batch_fields(len(jobs), users, run=True))
    held: PendingJob | None = None
    for i, job in enumerate(jobs):
        if flush_scripts:  # as after a Redis restart: the worker must load them again
            client.script_flush()
        if not overlapped:
            handler.handle(job)
            continue
        pending = handler.start(job)
        if held is not None:
            handler.finish(held)
        held = pending
        if i % 2 == 0:
            client.connection_pool.disconnect(inuse_connections=True)
            with pytest.raises(TransientError):
                handler.finish(held)
    if held is not None:
        handler.finish(held)
    snapshot = _snapshot(client, settings.redis_prefix)
    client.close()
    out = {}
    for key, value in snapshot.items():  # times of day differ between the two runs
        if isinstance(value, dict):
            value = {f: v for f, v in value.items() if not f.endswith(b"_at")}
        out[key.replace(settings.redis_prefix.encode(), b"P", 1)] = value
    return out


def test_packed_writes_store_what_the_pipeline_stores(fleet_settings: Settings) -> None:
    runs = {
        mode: fleet_settings.isolated(f"{fleet_settings.redis_prefix}-{mode}")
        for mode in ("pipelined", "packed", "overlapped")
    }
    jobs = make_jobs("b1", [*range(0, 900), *range(5000, 5600), 10**12, 3, 3], 1000)
    more = make_jobs("b1", list(range(9000, 14000)), 1000, first_index=len(jobs))
    try:
        pipelined = _handled(runs["pipelined"], jobs + more, packed=False)
        packed = _handled(runs["packed"], jobs + more, packed=True, flush_scripts=True)
        overlapped = _handled(runs["overlapped"], jobs + more, packed=True, overlapped=True)
    finally:
        for s in runs.values():
            purge(s)
    assert packed == pipelined
    # Replies read a job later, or lost and the write sent again: the same state.
    assert overlapped == pipelined
    results = [k for k in packed if k.startswith(b"P:r:b1:")]
    assert len(results) > 2 and sum(len(packed[k]) for k in results) == 6501  # type: ignore[arg-type]


_FIRST_JOB = """
import sys
from recfleet.shared.messages import make_jobs
from recfleet.shared.redis import redis_client
from recfleet.shared.settings import Settings
from recfleet.worker import resp, topk_kernel
from recfleet.worker.handler import JobHandler, PendingJob
from recfleet.worker.models import ModelStore

settings = Settings()
models = ModelStore(settings.artifacts, k=settings.top_k)
models.current()
handler = JobHandler(settings, models, redis_client(settings))
loops = (resp._pack_hsets, topk_kernel._KERNEL_FLOAT16, topk_kernel._KERNEL_FLOAT32)
before = [len(loop.signatures) for loop in loops]
for job in make_jobs("warm", list(range(300)), 100):
    handler.handle(job)
after = [len(loop.signatures) for loop in loops]
print(before, after)
# The packer and the loop for the model's table dtype were compiled before the job.
sys.exit(0 if before[0] > 0 and max(before[1:]) > 0 and before == after else 1)
"""


def test_a_worker_compiles_its_loops_before_the_first_job(fleet_settings: Settings) -> None:
    """A loaded model and a handler leave nothing to compile on the first job (with a
    cold numba cache, compiling the packer alone takes seconds). Runs in a fresh process,
    where nothing else has compiled them."""
    from recfleet.cli.fleet import settings_env

    env = {**os.environ, **settings_env(fleet_settings)}
    done = subprocess.run(
        [sys.executable, "-c", _FIRST_JOB], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
