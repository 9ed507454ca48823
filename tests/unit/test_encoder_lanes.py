"""Encoder lanes: batches on parallel threads, each with its own MLX stream and core share."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from inference import numpy_pool
from inference.blas import blas_threads, blas_threads_capped
from inference.embedder import Embedder
from inference.encoder_lanes import EncoderLanes

import mlx.core as mx
import numpy as np
import pytest

from tests.fixtures.tiny_bert import MAX_SEQ_LENGTH
from tests.unit.test_embedder import TEXTS as EMBEDDER_TEXTS

TEXTS = [*EMBEDDER_TEXTS, "paris " * 7, "rome"] * 5


def test_map_keeps_input_order_and_runs_on_the_lanes() -> None:
    lanes = EncoderLanes(2)
    seen: set[str] = set()

    def work(item: int) -> tuple[int, float]:
        seen.add(threading.current_thread().name)
        time.sleep(0.01 * (item % 3))  # finish out of order
        return item, float(mx.sum(mx.arange(item + 1)).item())

    try:
        results = lanes.map(work, list(range(12)))
    finally:
        lanes.close()
    assert results == [(i, i * (i + 1) / 2) for i in range(12)]
    assert seen and all(name.startswith("encoder-lane") for name in seen)


def test_each_lane_has_its_own_stream() -> None:
    lanes = EncoderLanes(2)
    barrier = threading.Barrier(2)

    def stream_of(_: int) -> str:
        barrier.wait(timeout=5)  # both lanes hold an item at once
        return repr(mx.default_stream(mx.default_device()))  # "Stream(Device(cpu, 0), N)"

    try:
        streams = lanes.map(stream_of, [0, 1])
    finally:
        lanes.close()
    assert len(set(streams)) == 2


def test_an_error_in_a_lane_is_raised_to_the_caller() -> None:
    lanes = EncoderLanes(2)

    def work(item: int) -> int:
        if item == 3:
            raise ValueError("bad batch 3")
        return item

    try:
        with pytest.raises(ValueError, match="bad batch 3"):
            lanes.map(work, list(range(6)))
        assert lanes.map(work, [0, 1]) == [0, 1]  # the lanes still work after an error
    finally:
        lanes.close()


def test_closed_lanes_refuse_work() -> None:
    lanes = EncoderLanes(1)
    assert lanes.map(lambda x: x * 2, [1, 2]) == [2, 4]
    lanes.close()
    with pytest.raises(RuntimeError, match="closed"):
        lanes.map(lambda x: x, [1])


def test_a_budget_of_one_runs_kernels_inline() -> None:
    where: list[str] = []

    def on_thread_with_budget() -> None:
        numpy_pool.set_thread_budget(1)
        assert numpy_pool.num_workers() == 1
        numpy_pool.run_all(lambda _: where.append(threading.current_thread().name), [0, 1, 2])

    thread = threading.Thread(target=on_thread_with_budget, name="budgeted")
    thread.start()
    thread.join()
    assert where == ["budgeted"] * 3


def test_blas_cap_is_counted_and_restored() -> None:
    before = blas_threads()
    if before is None:
        pytest.skip("no preloaded OpenBLAS")
    with blas_threads_capped(1):
        assert blas_threads() == 1
        with blas_threads_capped(1):
            assert blas_threads() == 1
        assert blas_threads() == 1  # still held by the outer holder
    assert blas_threads() == before


def test_lanes_give_the_same_vectors_as_one_thread(tiny_bert_path: Path) -> None:
    one = Embedder.load(tiny_bert_path, batch_tokens=MAX_SEQ_LENGTH * 2, lanes=1)
    two = Embedder.load(tiny_bert_path, batch_tokens=MAX_SEQ_LENGTH * 2, lanes=2)
    try:
        lengths = one.count_tokens(TEXTS)
        assert len(list(two._batches(lengths))) > 2  # several batches, so the lanes run
        a, b = one.embed(TEXTS), two.embed(TEXTS)
        np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-6)
        assert a.num_tokens == b.num_tokens and a.truncated == b.truncated
        # A single text takes the one-thread path, and agrees with its row above.
        np.testing.assert_allclose(two.embed([TEXTS[2]]).vectors[0], a.vectors[2], atol=1e-6)
    finally:
        two.close()


def test_lanes_split_a_single_batch_so_every_lane_works(tiny_bert_path: Path) -> None:
    embedder = Embedder.load(tiny_bert_path, lanes=2)
    texts = [f"paris and rome {i}" for i in range(12)]  # one length: one batch by the budget
    calls: list[int] = []
    forward = embedder._forward

    def counting_forward(rows: list[list[int]]) -> mx.array:
        calls.append(len(rows))
        return forward(rows)

    embedder._forward = counting_forward  # type: ignore[method-assign]
    try:
        assert len(list(embedder._batches(embedder.count_tokens(texts)))) == 1
        embedder.embed(texts)
    finally:
        embedder.close()
    assert len(calls) == 2 and sum(calls) == len(texts)


def test_a_lane_error_reaches_embed_and_restores_the_blas(tiny_bert_path: Path) -> None:
    embedder = Embedder.load(tiny_bert_path, batch_tokens=MAX_SEQ_LENGTH * 2, lanes=2)
    before = blas_threads()

    def failing_forward(rows: list[list[int]]) -> mx.array:
        raise MemoryError("no room for this batch")

    embedder._forward = failing_forward  # type: ignore[method-assign]
    try:
        with pytest.raises(MemoryError, match="no room"):
            embedder.embed(TEXTS)
    finally:
        embedder.close()
    assert blas_threads() == before


def test_exiting_with_lanes_open_is_clean(tiny_bert_path: Path) -> None:
    # Lane threads run the compiled GELU; left open, they are closed before finalization.
    script = f"""
import inference
from inference.embedder import Embedder
embedder = Embedder.load({str(tiny_bert_path)!r}, batch_tokens={MAX_SEQ_LENGTH * 2}, lanes=2)
embedder.embed({TEXTS!r})
"""
    for _ in range(4):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
