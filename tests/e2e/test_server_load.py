"""Many streams at once, and clients that leave early: no errors, and every engine slot comes back.

A client that disconnects must not leave its request generating for nobody: after it goes, the
engine's queue (waiting) and batch (running) drain to 0 long before the request's max_tokens,
and the tokens generated for it stay far below that.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

from inference.chat_model import default_chat_model
from inference.engine import Engine, EngineConfig

import httpx
import openai
import pytest

from rag.server.services import Services, StaticModelRegistry
from tests.fixtures.live_server import (
    TINY_MODEL,
    TinyServer,
    make_tiny_services,
    tiny_server_running,
)
from tests.fixtures.tiny_llama import SPECIAL_TOKENS

NO_EOS = {str(SPECIAL_TOKENS.index("<|im_end|>")): -100}
NUM_SLOTS = 16
LONG = 1500  # tokens a request would generate if nobody stopped it (seconds on the tiny model)


@pytest.fixture(scope="module")
def server(tiny_llama_path: Path) -> Iterator[TinyServer]:
    services = make_tiny_services(
        tiny_llama_path, engine_config=EngineConfig(max_num_seqs=NUM_SLOTS)
    )
    with tiny_server_running(services) as running:
        yield running


def completion_tokens(services: Services, model: str) -> float:
    assert services.metrics is not None
    value = services.metrics.registry.get_sample_value(
        "rag_completion_tokens_total", {"model": model}
    )
    return value or 0.0


def wait_until_idle(services: Services, timeout_s: float) -> float:
    """Seconds until no request waits or runs in any engine; fails after timeout_s."""
    started = time.monotonic()
    while any(waiting or running for waiting, running in services.models.load().values()):
        assert time.monotonic() - started < timeout_s, f"still busy: {services.models.load()}"
        time.sleep(0.02)
    return time.monotonic() - started


async def stream_chat(client: openai.AsyncOpenAI, model: str, seed: int, max_tokens: int) -> int:
    """One streamed chat to its end; returns the completion tokens the usage chunk reports."""
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Tell me about request {seed}."}],
        max_tokens=max_tokens,
        seed=seed,
        stream=True,
        stream_options={"include_usage": True},
    )
    finish_reasons = []
    usage = None
    async for chunk in stream:
        finish_reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
        usage = chunk.usage or usage
    assert len(finish_reasons) == 1 and finish_reasons[0] in ("stop", "length")
    assert usage is not None
    return usage.completion_tokens


async def many_streams(base_url: str, model: str, num_streams: int, max_tokens: int) -> list:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused") as client:
        return await asyncio.gather(
            *(stream_chat(client, model, seed, max_tokens) for seed in range(num_streams)),
            return_exceptions=True,
        )


def test_64_concurrent_streams_complete_without_errors(server: TinyServer) -> None:
    results = asyncio.run(many_streams(server.base_url, TINY_MODEL, 64, max_tokens=24))
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert all(1 <= r <= 24 for r in results)
    wait_until_idle(server.services, timeout_s=5)


async def leave_after_first_content(client: openai.AsyncOpenAI, seed: int) -> None:
    stream = await client.chat.completions.create(
        model=TINY_MODEL,
        messages=[{"role": "user", "content": "Go on and on."}],
        max_tokens=LONG,
        logit_bias=NO_EOS,
        seed=seed,
        stream=True,
    )
    async with stream:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break  # leaving the `async with` closes the connection


def test_streams_that_disconnect_free_their_slots(server: TinyServer) -> None:
    # More streams than slots: some leave while running, some while still waiting.
    num_streams = NUM_SLOTS + 8
    before = completion_tokens(server.services, TINY_MODEL)

    async def run() -> None:
        async with openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="x") as client:
            await asyncio.gather(
                *(leave_after_first_content(client, s) for s in range(num_streams))
            )

    asyncio.run(run())
    wait_until_idle(server.services, timeout_s=10)
    generated = completion_tokens(server.services, TINY_MODEL) - before
    assert generated < num_streams * LONG / 4, f"{generated} tokens: requests ran on"


def test_non_streaming_client_that_times_out_frees_its_slot(server: TinyServer) -> None:
    before = completion_tokens(server.services, TINY_MODEL)
    body = {
        "messages": [{"role": "user", "content": "Go on."}],
        "max_tokens": LONG,
        "logit_bias": NO_EOS,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=0.5)
    wait_until_idle(server.services, timeout_s=3)
    generated = completion_tokens(server.services, TINY_MODEL) - before
    assert generated < LONG / 2, f"{generated} tokens: the request ran on"


@pytest.mark.slow
@pytest.mark.default_models
def test_64_streams_on_the_default_model() -> None:
    engine = Engine.from_path(default_chat_model(), config=EngineConfig(max_num_seqs=16))
    services = Services(models=StaticModelRegistry([engine]))
    with tiny_server_running(services) as running:
        started = time.perf_counter()
        results = asyncio.run(many_streams(running.base_url, engine.model_name, 64, max_tokens=16))
        wall_s = time.perf_counter() - started
        errors = [r for r in results if isinstance(r, BaseException)]
        print(
            f"64 streams x 16 tokens on {engine.model_name}: {wall_s:.1f} s, {len(errors)} errors"
        )
        assert errors == []
        wait_until_idle(services, timeout_s=10)
