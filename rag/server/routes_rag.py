"""`POST /v1/rag/query`: a grounded, cited answer from the index, as JSON or as server-sent events.

    {"question", "top_k"?, "sources"?, "mode"?, "model"?, "max_tokens"?, "temperature"?,
     "rerank"?, "min_similarity"?, "stream"?}
    JSON:   {"answer", "finish_reason", "citations": [...], "timings": {...}, "model"}
    stream: event "sources" {citations, model}; events "delta" {text}; event "done"
            {finish_reason, timings, answer}; a failure after the 200: event "error" in OpenAI's
            error shape

Everything that can fail before generation (no index, empty index, another embedder, a bad
option, a full context) is a 4xx before the stream starts. Ignores: how answers are made
(rag_service.py, rag/answer.py).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from rag.answer import AnswerEvent, AnswerText, Sources
from rag.server.errors import APIError
from rag.server.rag_service import (
    MAX_TOP_K,
    RagQuery,
    answer_events,
    citation_json,
    collect_answer,
    timings_json,
)
from rag.server.services import Services
from rag.server.sse import sse_event, sse_response

router = APIRouter()


class RagQueryBody(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not ignored

    question: str
    top_k: int = Field(5, ge=1, le=MAX_TOP_K)
    sources: list[str] | None = Field(None, description="path prefixes: files or folders")
    mode: Literal["hybrid", "vector", "keyword"] = "hybrid"
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    rerank: bool = False  # the default follows a retrieval-quality measurement (pending)
    min_similarity: float | None = Field(None, ge=-1.0, le=1.0)
    stream: bool = False


def services_of(request: Request) -> Services:
    return request.app.state.services


def _query(body: RagQueryBody) -> RagQuery:
    if not body.question.strip():
        raise APIError(400, "question must not be empty", param="question")
    return RagQuery(
        question=body.question,
        top_k=body.top_k,
        sources=tuple(s for s in body.sources or () if s.strip()),
        mode=body.mode,
        model=body.model,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        rerank=body.rerank,
        min_similarity=body.min_similarity,
        restartable=not body.stream,
    )


def _sse(event: AnswerEvent, model: str) -> str:
    if isinstance(event, Sources):
        return sse_event(
            "sources", {"citations": [citation_json(c) for c in event.citations], "model": model}
        )
    if isinstance(event, AnswerText):
        return sse_event("delta", {"text": event.text})
    return sse_event(
        "done",
        {
            "finish_reason": event.finish_reason,
            "timings": timings_json(event.timings),
            "answer": event.answer,
            "model": model,
        },
    )


async def _stream(
    first: AnswerEvent, rest: AsyncGenerator[AnswerEvent, None], model: str
) -> AsyncIterator[str]:
    try:
        yield _sse(first, model)
        async for event in rest:
            yield _sse(event, model)
    finally:
        await rest.aclose()  # cancels the generation if the client left early


@router.post("/v1/rag/query", response_model=None)
async def rag_query(body: RagQueryBody, request: Request) -> dict | StreamingResponse:
    services = services_of(request)
    query = _query(body)
    model = services.models.get(body.model).model_name
    events = answer_events(services, query)
    first = await anext(events)  # retrieval and the engine's admission: errors are still 4xx
    if body.stream:
        # Named events ("event: error") carry errors here too; the body keeps OpenAI's shape.
        return sse_response(request.url.path, _stream(first, events, model), named_events=True)
    citations, done = await collect_answer(first, events)
    return {
        "object": "rag.answer",
        "model": model,
        "answer": done.answer,
        "finish_reason": done.finish_reason,
        "citations": citations,
        "timings": timings_json(done.timings),
    }
