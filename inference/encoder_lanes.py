"""Parallel lanes for encoder batches on a CPU: each lane is one thread with its own MLX stream.

Why lanes: on a CPU the encoder leaves MLX once per layer (NumPy attention and LayerNorm,
`bert_attention.py`), so one thread cannot keep two MLX streams busy, and inside one batch
the work that is not a GEMM (GELU, embeddings, the sync points) runs on one core while the
others wait. Whole batches on parallel lanes, each with a one-core share of the BLAS and of
the NumPy kernels, keep every core busy: 2 lanes of 1 BLAS thread embed ~1.3x faster than one
lane of 2 threads on a 2-core machine (`benchmarks/embed.py --lanes`).

A lane thread runs compiled MLX functions (the encoder's GELU), so `close` waits for the OS
threads to be gone (`thread_exit.py`); lanes left open are closed at interpreter exit.
Ignores: what a batch is, and models (the caller's function does the work).
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from inference.numpy_pool import set_thread_budget
from inference.thread_exit import wait_os_thread_exit

import mlx.core as mx

T = TypeVar("T")
R = TypeVar("R")
_open_lanes: weakref.WeakSet[EncoderLanes] = weakref.WeakSet()


class EncoderLanes:
    """`map(fn, items)`: fn(item) for each item on `num_lanes` threads, results in input order.

    Items are taken in order as lanes come free (give the biggest first to balance the ends).
    On a lane, fn runs with that lane's MLX stream as the default stream and NumPy kernels
    limited to `kernel_workers` workers (1: inline on the lane).
    """

    def __init__(self, num_lanes: int, *, kernel_workers: int = 1, device: mx.Device | None = None):
        if num_lanes < 1:
            raise ValueError(f"num_lanes must be >= 1, got {num_lanes}")
        self.num_lanes = num_lanes
        self._kernel_workers = kernel_workers
        self._device = device if device is not None else mx.default_device()
        self._lane = threading.local()  # .stream: this lane's MLX stream
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        _open_lanes.add(self)

    def map(self, fn: Callable[[T], R], items: list[T]) -> list[R]:
        """Run fn over items on the lanes; the first error any item raised is raised here."""
        pool = self._get_pool()
        return list(pool.map(lambda item: self._run(fn, item), items))

    def close(self) -> None:
        """Stop the lanes (after the items already taken) and wait for their OS threads."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for thread in self._threads:
            wait_os_thread_exit(thread)
        self._threads.clear()

    def _run(self, fn: Callable[[T], R], item: T) -> R:
        with mx.stream(self._lane.stream):
            return fn(item)

    def _get_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError("these encoder lanes are closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.num_lanes, thread_name_prefix="encoder-lane", initializer=self._start_lane
                )
            return self._pool

    def _start_lane(self) -> None:
        self._threads.append(threading.current_thread())
        self._lane.stream = mx.new_stream(self._device)  # made here: streams belong to a thread
        set_thread_budget(self._kernel_workers)


@atexit.register
def _close_open_lanes() -> None:
    """Before the interpreter finalizes: a lane thread dying later could abort the process."""
    for lanes in list(_open_lanes):
        lanes.close()
