"""Submitting a generation from a route: errors before the stream starts, metrics, cancel on exit.

    handle = start_generation(services, backend, request)   # raises APIError: 400 / 503
    async for chunk in follow(services, backend, handle): ...   # cancels if the caller leaves

A GenerationError is a 500, unless it carries a `status_code`: a remote upstream's own 4xx is
kept, and 503 says no upstream could take the request (rag.upstreams).

`start_generation` runs before a route returns its StreamingResponse, so a bad request gets a
4xx instead of a 200 with a broken stream. `follow` cancels the request in the engine when the
consumer stops early (a client that disconnects frees its batch slot at the next step).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from inference.backend import (
    GenerationBackend,
    GenerationChunk,
    GenerationError,
    GenerationRequest,
    GenerationStream,
    Usage,
)
from inference.engine_types import ContextLengthError, EngineClosedError

from rag.server.errors import APIError
from rag.server.services import Services


def start_generation(backend: GenerationBackend, request: GenerationRequest) -> GenerationStream:
    try:
        return backend.submit(request)
    except ContextLengthError as exc:
        raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from exc
    except EngineClosedError as exc:
        raise APIError(503, f"the model is shutting down: {exc}", code="unavailable") from exc
    except GenerationError as exc:
        raise generation_failed(exc, "the model failed") from exc
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc


def generation_failed(exc: GenerationError, what: str) -> APIError:
    """The backend's own status when it has one: an upstream's 4xx, 503 when none could serve."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and (400 <= status < 500 or status == 503):
        code = "unavailable" if status == 503 else None
        return APIError(status, f"{what}: {exc}", code=code)
    return APIError(500, f"{what}: {exc}")


async def follow(
    services: Services, backend: GenerationBackend, stream: GenerationStream
) -> AsyncIterator[GenerationChunk]:
    """The stream's chunks; records metrics at the end and cancels if the consumer leaves early."""
    submitted = time.perf_counter()
    first_token_at: float | None = None
    usage: Usage | None = None
    finished = False
    try:
        async for chunk in stream:
            if first_token_at is None and chunk.token_ids:
                first_token_at = time.perf_counter()
            usage = chunk.usage
            finished = chunk.finish_reason is not None
            yield chunk
    except GenerationError as exc:
        raise generation_failed(exc, "the model failed while generating") from exc
    finally:
        if not finished:
            stream.cancel()
        if usage is not None and services.metrics is not None:
            now = time.perf_counter()
            services.metrics.observe_generation(
                backend.model_name,
                prompt_tokens=usage.prompt_tokens,
                cached_tokens=usage.cached_tokens,
                completion_tokens=usage.completion_tokens,
                ttft_s=None if first_token_at is None else first_token_at - submitted,
                decode_s=None if first_token_at is None else now - first_token_at,
            )


async def collect(
    services: Services, backend: GenerationBackend, stream: GenerationStream
) -> tuple[str, GenerationChunk]:
    """A non-streaming request: all text and the last chunk (finish reason and usage)."""
    parts: list[str] = []
    last: GenerationChunk | None = None
    async for chunk in follow(services, backend, stream):
        parts.append(chunk.text)
        last = chunk
    assert last is not None, "a generation stream ends with a finish chunk"
    return "".join(parts), last
