"""The upstream pool on its own: failing over to nothing, cancelling, both ways of reading."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

from inference.backend import GenerationError, GenerationRequest
from inference.stopping import StopParams

import pytest

from rag.upstreams.config import RouterConfig, UpstreamSpec
from rag.upstreams.pool import NoUpstreamError, UpstreamPool

FAST = RouterConfig(retry_backoff_s=0.01, connect_timeout_s=0.5, health_interval_s=60)


def closed_port() -> int:
    """A loopback port nobody listens on: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def dead_pool() -> Iterator[UpstreamPool]:
    specs = [UpstreamSpec(f"http://127.0.0.1:{closed_port()}") for _ in range(2)]
    pool = UpstreamPool(specs, FAST, model="m", max_model_len=64, encode=lambda t: [1])
    yield pool
    pool.close()


def request() -> GenerationRequest:
    return GenerationRequest((1, 2, 3), stop=StopParams(max_tokens=4))


def test_every_attempt_failing_ends_the_stream_with_each_reason(dead_pool: UpstreamPool) -> None:
    with pytest.raises(NoUpstreamError, match="after 3 attempts") as error:
        list(dead_pool.start(request()))
    assert str(error.value).count("ConnectError") == 3
    stats = dead_pool.stats()
    assert [s.up for s in stats] == [False, False]
    assert sum(s.num_requests for s in stats) == 3 and sum(s.num_failures for s in stats) >= 3
    assert dead_pool.num_in_flight == 0


def test_async_readers_get_the_same_error(dead_pool: UpstreamPool) -> None:
    async def read() -> None:
        async for _ in dead_pool.start(request()):
            pass

    with pytest.raises(NoUpstreamError):
        asyncio.run(read())


def test_a_cancelled_request_ends_with_cancelled() -> None:
    slow = UpstreamPool(
        [UpstreamSpec(f"http://127.0.0.1:{closed_port()}")],
        RouterConfig(retry_backoff_s=5, health_interval_s=60),
        model="m",
        max_model_len=64,
        encode=lambda t: [1],
    )
    try:
        stream = slow.start(request())
        stream.cancel()  # during the backoff before attempt 2, or before the task even ran
        chunks = list(stream)
        assert [c.finish_reason for c in chunks] == ["cancelled"]
    finally:
        slow.close()


def test_closed_pool_refuses() -> None:
    pool = UpstreamPool(
        [UpstreamSpec("http://127.0.0.1:9")], FAST, model="m", max_model_len=8, encode=lambda t: [1]
    )
    pool.close()
    with pytest.raises(GenerationError, match="closed"):
        pool.start(request())
