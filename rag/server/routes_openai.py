"""OpenAI's generation routes: POST /v1/chat/completions and POST /v1/completions.

    body -> prompt token ids -> checks (unsupported fields, context length)
         -> one engine request per choice (n per prompt; choice i gets seed + i)
         -> JSON (every choice read to its end) or SSE (all choices' chunks as they come)

Everything that can fail with a 4xx fails before the response starts: the engine requests are
submitted in the route, so a stream only starts for requests the engine took. A client that
leaves ends its requests at the engine's next step: Starlette cancels an SSE body on disconnect
(and `_GenerationSSE` covers one that never started); a JSON request watches its connection.

/v1/completions keeps the legacy API's default of 16 tokens; chat without max_tokens may fill
the rest of the context.

Ignores: tools and structured output (refused with a 400 that says so), prompt logprobs (so no
echo together with logprobs), the Responses API.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from inference.backend import (
    GenerationBackend,
    GenerationChunk,
    GenerationRequest,
    GenerationStream,
)

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from rag.server.chat_format import template_messages
from rag.server.errors import APIError
from rag.server.generation import follow, start_generation
from rag.server.openai_schemas import (
    MAX_CHOICES,
    ChatCompletionRequest,
    ChoiceState,
    CompletionRequest,
    GenerationFields,
    ResponseMeta,
    TokenTexts,
    chat_logprobs,
    legacy_logprobs,
    usage_body,
)
from rag.server.rag_chat import rag_chat_completion, rag_requested
from rag.server.services import Services
from rag.server.sse import sse_data, sse_response

router = APIRouter()

LEGACY_DEFAULT_MAX_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI and vLLM do
CLIENT_CLOSED = 499  # nginx's status for a client that left before its response


# -- the engine requests behind one API request -------------------------------------------------


@dataclass
class _Job:
    """Choice i is streams[i]; choices i*n .. i*n+n-1 share prompt i."""

    backend: GenerationBackend
    streams: list[GenerationStream]
    num_per_prompt: int
    with_logprobs: bool

    def cancel(self) -> None:
        """End every unfinished request (a no-op for finished ones)."""
        for stream in self.streams:
            stream.cancel()


def _submit(
    backend: GenerationBackend,
    prompts: Sequence[Sequence[int]],
    body: GenerationFields,
    max_tokens: int | None,
    num_top_logprobs: int | None,
) -> _Job:
    streams: list[GenerationStream] = []
    try:
        for prompt_ids in prompts:
            for choice in range(body.num_choices):
                try:
                    request = GenerationRequest(
                        tuple(prompt_ids),
                        sampling=body.sampling(choice, num_top_logprobs=num_top_logprobs),
                        stop=body.stop_params(max_tokens),
                        ignore_eos=bool(body.ignore_eos),
                        generation_mode=body.generation_mode or "auto",
                        # Not streamed: nothing is shown before the end, so it may start over.
                        restartable=not body.stream,
                    )
                except ValueError as exc:
                    raise APIError(400, str(exc)) from exc
                streams.append(start_generation(backend, request))
    except BaseException:
        for stream in streams:  # the choices already submitted must not run on
            stream.cancel()
        raise
    return _Job(backend, streams, body.num_choices, num_top_logprobs is not None)


def _check_context(
    backend: GenerationBackend, num_prompt: int, max_tokens: int | None, param: str
) -> None:
    """OpenAI's context_length_exceeded, before anything is submitted."""
    limit = backend.max_model_len
    if max_tokens is None and num_prompt < limit:
        return
    if max_tokens is not None and num_prompt + max_tokens <= limit:
        return
    if max_tokens is None:
        message = (
            f"This model's maximum context length is {limit} tokens. However, your {param} "
            f"resulted in {num_prompt} tokens, which leaves no room for the completion. "
            f"Please reduce the length of the {param}."
        )
    else:
        message = (
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{num_prompt + max_tokens} tokens ({num_prompt} in the {param}, {max_tokens} in the "
            f"completion). Please reduce the length of the {param} or completion."
        )
    raise APIError(400, message, param=param, code="context_length_exceeded")


def _unsupported(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


# -- reading the chunks ---------------------------------------------------------------------------


async def _chunks(services: Services, job: _Job) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """(choice index, chunk) of every choice, in arrival order; cancels all on an early exit."""
    try:
        if len(job.streams) == 1:
            async for chunk in follow(services, job.backend, job.streams[0]):
                yield 0, chunk
            return
        queue: asyncio.Queue[tuple[int, GenerationChunk | Exception]] = asyncio.Queue()

        async def pump(index: int, stream: GenerationStream) -> None:
            try:
                async for chunk in follow(services, job.backend, stream):
                    queue.put_nowait((index, chunk))
            except Exception as exc:  # handed to the reader, which raises it
                queue.put_nowait((index, exc))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(job.streams)]
        try:
            num_finished = 0
            while num_finished < len(tasks):
                index, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                num_finished += item.finish_reason is not None
                yield index, item
        finally:
            for task in tasks:
                task.cancel()
    finally:
        job.cancel()  # a pump cancelled before it started never reached follow's own cancel


async def _collect(
    services: Services, job: _Job, states: list[ChoiceState], request: Request
) -> bool:
    """Read every choice to its end into states; False if the client hung up first."""

    async def read(index: int, stream: GenerationStream) -> None:
        async for chunk in follow(services, job.backend, stream):
            states[index].add(chunk)

    work = asyncio.gather(*(read(i, s) for i, s in enumerate(job.streams)))
    try:
        return await _unless_disconnected(request, work)
    finally:
        job.cancel()


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> bool:
    """Await work; True when it finished, False when the client left first (work is cancelled)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    finished = False
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        finished = task.done()
    finally:
        watcher.cancel()
        if not finished:
            task.cancel()
            task.add_done_callback(_consume)
    if finished:
        task.result()  # raises the work's error, if any
    return finished


def _consume(future: asyncio.Future[Any]) -> None:
    # Nobody awaits cancelled work; reading its outcome keeps asyncio from logging it.
    if not future.cancelled():
        future.exception()


async def _disconnect(request: Request) -> None:
    # The body is read already, so the next message the server gives is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _GenerationSSE(StreamingResponse):
    """sse_response's stream whose engine requests end with the response, however it ends.

    A client that leaves before the first event never starts the body iterator, so no `finally`
    inside it runs; this one does.
    """

    def __init__(self, sse: StreamingResponse, job: _Job) -> None:
        super().__init__(sse.body_iterator, status_code=sse.status_code, media_type=sse.media_type)
        self.raw_headers = sse.raw_headers
        self._job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._job.cancel()


# -- text <-> token ids, which GenerationBackend does not offer yet ---------------------------------


def _decoder(backend: GenerationBackend) -> Callable[[list[int]], str]:
    return backend.decode


def _encode(backend: GenerationBackend, text: str) -> list[int]:
    return list(backend.encode(text))


# -- POST /v1/chat/completions ---------------------------------------------------------------------


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    services: Services = request.app.state.services
    _refuse_unsupported_chat(body)
    if rag_requested(body):  # answer from the indexed documents, with citations
        return await rag_chat_completion(body, request, services)
    backend = services.models.get(body.model)
    messages = template_messages(body.messages)
    try:
        # Inline on the loop: a template plus a fast tokenizer take milliseconds even for long
        # prompts, and only this thread ever encodes.
        prompt_ids = backend.apply_chat_template(messages)
    except Exception as exc:  # the template is the model's code; it failed on these messages
        raise APIError(
            400, f"the model's chat template rejected the messages: {exc}", param="messages"
        ) from exc
    max_tokens = body.completion_limit
    _check_context(backend, len(prompt_ids), max_tokens, "messages")
    job = _submit(backend, [prompt_ids], body, max_tokens, body.num_top_logprobs)
    meta = ResponseMeta.make("chatcmpl", backend.model_name)
    texts = TokenTexts(_decoder(backend)) if job.with_logprobs else None
    if body.stream:
        events = _chat_events(services, job, meta, texts, body.include_usage)
        return _GenerationSSE(sse_response(request.url.path, events), job)

    states = [ChoiceState() for _ in job.streams]
    if not await _collect(services, job, states, request):
        return Response(status_code=CLIENT_CLOSED)
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": s.text},
            "logprobs": chat_logprobs(texts, s.pending) if texts else None,
            "finish_reason": s.finish_reason,
        }
        for i, s in enumerate(states)
    ]
    return JSONResponse(
        {
            **meta.head("chat.completion"),
            "choices": choices,
            "usage": usage_body(states, job.num_per_prompt),
        }
    )


def _refuse_unsupported_chat(body: ChatCompletionRequest) -> None:
    for param in ("tools", "functions"):
        if getattr(body, param):
            raise _unsupported(
                param,
                f"tool calling is not supported by this server yet; send the request without "
                f"'{param}'",
            )
    kind = body.response_format.type if body.response_format else "text"
    if kind != "text":
        raise _unsupported(
            "response_format",
            f"response_format type {kind!r} is not supported: this server does not constrain "
            "output to JSON; use {'type': 'text'} or leave response_format out",
        )
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")


async def _chat_events(
    services: Services,
    job: _Job,
    meta: ResponseMeta,
    texts: TokenTexts | None,
    include_usage: bool,
) -> AsyncIterator[str]:
    head = meta.head("chat.completion.chunk")
    if include_usage:
        head["usage"] = None  # every chunk has the key; the last one has the numbers

    def event(index: int, delta: dict, state: ChoiceState | None, finish: str | None) -> str:
        logprobs = chat_logprobs(texts, state.take_logprobs()) if texts and state else None
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse_data({**head, "choices": [choice]})

    states = [ChoiceState() for _ in job.streams]
    for index in range(len(states)):
        yield event(index, {"role": "assistant", "content": ""}, None, None)
    async for index, chunk in _chunks(services, job):
        state = states[index]
        state.add(chunk)
        if chunk.text:
            yield event(index, {"content": chunk.text}, state, None)
        if chunk.finish_reason is not None:  # in a chunk of its own, as OpenAI sends it
            yield event(index, {}, state, state.finish_reason)
    if include_usage:
        yield sse_data({**head, "choices": [], "usage": usage_body(states, job.num_per_prompt)})
    yield sse_data("[DONE]")


# -- POST /v1/completions ------------------------------------------------------------------------


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    services: Services = request.app.state.services
    backend = services.models.get(body.model)
    if body.suffix:
        raise _unsupported("suffix", "suffix (insert mode) is not supported by this server")
    if body.echo and body.logprobs is not None:
        raise _unsupported(
            "echo",
            "echo with logprobs needs the prompt's logprobs, which this server does not compute; "
            "ask for echo or logprobs, not both",
        )
    prompts = body.prompts()
    if len(prompts) * body.num_choices > MAX_CHOICES:
        raise APIError(
            400,
            f"{len(prompts)} prompts x n={body.num_choices} is more than {MAX_CHOICES} choices",
            param="prompt",
        )
    prompt_ids = [_encode(backend, p) if isinstance(p, str) else list(p) for p in prompts]
    max_tokens = LEGACY_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise APIError(400, f"prompt {i} has no tokens", param="prompt")
        _check_context(backend, len(ids), max_tokens, "prompt")
    echoes = [""] * len(prompts)
    if body.echo:
        decode = _decoder(backend)
        echoes = [p if isinstance(p, str) else decode(list(p)) for p in prompts]
    job = _submit(backend, prompt_ids, body, max_tokens, body.logprobs)
    meta = ResponseMeta.make("cmpl", backend.model_name)
    texts = TokenTexts(_decoder(backend)) if job.with_logprobs else None
    # Choice i continues prompt i // n; its text (and text_offset) starts with the echo.
    choice_echoes = [echoes[i // job.num_per_prompt] for i in range(len(job.streams))]
    states = [ChoiceState(num_chars=len(e)) for e in choice_echoes]
    if body.stream:
        events = _completion_events(services, job, meta, texts, states, choice_echoes, body)
        return _GenerationSSE(sse_response(request.url.path, events), job)

    if not await _collect(services, job, states, request):
        return Response(status_code=CLIENT_CLOSED)
    choices = [
        {
            "index": i,
            "text": choice_echoes[i] + s.text,
            "logprobs": legacy_logprobs(texts, s.pending) if texts else None,
            "finish_reason": s.finish_reason,
        }
        for i, s in enumerate(states)
    ]
    return JSONResponse(
        {
            **meta.head("text_completion"),
            "choices": choices,
            "usage": usage_body(states, job.num_per_prompt),
        }
    )


async def _completion_events(
    services: Services,
    job: _Job,
    meta: ResponseMeta,
    texts: TokenTexts | None,
    states: list[ChoiceState],
    echoes: list[str],
    body: CompletionRequest,
) -> AsyncIterator[str]:
    head = meta.head("text_completion")
    if body.include_usage:
        head["usage"] = None

    def event(index: int, text: str, state: ChoiceState | None, finish: str | None) -> str:
        logprobs = legacy_logprobs(texts, state.take_logprobs()) if texts and state else None
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return sse_data({**head, "choices": [choice]})

    for index, echo in enumerate(echoes):
        if echo:
            yield event(index, echo, None, None)
    async for index, chunk in _chunks(services, job):
        state = states[index]
        state.add(chunk)
        if chunk.text:
            yield event(index, chunk.text, state, None)
        if chunk.finish_reason is not None:
            yield event(index, "", state, state.finish_reason)
    if body.include_usage:
        yield sse_data({**head, "choices": [], "usage": usage_body(states, job.num_per_prompt)})
    yield sse_data("[DONE]")
