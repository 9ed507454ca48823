"""Question in, grounded and cited answer out: retrieve, assemble the prompt, stream the answer.

The pipeline yields events, so the CLI, the HTTP route and the web page all stream the same way:
`Sources` (the numbered passages the answer may cite) first, then `AnswerText` deltas, then
`AnswerDone` with the finish reason and the time each stage took. When retrieval finds nothing
similar enough to the question, the model is not asked at all: inventing an answer is worse
than saying the documents do not cover it. Knows nothing about HTTP or terminals.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from inference.backend import GenerationBackend, GenerationRequest
from inference.sampling import SamplingParams
from inference.stopping import StopParams

from rag.prompt import Passage, assemble_prompt
from rag.retrieval import RetrievedChunk, Retriever

NOT_FOUND_ANSWER = "I could not find anything about that in the indexed documents."
_SNIPPET_CHARS = 240


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


class RagPipeline:
    """Retrieval plus a generation backend; `ask` streams one answer."""

    def __init__(self, retriever: Retriever, backend: GenerationBackend, config: AnswerConfig):
        self._retriever = retriever
        self._backend = backend
        self.config = config

    def _relevant(self, found: list[RetrievedChunk]) -> list[RetrievedChunk]:
        similarities = [c.similarity for c in found if c.similarity is not None]
        if self._retriever.config.mode != "keyword" and (
            not similarities or max(similarities) < self.config.min_similarity
        ):
            return []
        return found

    def ask(self, question: str, *, sources: Sequence[str] | None = None) -> Iterator[AnswerEvent]:
        if not question.strip():
            raise ValueError("the question is empty")
        start = time.perf_counter()
        found = self._relevant(self._retriever.retrieve(question, sources=sources))
        retrieve_s = time.perf_counter() - start
        if not found:
            yield Sources([])
            yield AnswerText(NOT_FOUND_ANSWER)
            yield AnswerDone(NOT_FOUND_ANSWER, "not_found", StageTimings(retrieve_s, 0, 0, 0, 0, 0))
            return
        budget = self._backend.max_model_len - self.config.max_answer_tokens
        prompt = assemble_prompt(
            question,
            [_passage(rank, c) for rank, c in enumerate(found)],
            count_tokens=self._backend.count_tokens,
            max_prompt_tokens=budget,
        )
        yield Sources([_citation(n, p) for n, p in enumerate(prompt.passages, 1)])
        request = GenerationRequest(
            self._backend.apply_chat_template(prompt.messages),
            SamplingParams(temperature=self.config.temperature, seed=self.config.seed),
            StopParams(max_tokens=self.config.max_answer_tokens),
        )
        yield from self._generate(request, retrieve_s)

    def _generate(self, request: GenerationRequest, retrieve_s: float) -> Iterator[AnswerEvent]:
        submitted = time.perf_counter()
        first_token_at: float | None = None
        parts: list[str] = []
        finish_reason, usage = "stop", None
        stream = self._backend.submit(request)
        try:
            for chunk in stream:
                if first_token_at is None and chunk.token_ids:
                    first_token_at = time.perf_counter()
                usage = chunk.usage
                if chunk.text:
                    parts.append(chunk.text)
                    yield AnswerText(chunk.text)
                if chunk.finish_reason is not None:
                    finish_reason = chunk.finish_reason
        finally:
            stream.cancel()  # a consumer that stopped early frees its batch slot
        done = time.perf_counter()
        first = first_token_at or done
        timings = StageTimings(
            retrieve_s,
            first - submitted,
            done - first,
            usage.prompt_tokens if usage else len(request.prompt_ids),
            usage.cached_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
        )
        yield AnswerDone("".join(parts), finish_reason, timings)
