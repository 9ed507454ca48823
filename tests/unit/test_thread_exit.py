"""wait_os_thread_exit: returns once the joined thread's OS thread is gone."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from inference.thread_exit import wait_os_thread_exit

import pytest


def test_returns_true_once_the_os_thread_is_gone() -> None:
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
    assert wait_os_thread_exit(thread)
    if Path("/proc/self/task").is_dir():
        assert not Path(f"/proc/self/task/{thread.native_id}").exists()


def test_times_out_on_a_live_thread() -> None:
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs /proc")
    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    try:
        assert not wait_os_thread_exit(thread, timeout_s=0.05)
    finally:
        release.set()
        thread.join()


def test_closing_an_engine_then_exiting_is_clean(tiny_llama_path: Path) -> None:
    # The race this closes aborted about half of such runs (exit status 134) before.
    script = f"""
import asyncio
import inference
import mlx.core as mx
from mlx_lm import load
from inference.backend import GenerationRequest
from inference.engine import Engine, EngineConfig
from inference.sampling import SamplingParams
from inference.stopping import StopParams
model, tokenizer = load({str(tiny_llama_path)!r})
mx.eval(model(mx.array([[1, 2, 3]])))  # the main thread uses compiled functions first
engine = Engine.from_path({str(tiny_llama_path)!r}, config=EngineConfig(mtp=False))
async def main():
    handle = engine.submit(GenerationRequest((1, 2, 3), SamplingParams(), StopParams(max_tokens=3)))
    async for _ in handle:
        pass
asyncio.run(main())
engine.close()
"""
    for _ in range(4):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
