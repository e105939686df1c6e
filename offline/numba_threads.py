"""Numba's thread pool for the offline kernels: started waiting asleep, sized per call.

Threads that wait for work spinning (OpenMP's default) are the fastest on an idle
machine, but when another process holds a core a kernel's parallel regions wait out
scheduler slices: two threads ran 2-10x slower than one on a shared 2-core machine.
``start`` therefore starts numba's pool with ``OMP_WAIT_POLICY=passive`` (unless the
variable is set): about 10 % slower than spinning when idle, no slower than one thread
when a core is taken. OpenMP reads the variable once, when numba loads it to start its
threads (its copy is not torch's or scikit-learn's), so it is set for that moment only;
a pool started earlier, or another threading layer, is left as it is.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import numba


@functools.cache
def start() -> None:
    """Start numba's thread pool (once), its threads waiting for work asleep."""
    if "OMP_WAIT_POLICY" in os.environ:
        numba.get_num_threads()
        return
    os.environ["OMP_WAIT_POLICY"] = "passive"
    try:
        numba.get_num_threads()
    finally:
        del os.environ["OMP_WAIT_POLICY"]


def most() -> int:
    """The most threads numba runs: the core count unless NUMBA_NUM_THREADS says fewer."""
    return int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]  # set at import


@contextlib.contextmanager
def using(threads: int) -> Iterator[None]:
    """Run numba's parallel loops on ``threads`` threads (at most ``most()``) in a block."""
    start()
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(threads, most())))
    try:
        yield
    finally:
        numba.set_num_threads(before)
