"""RAG through `/v1/chat/completions`, for OpenAI clients and chat UIs that only speak that route.

Turned on by either
    model "rag" (the default chat model) or "rag:<model>"     any client or UI can pick it
    the extension field "rag": true, or {"top_k", "sources", "mode", "rerank", "min_similarity"}
                                                             (openai client: extra_body={"rag": ...})

The last user message is the question; it is answered from the index alone (earlier turns are
not retrieved on). The response is an ordinary chat completion whose text cites passages as [n];
the passages ride along as an extra top-level field `citations` (on the response, or on the
first streamed chunk) and the stage timings as `rag_timings` (on the response, or on the chunk
that carries the finish reason). Clients that do not know the fields ignore them.

Ignores: retrieval and prompts (rag_service.py, rag/answer.py), the plain chat path (routes_openai.py).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from rag.answer import AnswerDone, AnswerEvent, AnswerText, Sources
from rag.server.chat_format import template_messages
from rag.server.errors import APIError
from rag.server.openai_schemas import ChatCompletionRequest, RagOptions, ResponseMeta
from rag.server.rag_service import (
    RagQuery,
    answer_events,
    citation_json,
    collect_answer,
    timings_json,
)
from rag.server.services import Services
from rag.server.sse import sse_data, sse_response

RAG_MODEL = "rag"
_PREFIX = "rag:"


def rag_requested(body: ChatCompletionRequest) -> bool:
    model = body.model or ""
    return body.rag is not None or model == RAG_MODEL or model.startswith(_PREFIX)


def _chat_model(body: ChatCompletionRequest) -> str | None:
    model = body.model or ""
    if model == RAG_MODEL:
        return None  # the default chat model
    if model.startswith(_PREFIX):
        return model.removeprefix(_PREFIX) or None
    return model or None


def _query(body: ChatCompletionRequest) -> RagQuery:
    options = body.rag or RagOptions()
    if (body.n or 1) > 1:
        raise APIError(400, "n > 1 is not supported with RAG", param="n")
    if body.stop:
        raise APIError(400, "stop is not supported with RAG", param="stop")
    messages = template_messages(body.messages)
    question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    if not question.strip():
        raise APIError(400, "RAG needs a user message with the question", param="messages")
    return RagQuery(
        question=question,
        top_k=options.top_k,
        sources=tuple(s for s in options.sources if s.strip()),
        mode=options.mode,
        model=_chat_model(body),
        max_tokens=body.completion_limit,
        temperature=body.temperature,
        rerank=options.rerank,
        min_similarity=options.min_similarity,
        restartable=not body.stream,
    )


def _finish_reason(done: AnswerDone) -> str:
    # "not_found" is a stop by choice (the documents do not cover it); OpenAI knows only these two.
    return "length" if done.finish_reason == "length" else "stop"


def _usage(done: AnswerDone) -> dict:
    t = done.timings
    return {
        "prompt_tokens": t.num_prompt_tokens,
        "completion_tokens": t.num_completion_tokens,
        "total_tokens": t.num_prompt_tokens + t.num_completion_tokens,
        "prompt_tokens_details": {"cached_tokens": t.num_cached_tokens},
    }


async def rag_chat_completion(
    body: ChatCompletionRequest, request: Request, services: Services
) -> Response:
    try:
        query = _query(body)
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from exc
    model = services.models.get(query.model).model_name
    events = answer_events(services, query)
    first = await anext(events)  # retrieval and admission: failures are still a 4xx
    meta = ResponseMeta.make("chatcmpl", model)
    if body.stream:
        stream = _chunks(meta, first, events, body.include_usage)
        return sse_response(request.url.path, stream)
    return JSONResponse(await _complete(meta, first, events))


async def _complete(
    meta: ResponseMeta, first: AnswerEvent, events: AsyncGenerator[AnswerEvent, None]
) -> dict:
    citations, done = await collect_answer(first, events)
    return {
        **meta.head("chat.completion"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": done.answer},
                "logprobs": None,
                "finish_reason": _finish_reason(done),
            }
        ],
        "usage": _usage(done),
        "citations": citations,
        "rag_timings": timings_json(done.timings),
    }


async def _chunks(
    meta: ResponseMeta,
    first: AnswerEvent,
    events: AsyncGenerator[AnswerEvent, None],
    include_usage: bool,
) -> AsyncIterator[str]:
    head = meta.head("chat.completion.chunk")

    def chunk(delta: dict, finish: str | None = None, **extra: object) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse_data({**head, "choices": [choice], **extra})

    async def all_events() -> AsyncIterator[AnswerEvent]:
        yield first
        async for event in events:
            yield event

    try:
        started = False
        async for event in all_events():
            if isinstance(event, Sources):
                citations = [citation_json(c) for c in event.citations]
                yield chunk({"role": "assistant", "content": ""}, citations=citations)
                started = True
            elif isinstance(event, AnswerText):
                if not started:
                    yield chunk({"role": "assistant", "content": ""}, citations=[])
                    started = True
                yield chunk({"content": event.text})
            elif isinstance(event, AnswerDone):
                if not started:  # not found: no sources, the whole answer at once
                    yield chunk({"role": "assistant", "content": event.answer}, citations=[])
                yield chunk({}, _finish_reason(event), rag_timings=timings_json(event.timings))
                if include_usage:
                    yield sse_data({**head, "choices": [], "usage": _usage(event)})
        yield sse_data("[DONE]")
    finally:
        await events.aclose()  # cancels the generation if the client left early
