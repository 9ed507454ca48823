"""Parallel lanes for encoder batches on a CPU: each lane is one thread with its own MLX stream.

Why lanes: on a CPU the encoder leaves MLX once per layer (NumPy attention and LayerNorm,
`bert_attention.py`), so one thread cannot keep two MLX streams busy, and inside one batch
the work that is not a GEMM (GELU, embeddings, the sync points) runs on one core while the
others wait. Whole batches on parallel lanes, each with a one-core share of the BLAS and of
the NumPy kernels, keep every core busy: 2 lanes of 1 BLAS thread embed ~1.3x faster than one
lane of 2 threads on a 2-core machine (`benchmarks/embed.py --lanes`).

`EncoderBatches` is what the embedder and the cross-encoder use: several batches go to the
lanes, split so that every lane gets an even share; one batch (a query) runs on the calling
thread with every core's BLAS, as do all batches off a CPU (pipelined on one stream).

A lane thread runs compiled MLX functions (the encoder's GELU), so `close` waits for the OS
threads to be gone (`thread_exit.py`); lanes left open are closed at interpreter exit.
Ignores: what a batch holds and which model runs it (the caller's functions).
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from inference.blas import blas_threads_capped
from inference.numpy_pool import num_workers, set_thread_budget
from inference.thread_exit import wait_os_thread_exit

import mlx.core as mx
import numpy as np

T = TypeVar("T")
R = TypeVar("R")
_open_lanes: weakref.WeakSet[EncoderLanes] = weakref.WeakSet()
# On a CPU, one lane per core the BLAS may use, up to this many, each with cores // lanes BLAS
# threads: 2 lanes of 1 thread beat 1 lane of 2 threads on this project's 2-core machine
# (embedding ~1.3x, ingest ~1.4x); more than 4 lanes is unmeasured.
MAX_CPU_LANES = 4
# Batch indices -> a lazy result; token cap (None: the encoder's own budget) -> batches.
Forward = Callable[[list[int]], mx.array]
Plan = Callable[[int | None], list[list[int]]]


def default_num_lanes() -> int:
    return min(MAX_CPU_LANES, num_workers()) if mx.default_device() == mx.cpu else 1


class EncoderBatches:
    """Runs an encoder's batches: on lanes when there are several lanes and batches, else on
    the calling thread, each batch's graph built while the one before runs."""

    def __init__(self, num_lanes: int | None = None):
        self.num_lanes = max(1, default_num_lanes() if num_lanes is None else num_lanes)
        self._lanes: EncoderLanes | None = None  # started by the first call that uses them

    def run(
        self, plan: Plan, padded_tokens: int, forward: Forward
    ) -> list[tuple[list[int], np.ndarray]]:
        """(batch, its result as float32 NumPy) for every batch of `plan`; padded_tokens: all
        rows' padded lengths summed (to split the work evenly over the lanes)."""
        if self.num_lanes > 1:
            batches = plan(-(-padded_tokens // self.num_lanes))  # every lane gets work
            if len(batches) > 1:
                return list(zip(batches, self._on_lanes(batches, forward), strict=True))
        pending = []
        for batch in plan(None):
            result = forward(batch)
            mx.async_eval(result)  # build the next batch's graph while this one runs
            pending.append((batch, result))
        return [(batch, np.array(result.astype(mx.float32))) for batch, result in pending]

    def close(self) -> None:
        if self._lanes is not None:
            self._lanes.close()
            self._lanes = None

    def _on_lanes(self, batches: list[list[int]], forward: Forward) -> list[np.ndarray]:
        share = max(1, num_workers() // self.num_lanes)  # each lane's cores
        if self._lanes is None:
            self._lanes = EncoderLanes(self.num_lanes, kernel_workers=share)
        with blas_threads_capped(share):
            return self._lanes.map(lambda b: np.array(forward(b).astype(mx.float32)), batches)


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
