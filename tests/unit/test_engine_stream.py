"""The stream handle between the engine thread and its consumer, with a plain thread as producer."""

from __future__ import annotations

import asyncio
import threading
import time

import inference  # noqa: F401  (loads the BLAS before mlx)
from inference.backend import GenerationChunk, GenerationError, Usage
from inference.engine_stream import GenerationHandle

import pytest


def chunk(text: str, finish: str | None = None) -> GenerationChunk:
    return GenerationChunk("r", text, (1,), Usage(3, 0, 1), finish_reason=finish)  # type: ignore[arg-type]


def produce(handle: GenerationHandle, texts: list[str], *, error: Exception | None = None) -> None:
    for i, text in enumerate(texts):
        time.sleep(0.002)
        handle.put(chunk(text, "stop" if i == len(texts) - 1 and error is None else None))
    if error is not None:
        handle.fail(error)


def test_sync_and_async_consumers_get_every_chunk_in_order() -> None:
    texts = [f"t{i}" for i in range(20)]
    handle = GenerationHandle("r", lambda _: None)
    threading.Thread(target=produce, args=(handle, texts)).start()
    assert [c.text for c in handle] == texts

    async def consume() -> list[str]:
        handle = GenerationHandle("r", lambda _: None)
        handle.put(chunk("early"))  # queued before the consumer attaches
        threading.Thread(target=produce, args=(handle, texts)).start()
        return [c.text async for c in handle]

    assert asyncio.run(consume()) == ["early", *texts]


def test_error_reaches_the_consumer_after_queued_chunks() -> None:
    handle = GenerationHandle("r", lambda _: None)
    produce(handle, ["a", "b"], error=GenerationError("boom"))
    received = []
    with pytest.raises(GenerationError, match="boom"):
        for c in handle:
            received.append(c.text)
    assert received == ["a", "b"]
    assert list(handle) == []  # the stream stays ended


def test_cancel_only_while_unfinished() -> None:
    cancelled: list[str] = []
    handle = GenerationHandle("r", cancelled.append)
    with handle:
        pass  # leaving the block early cancels
    assert cancelled == ["r"]
    handle.put(chunk("done", "stop"))
    handle.cancel()
    assert cancelled == ["r"]
