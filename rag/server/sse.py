"""Server-sent events for streamed responses, with errors that arrive after the 200.

An error inside a stream cannot change the status any more, so it is sent as one last event in
the route's error shape (what OpenAI and Anthropic servers do), then the stream ends.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from rag.server.errors import APIError, error_body

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_data(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def sse_event(event: str, payload: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _guarded(path: str, events: AsyncIterator[str], named_events: bool) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield event
    except APIError as exc:
        body = error_body(path, exc)
        yield sse_event("error", body) if named_events else sse_data(body)
    except Exception as exc:  # the stream must end in an error event, not a cut
        log.exception("stream on %s failed", path)
        body = error_body(path, APIError(500, f"internal error: {type(exc).__name__}"))
        yield sse_event("error", body) if named_events else sse_data(body)


# named_events: the stream uses `event:` lines (Anthropic, /v1/rag/query), so an error is an
# `event: error`; OpenAI streams have data lines only. The body's shape follows the path.
def sse_response(
    path: str, events: AsyncIterator[str], *, named_events: bool = False
) -> StreamingResponse:
    return StreamingResponse(
        _guarded(path, events, named_events), media_type="text/event-stream", headers=SSE_HEADERS
    )
