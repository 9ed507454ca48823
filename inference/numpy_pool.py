"""A thread pool for NumPy kernels that run beside MLX on a CPU (NumPy releases the GIL).

One worker per core the BLAS may use, each pinned to one BLAS thread of NumPy's own OpenBLAS so
the workers do not spawn threads that fight MLX's for the cores. Used by the encoder's attention
(`bert_attention.py`) and the chat model's long-prompt attention (`numpy_attention.py`).
A thread that already has its share of the cores (an encoder lane, `encoder_lanes.py`) lowers
its own worker budget; at 1 its kernels run inline on it.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_this_thread = threading.local()  # .workers: this thread's budget, when it set one
T = TypeVar("T")


def run_all(run: Callable[[T], None], tasks: list[T]) -> None:
    """run(task) for every task: on the pool when there is one, this thread's budget is above 1
    and there is more than one task."""
    pool = _get_pool()
    if pool is None or len(tasks) == 1 or num_workers() == 1:
        for task in tasks:
            run(task)
    else:
        for _ in pool.map(run, tasks):
            pass


def num_workers() -> int:
    """Workers this thread's kernels may use: its budget if it set one, else the pool's size."""
    budget = getattr(_this_thread, "workers", None)
    return _pool_size() if budget is None else min(budget, _pool_size())


def set_thread_budget(workers: int) -> None:
    """This thread's kernels use at most `workers` workers (1: inline, on this thread); its
    NumPy BLAS calls get one thread so they do not spawn more."""
    _this_thread.workers = max(1, workers)
    one_numpy_blas_thread()


def _pool_size() -> int:
    """One worker per core the BLAS may use (the benchmarks pin it with OPENBLAS_NUM_THREADS)."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return min(int(value), 16)
    return min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1, 16)


def _get_pool() -> ThreadPoolExecutor | None:
    global _pool
    if _pool_size() == 1:
        return None
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                _pool_size(), thread_name_prefix="numpy-kernels", initializer=one_numpy_blas_thread
            )
    return _pool


def one_numpy_blas_thread() -> None:
    """Each worker is one core's worth: NumPy's own OpenBLAS must not spawn threads of its
    own per call (they fight MLX's BLAS threads for the cores: 7x slower here)."""
    setter = _numpy_openblas_local_threads()
    if setter is not None:
        setter(1)


def _numpy_openblas_local_threads() -> Callable[[int], object] | None:
    """`openblas_set_num_threads_local` of the OpenBLAS bundled in NumPy's wheel (>= 0.3.27),
    or None where NumPy uses another BLAS (Accelerate, MKL) or an older OpenBLAS."""
    libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libs, "libscipy_openblas*.so*"))):
        try:
            return ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
    return None
