"""Question in, grounded and cited answer out: retrieve, [rerank], assemble the prompt, generate.

The pipeline yields events, so the CLI, the HTTP route and the web page all stream the same way:
`Sources` (the numbered passages the answer may cite) first, then `AnswerText` deltas, then
`AnswerDone` with the finish reason and the time each stage took. When retrieval finds nothing
similar enough to the question, the model is not asked at all: inventing an answer is worse
than saying the documents do not cover it.

The stages are separate so a synchronous caller (`rag ask`) and an async one (the server, which
runs retrieval on its encoder thread and follows generation on the event loop) share them:

    prepared = pipeline.prepare(question)      retrieve -> relevance gate -> [rerank] -> prompt
    tracker = AnswerTracker(prepared)          per generated chunk: tracker.add(chunk)
    tracker.done()                             -> AnswerDone with StageTimings

Knows nothing about HTTP or terminals.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from inference.backend import GenerationBackend, GenerationChunk, GenerationRequest, Usage
from inference.sampling import SamplingParams
from inference.stopping import StopParams

from rag.prompt import Passage, assemble_prompt
from rag.reranking import Reranker
from rag.retrieval import RetrievalConfig, RetrievedChunk

NOT_FOUND_ANSWER = "I could not find anything about that in the indexed documents."
_SNIPPET_CHARS = 240


class AnswerError(ValueError):
    """The question cannot be answered as asked (empty, or no room left for any source)."""


@dataclass(frozen=True)
class AnswerConfig:
    max_answer_tokens: int = 384
    temperature: float = 0.0  # grounded answers: greedy by default, reproducible
    seed: int | None = 0
    # Below this cosine similarity (question vs best chunk) the documents are taken not to cover
    # the question. all-MiniLM-L6-v2 on examples/docs: on-topic questions scored 0.21-0.82,
    # off-topic ones (capital of Peru, sourdough, QCD, stock prices) 0.06-0.10.
    min_similarity: float = 0.15

    def __post_init__(self) -> None:
        if self.max_answer_tokens < 1:
            raise ValueError("max_answer_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not -1.0 <= self.min_similarity <= 1.0:
            raise ValueError("min_similarity is a cosine similarity in [-1, 1]")


@dataclass(frozen=True)
class Citation:
    number: int  # the [n] the answer uses
    chunk_id: int
    source: str
    title: str | None
    page: int | None
    heading: str | None
    snippet: str
    text: str


@dataclass(frozen=True)
class Sources:
    citations: list[Citation]


@dataclass(frozen=True)
class AnswerText:
    text: str


@dataclass(frozen=True)
class StageTimings:
    retrieve_s: float
    rerank_s: float  # 0 when no reranker ran
    prefill_s: float  # submit to first token (time to first token of the answer)
    decode_s: float  # first token to the last
    num_prompt_tokens: int
    num_cached_tokens: int
    num_completion_tokens: int


@dataclass(frozen=True)
class AnswerDone:
    answer: str
    finish_reason: str  # "stop", "length", "cancelled" or "not_found"
    timings: StageTimings


AnswerEvent = Sources | AnswerText | AnswerDone


@dataclass(frozen=True)
class PreparedAnswer:
    """Everything before generation; `request` is None when nothing relevant was found."""

    citations: list[Citation]
    request: GenerationRequest | None
    retrieve_s: float
    rerank_s: float = 0.0


class ChunkRetriever(Protocol):
    """What the pipeline needs of `rag.retrieval.Retriever`."""

    @property
    def config(self) -> RetrievalConfig: ...

    def retrieve(
        self, question: str, *, sources: Sequence[str] | None = None, top_k: int | None = None
    ) -> list[RetrievedChunk]: ...


def _passage(rank: int, found: RetrievedChunk) -> Passage:
    hit = found.hit
    heading = " > ".join(hit.heading_path) if hit.heading_path else None
    return Passage(hit.chunk_id, hit.text, hit.path, hit.title, hit.page, heading, rank)


def _citation(number: int, passage: Passage) -> Citation:
    text = passage.text.strip()
    snippet = (
        text if len(text) <= _SNIPPET_CHARS else text[:_SNIPPET_CHARS].rsplit(" ", 1)[0] + " ..."
    )
    return Citation(
        number,
        passage.chunk_id,
        passage.source,
        passage.title,
        passage.page,
        passage.heading,
        snippet,
        text,
    )


def relevant(
    found: list[RetrievedChunk], *, mode: str, min_similarity: float
) -> list[RetrievedChunk]:
    """`found`, or nothing when no chunk is similar enough (keyword mode has no similarity)."""
    similarities = [c.similarity for c in found if c.similarity is not None]
    if mode != "keyword" and (not similarities or max(similarities) < min_similarity):
        return []
    return found


def rerank_chunks(
    reranker: Reranker, question: str, found: list[RetrievedChunk], top_k: int
) -> list[RetrievedChunk]:
    """The `top_k` of `found` the reranker scores highest; ties keep the fused order."""
    if not found:
        return []
    scores = reranker.score(question, [c.hit.text for c in found]).scores
    if len(scores) != len(found):
        raise RuntimeError(f"reranker {reranker.name} gave {len(scores)} scores for {len(found)}")
    order = sorted(range(len(found)), key=lambda i: (-scores[i], i))
    return [found[i] for i in order[:top_k]]


def not_found_events(prepared: PreparedAnswer) -> list[AnswerEvent]:
    timings = StageTimings(prepared.retrieve_s, prepared.rerank_s, 0.0, 0.0, 0, 0, 0)
    return [
        Sources([]),
        AnswerText(NOT_FOUND_ANSWER),
        AnswerDone(NOT_FOUND_ANSWER, "not_found", timings),
    ]


class AnswerTracker:
    """Follows one generation: turns chunks into `AnswerText` and times prefill and decode."""

    def __init__(self, prepared: PreparedAnswer) -> None:
        assert prepared.request is not None, "nothing to generate for a not-found answer"
        self._prepared = prepared
        self._request = prepared.request
        self._submitted = time.perf_counter()  # create the tracker right before submitting
        self._first_token_at: float | None = None
        self._parts: list[str] = []
        self._usage: Usage | None = None
        self.finish_reason = "cancelled"  # until a finish chunk says otherwise

    def add(self, chunk: GenerationChunk) -> AnswerText | None:
        if self._first_token_at is None and chunk.token_ids:
            self._first_token_at = time.perf_counter()
        self._usage = chunk.usage
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        if not chunk.text:
            return None
        self._parts.append(chunk.text)
        return AnswerText(chunk.text)

    def done(self) -> AnswerDone:
        now = time.perf_counter()
        first = self._first_token_at or now
        usage = self._usage
        timings = StageTimings(
            self._prepared.retrieve_s,
            self._prepared.rerank_s,
            first - self._submitted,
            now - first,
            usage.prompt_tokens if usage else len(self._request.prompt_ids),
            usage.cached_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
        )
        return AnswerDone("".join(self._parts), self.finish_reason, timings)


class RagPipeline:
    """Retrieval, an optional reranker and a generation backend; `ask` streams one answer."""

    def __init__(
        self,
        retriever: ChunkRetriever,
        backend: GenerationBackend,
        config: AnswerConfig,
        reranker: Reranker | None = None,
    ):
        self._retriever = retriever
        self._backend = backend
        self._reranker = reranker
        self.config = config

    def prepare(
        self, question: str, *, sources: Sequence[str] | None = None, rerank: bool = False
    ) -> PreparedAnswer:
        """Retrieve, gate on similarity, rerank if asked, and build the generation request."""
        if not question.strip():
            raise AnswerError("the question is empty")
        if rerank and self._reranker is None:
            raise AnswerError("rerank was asked for, but no reranker is loaded")
        retrieval = self._retriever.config
        # 1. Retrieve: the final top_k, or every fused candidate when a reranker picks from them.
        start = time.perf_counter()
        wanted = retrieval.num_candidates if rerank else retrieval.top_k
        found = self._retriever.retrieve(question, sources=sources, top_k=wanted)
        found = relevant(found, mode=retrieval.mode, min_similarity=self.config.min_similarity)
        retrieve_s = time.perf_counter() - start
        # 2. Rerank: cross-encoder scores decide which candidates reach the prompt.
        rerank_s = 0.0
        if rerank and found:
            assert self._reranker is not None
            start = time.perf_counter()
            found = rerank_chunks(self._reranker, question, found, retrieval.top_k)
            rerank_s = time.perf_counter() - start
        if not found:
            return PreparedAnswer([], None, retrieve_s, rerank_s)
        # 3. Assemble the prompt within the context left after the answer's tokens.
        budget = self._backend.max_model_len - self.config.max_answer_tokens
        prompt = assemble_prompt(
            question,
            [_passage(rank, c) for rank, c in enumerate(found)],
            count_tokens=self._backend.count_tokens,
            max_prompt_tokens=budget,
        )
        if not prompt.passages:
            raise AnswerError(
                f"no source fits: {self._backend.model_name} holds "
                f"{self._backend.max_model_len} tokens and the answer may take "
                f"{self.config.max_answer_tokens}; ask for fewer max tokens"
            )
        citations = [_citation(n, p) for n, p in enumerate(prompt.passages, 1)]
        request = GenerationRequest(
            self._backend.apply_chat_template(prompt.messages),
            SamplingParams(temperature=self.config.temperature, seed=self.config.seed),
            StopParams(max_tokens=self.config.max_answer_tokens),
        )
        return PreparedAnswer(citations, request, retrieve_s, rerank_s)

    def ask(
        self, question: str, *, sources: Sequence[str] | None = None, rerank: bool = False
    ) -> Iterator[AnswerEvent]:
        prepared = self.prepare(question, sources=sources, rerank=rerank)
        if prepared.request is None:
            yield from not_found_events(prepared)
            return
        yield Sources(prepared.citations)
        tracker = AnswerTracker(prepared)
        stream = self._backend.submit(prepared.request)
        try:
            for chunk in stream:
                text = tracker.add(chunk)
                if text is not None:
                    yield text
        finally:
            stream.cancel()  # a consumer that stopped early frees its batch slot
        yield tracker.done()
