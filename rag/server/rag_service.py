"""Answer a question over the index inside the server: retrieval on the encoder thread, generation
on the engine, events out as `rag.answer` defines them.

    async for event in answer_events(services, RagQuery("When is it open?")):
        Sources, then AnswerText deltas, then AnswerDone

The first event comes only after retrieval ran and the engine accepted the request, so a caller
that awaits it before it starts its response (the RAG route does) still turns a failure into a
4xx. Closing the iterator early cancels the generation. The `/v1/rag/query` route and, later,
RAG through `/v1/chat/completions` both call `answer_events`. Ignores: HTTP shapes (routes_rag.py).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import asdict, dataclass, replace

from inference.backend import GenerationBackend

from ingest.errors import StoreError
from rag.answer import (
    AnswerConfig,
    AnswerDone,
    AnswerError,
    AnswerEvent,
    AnswerTracker,
    Citation,
    PreparedAnswer,
    RagPipeline,
    Sources,
    StageTimings,
    not_found_events,
)
from rag.retrieval import RetrievalConfig, RetrievalMode, Retriever
from rag.server.errors import APIError
from rag.server.generation import follow, start_generation
from rag.server.library import query_store
from rag.server.services import Services

MAX_TOP_K = 50  # passages per prompt; more would not fit a small model's context anyway
_ANSWER_DEFAULTS = AnswerConfig()
_RETRIEVAL_DEFAULTS = RetrievalConfig()


@dataclass(frozen=True)
class RagQuery:
    """One question and how to answer it; None means the server's default."""

    question: str
    top_k: int = _RETRIEVAL_DEFAULTS.top_k
    sources: tuple[str, ...] = ()  # path prefixes (a file or a folder) the passages must be under
    mode: RetrievalMode = _RETRIEVAL_DEFAULTS.mode
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    rerank: bool = False
    min_similarity: float | None = None
    # True for a non-streamed answer: its generation may start over on another upstream.
    restartable: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))
        if not self.question.strip():
            raise ValueError("question must not be empty")
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be between 1 and {MAX_TOP_K}, got {self.top_k}")

    def answer_config(self) -> AnswerConfig:
        d = _ANSWER_DEFAULTS
        return AnswerConfig(
            max_answer_tokens=d.max_answer_tokens if self.max_tokens is None else self.max_tokens,
            temperature=d.temperature if self.temperature is None else self.temperature,
            seed=d.seed,
            min_similarity=d.min_similarity if self.min_similarity is None else self.min_similarity,
        )

    def retrieval_config(self) -> RetrievalConfig:
        num_candidates = max(_RETRIEVAL_DEFAULTS.num_candidates, self.top_k)
        return RetrievalConfig(top_k=self.top_k, num_candidates=num_candidates, mode=self.mode)


def _prepare(services: Services, backend: GenerationBackend, query: RagQuery) -> PreparedAnswer:
    """Retrieval, rerank and the prompt; runs on the encoder thread (embedder, store, reranker)."""
    embedder = services.require_embedder()
    if query.rerank and services.reranker is None:
        raise APIError(400, "rerank is true, but this server has no reranker", param="rerank")
    try:
        answer_config = query.answer_config()
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc
    if answer_config.max_answer_tokens >= backend.max_model_len:
        raise APIError(
            400,
            f"max_tokens must be below the model's context of {backend.max_model_len} tokens",
            param="max_tokens",
        )
    try:
        store = query_store(services)
        retriever = Retriever(store, embedder, query.retrieval_config())
        pipeline = RagPipeline(retriever, backend, answer_config, services.reranker)
        return pipeline.prepare(query.question, sources=query.sources or None, rerank=query.rerank)
    except AnswerError as exc:
        raise APIError(400, str(exc)) from exc
    except StoreError as exc:
        raise APIError(500, f"the index cannot be read: {exc}", code="index_error") from exc


async def answer_events(services: Services, query: RagQuery) -> AsyncGenerator[AnswerEvent, None]:
    """Sources, answer text, done; raises APIError (4xx/5xx) before the first event."""
    backend = services.models.get(query.model)
    prepared = await services.encoder.run(_prepare, services, backend, query)
    if prepared.request is None:
        for event in not_found_events(prepared):
            yield event
        return
    tracker = AnswerTracker(prepared)
    request = replace(prepared.request, restartable=query.restartable)
    stream = start_generation(backend, request)
    try:
        yield Sources(prepared.citations)
        async for chunk in follow(services, backend, stream):
            text = tracker.add(chunk)
            if text is not None:
                yield text
        yield tracker.done()
    finally:
        stream.cancel()  # a no-op once finished; frees the slot if the caller left after Sources


async def collect_answer(
    first: AnswerEvent, events: AsyncGenerator[AnswerEvent, None]
) -> tuple[list[dict], AnswerDone]:
    """A non-streaming answer: the citations (JSON) and the final event; closes `events`."""
    citations: list[dict] = []
    done: AnswerDone | None = None
    try:
        event: AnswerEvent | None = first
        while event is not None:
            if isinstance(event, Sources):
                citations = [citation_json(c) for c in event.citations]
            elif isinstance(event, AnswerDone):
                done = event
            event = await anext(events, None)
    finally:
        await events.aclose()
    assert done is not None, "an answer ends with AnswerDone"
    return citations, done


def citation_json(citation: Citation) -> dict:
    return asdict(citation)


def timings_json(timings: StageTimings) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(timings).items()}
