"""Worker processes: one consumer per process, and a supervisor for ``--processes N``."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from types import FrameType

import torch

from recfleet.shared.logs import configure_logging
from recfleet.shared.redis import redis_client
from recfleet.shared.settings import Settings
from recfleet.worker.consumer import Consumer
from recfleet.worker.handler import JobHandler
from recfleet.worker.models import ModelStore
from recfleet.worker.server import serve

log = logging.getLogger(__name__)


def run_worker(settings: Settings, index: int = 0) -> None:
    """Load the model once, serve metrics, and consume until SIGTERM or SIGINT.

    Raises ArtifactError when the artifacts are missing or corrupt.
    """
    torch.set_num_threads(settings.torch_threads)
    models = ModelStore(settings.artifacts, k=settings.top_k, shard=settings.shard)
    model = models.current()
    client = redis_client(settings, socket_timeout=10)
    handler = JobHandler(settings, models, client)
    consumer = Consumer(settings, handler, sample_queues=index == 0)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: finishing the current job, then exiting", signum)
        consumer.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    port = settings.metrics_port + index if settings.metrics_port else 0
    server = serve(
        "0.0.0.0",
        port,
        lambda: consumer.healthy,
        lambda: consumer.alive,
        lambda: consumer.stuck,
    )
    log.info(
        "worker %d: model %s, %d users, metrics on :%d",
        index,
        model.version,
        model.artifacts.n_users,
        server.server_address[1],
    )
    consumer.run()
    server.shutdown()
    client.close()


def _child(settings: Settings, index: int) -> None:
    configure_logging(settings.log_level, settings.log_json)
    run_worker(settings, index)


def run_fleet(settings: Settings, processes: int) -> int:
    """Run ``processes`` worker processes; restart any that dies; stop all on SIGTERM/SIGINT.

    Returns the exit code for the command: 0 after a clean stop.
    """
    if processes == 1:
        run_worker(settings, 0)
        return 0
    # Fork, not spawn: the children share the parent's already-imported torch and Python
    # runtime copy-on-write, so a second worker costs ~30 MB of private memory instead of
    # ~200 MB. The parent has run no torch op and opened no connection before forking.
    ctx = mp.get_context("fork")
    stopping = False
    children: dict[int, mp.process.BaseProcess] = {}
    restarts: dict[int, float] = {}

    def start(i: int) -> None:
        proc = ctx.Process(target=_child, args=(settings, i), name=f"worker-{i}", daemon=False)
        proc.start()
        children[i] = proc

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for proc in children.values():
            if proc.pid and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for i in range(processes):
        start(i)
    while children:
        for i, proc in list(children.items()):
            proc.join(timeout=0.2)
            if proc.exitcode is None:
                continue
            del children[i]
            if not stopping:
                # Back off if a process keeps dying (e.g. a job that crashes it).
                wait = 1.0 if time.monotonic() - restarts.get(i, 0) > 30 else 5.0
                log.error("worker %d exited with %s; restarting in %.0fs", i, proc.exitcode, wait)
                # A SIGTERM during the back-off must not start a child nobody will stop.
                deadline = time.monotonic() + wait
                while not stopping and time.monotonic() < deadline:
                    time.sleep(0.1)
                if stopping:
                    continue
                restarts[i] = time.monotonic()
                start(i)
    return 0
