"""Anthropic's Messages API: POST /v1/messages (plain and streamed) and its count_tokens.

    body -> to_chat (400s for what is not text) -> prompt ids (chat template; a final assistant
    turn is continued) -> start_generation (400 "prompt is too long" before any stream)
    -> one Message, or the SSE events:

    message_start, content_block_start, ping, content_block_delta*, content_block_stop,
    message_delta (stop_reason, usage), message_stop

Errors come out in Anthropic's shape because errors.py picks it for paths under /v1/messages.
API keys (x-api-key or Bearer) are checked by the middleware.

Ignores: the anthropic-version and anthropic-beta headers (one API version is served), and every
content type but text (anthropic_schemas.py refuses them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence

from inference.backend import (
    GenerationBackend,
    GenerationChunk,
    GenerationRequest,
    GenerationStream,
)
from inference.sampling import SamplingParams
from inference.stopping import StopParams

from fastapi import APIRouter, Request
from jinja2 import TemplateError

from rag.server.anthropic_schemas import (
    Chat,
    CountTokensRequest,
    CountTokensResponse,
    CreateMessageRequest,
    MessageResponse,
    TextContent,
    message_usage,
    stop_reason_of,
    to_chat,
)
from rag.server.errors import APIError
from rag.server.generation import collect, follow, start_generation
from rag.server.services import Services
from rag.server.sse import sse_event, sse_response

router = APIRouter(tags=["anthropic"])

_ERRORS: dict[int | str, dict] = {
    400: {"description": "invalid request, e.g. a prompt too long for the model"},
    404: {"description": "unknown model"},
}
_STREAM = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def services_of(request: Request) -> Services:
    return request.app.state.services


def _common_suffix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def continuation_ids(
    backend: GenerationBackend, messages: Sequence[Mapping[str, str]], prefill: str
) -> list[int]:
    """Prompt ids that end inside an assistant turn, right after `prefill`.

    The template closes every turn (ChatML: "<|im_end|>\\n"); that closer is what two renders
    that differ only in the final text share at their end, and it is cut off:

        render(prefill)       = head | prefill ids       | closer
        render(prefill + "A") = head | prefill + "A" ids | closer   -> keep head | prefill ids
    """
    done = backend.apply_chat_template(
        [*messages, {"role": "assistant", "content": prefill}], add_generation_prompt=False
    )
    probe_text = prefill + ("B" if prefill.endswith("A") else "A")  # a different last character
    probe = backend.apply_chat_template(
        [*messages, {"role": "assistant", "content": probe_text}], add_generation_prompt=False
    )
    # Never cut into what both renders share from the start (the head and most of the prefill).
    closer = min(_common_suffix_len(done, probe), len(done) - _common_prefix_len(done, probe))
    return done[: len(done) - closer]


def prompt_ids(backend: GenerationBackend, chat: Chat) -> list[int]:
    """The chat as prompt token ids; a template that refuses the turns is the client's 400."""
    try:
        if chat.prefill:
            return continuation_ids(backend, chat.messages, chat.prefill)
        return backend.apply_chat_template(chat.messages)
    except TemplateError as exc:
        raise APIError(
            400, f"the model's chat template refused the messages: {exc}", param="messages"
        ) from exc


def _generation_request(body: CreateMessageRequest, ids: list[int]) -> GenerationRequest:
    try:
        return GenerationRequest(
            prompt_ids=tuple(ids),
            sampling=SamplingParams(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=body.top_k or 0,
            ),
            stop=StopParams(max_tokens=body.max_tokens, stop=tuple(body.stop_sequences or ())),
            generation_mode=body.generation_mode or "auto",
            restartable=not body.stream,  # not streamed: nothing is shown before the end
        )
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc


def _start(backend: GenerationBackend, request: GenerationRequest) -> GenerationStream:
    try:
        return start_generation(backend, request)
    except APIError as exc:
        if exc.code != "context_length_exceeded":
            raise
        # Anthropic's wording, which clients match on to trim their history.
        raise APIError(
            400, f"prompt is too long: {exc.message}", param=exc.param, code=exc.code
        ) from exc


def _message(message_id: str, model: str, text: str, last: GenerationChunk) -> MessageResponse:
    stop_reason, stop_sequence = stop_reason_of(last)
    return MessageResponse(
        id=message_id,
        model=model,
        content=[TextContent(text=text)],
        stop_reason=stop_reason,
        stop_sequence=stop_sequence,
        usage=message_usage(last.usage),
    )


@router.post("/v1/messages", response_model=MessageResponse, responses={**_STREAM, **_ERRORS})
async def create_message(body: CreateMessageRequest, request: Request) -> object:
    """A reply to the conversation; with `stream: true`, Anthropic's server-sent events."""
    services = services_of(request)
    backend = services.models.get(body.model)
    ids = prompt_ids(backend, to_chat(body))
    generation = _generation_request(body, ids)
    stream = _start(backend, generation)  # 4xx here, before any stream starts
    message_id = f"msg_{generation.request_id}"
    if body.stream:
        events = _events(services, backend, stream, message_id, num_prompt_tokens=len(ids))
        return sse_response(request.url.path, events, named_events=True)
    text, last = await collect(services, backend, stream)
    return _message(message_id, backend.model_name, text, last)


async def _events(
    services: Services,
    backend: GenerationBackend,
    stream: GenerationStream,
    message_id: str,
    *,
    num_prompt_tokens: int,
) -> AsyncIterator[str]:
    # Cache reads are known only once the engine has the request: message_delta carries them.
    start_usage = {
        "input_tokens": num_prompt_tokens,
        "output_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 0,
    }
    message = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": backend.model_name,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    yield sse_event("message_start", {"type": "message_start", "message": message})
    yield sse_event(
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    )
    yield sse_event("ping", {"type": "ping"})
    last: GenerationChunk | None = None
    async for chunk in follow(services, backend, stream):
        if chunk.text:
            delta = {"type": "text_delta", "text": chunk.text}
            yield sse_event(
                "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
            )
        last = chunk
    assert last is not None, "a generation stream ends with a finish chunk"
    yield sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
    stop_reason, stop_sequence = stop_reason_of(last)
    yield sse_event(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": message_usage(last.usage).model_dump(),
        },
    )
    yield sse_event("message_stop", {"type": "message_stop"})


@router.post("/v1/messages/count_tokens", response_model=CountTokensResponse, responses=_ERRORS)
async def count_tokens(body: CountTokensRequest, request: Request) -> CountTokensResponse:
    """How many prompt tokens /v1/messages would use for these model, system and messages."""
    backend = services_of(request).models.get(body.model)
    return CountTokensResponse(input_tokens=len(prompt_ids(backend, to_chat(body))))
