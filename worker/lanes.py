"""One compute thread that always takes the most urgent task first."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

URGENT = 0  # synchronous requests and dead-letter bookkeeping
BATCH = 1  # batch jobs


class PriorityLane:
    """Runs submitted callables one at a time on its own thread, lowest priority first,
    in submission order within a priority. Torch uses one thread per worker process, so
    one compute thread is all a process needs; the lane keeps sync requests ahead."""

    def __init__(self, name: str = "rank", on_idle: Callable[[], None] | None = None) -> None:
        """``on_idle`` runs on the lane's thread whenever a task ends with nothing queued,
        and before the lane stops: still part of that task (``idle`` stays False)."""
        self._on_idle = on_idle
        self._queue: queue.PriorityQueue[tuple[int, int, Callable[[], None] | None]] = (
            queue.PriorityQueue()
        )
        self._seq = itertools.count()
        self._started: float | None = None  # monotonic start of the task running now
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, priority: int, fn: Callable[[], None]) -> None:
        self._queue.put((priority, next(self._seq), fn))

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing running."""
        return self._queue.unfinished_tasks == 0

    @property
    def busy_for(self) -> float:
        """Seconds the task running now has been running (0 when none is)."""
        started = self._started
        return 0.0 if started is None else time.monotonic() - started

    def shutdown(self) -> None:
        """Finish what was submitted, then stop the thread."""
        self._queue.put((1 << 30, next(self._seq), None))
        self._thread.join()

    def _run(self) -> None:
        while True:
            _, _, fn = self._queue.get()
            try:
                self._started = time.monotonic()
                if fn is not None:
                    self._call(fn)
                if self._on_idle is not None and (fn is None or self._queue.empty()):
                    self._call(self._on_idle)
                if fn is None:
                    return
            finally:
                self._started = None
                self._queue.task_done()

    @staticmethod
    def _call(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # a task's failure must not kill the lane
            log.exception("task failed")
