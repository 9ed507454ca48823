"""The answer pipeline: sources first, streamed text, timings, and no invention on no match."""

from __future__ import annotations

from collections.abc import Iterator

from inference.backend import GenerationChunk, GenerationRequest, Usage

import pytest

from ingest.records import SearchHit
from rag.answer import (
    NOT_FOUND_ANSWER,
    AnswerConfig,
    AnswerDone,
    AnswerText,
    RagPipeline,
    Sources,
)
from rag.retrieval import RetrievalConfig, RetrievedChunk


def found(chunk_id: int, similarity: float | None, path: str = "docs/a.md") -> RetrievedChunk:
    hit = SearchHit(chunk_id, 0.0, path, "A", ("Intro", "Hours"), 3, 0, 10, f"passage {chunk_id}")
    scores = {} if similarity is None else {"vector": similarity}
    return RetrievedChunk(hit, 0.1, {}, scores)


class FakeRetriever:
    def __init__(self, chunks: list[RetrievedChunk], mode: str = "hybrid") -> None:
        self.chunks = chunks
        self.config = RetrievalConfig(mode=mode)  # type: ignore[arg-type]

    def retrieve(self, question: str, *, sources=None, top_k=None):  # type: ignore[no-untyped-def]
        return self.chunks


class FakeStream:
    def __init__(self, request: GenerationRequest, pieces: list[str]) -> None:
        self.request_id = request.request_id
        self.pieces = pieces
        self.cancelled = False

    def __iter__(self) -> Iterator[GenerationChunk]:
        for n, piece in enumerate(self.pieces, 1):
            last = n == len(self.pieces)
            usage = Usage(len(self.pieces), 0, n)
            yield GenerationChunk(self.request_id, piece, (n,), usage, "stop" if last else None)

    def cancel(self) -> None:
        self.cancelled = True


class FakeBackend:
    model_name = "fake"
    max_model_len = 4096

    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []
        self.messages: list[list[dict[str, str]]] = []
        self.streams: list[FakeStream] = []

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def apply_chat_template(self, messages, *, add_generation_prompt=True):  # type: ignore[no-untyped-def]
        self.messages.append(list(messages))
        return [1, 2, 3]

    def submit(self, request: GenerationRequest) -> FakeStream:
        self.requests.append(request)
        self.streams.append(FakeStream(request, ["Fridays ", "[1]."]))
        return self.streams[-1]


def test_streams_sources_then_text_then_done() -> None:
    backend = FakeBackend()
    pipeline = RagPipeline(FakeRetriever([found(1, 0.8), found(2, 0.5)]), backend, AnswerConfig())
    events = list(pipeline.ask("When?"))
    assert isinstance(events[0], Sources)
    assert [c.number for c in events[0].citations] == [1, 2]
    assert events[0].citations[0].heading == "Intro > Hours" and events[0].citations[0].page == 3
    assert [e.text for e in events if isinstance(e, AnswerText)] == ["Fridays ", "[1]."]
    done = events[-1]
    assert isinstance(done, AnswerDone)
    assert done.answer == "Fridays [1]." and done.finish_reason == "stop"
    assert done.timings.num_completion_tokens == 2 and done.timings.prefill_s >= 0
    assert backend.requests[0].sampling.temperature == 0.0
    assert backend.requests[0].stop.max_tokens == AnswerConfig().max_answer_tokens
    assert "passage 1" in backend.messages[0][1]["content"]
    assert backend.streams[0].cancelled  # the slot is released even after a normal finish


@pytest.mark.parametrize("chunks", [[], [found(1, 0.05), found(2, None)]])
def test_nothing_relevant_says_so_without_generating(chunks: list[RetrievedChunk]) -> None:
    backend = FakeBackend()
    pipeline = RagPipeline(FakeRetriever(chunks), backend, AnswerConfig(min_similarity=0.15))
    events = list(pipeline.ask("What is the capital of Peru?"))
    assert events[0] == Sources([])
    assert events[-1].answer == NOT_FOUND_ANSWER and events[-1].finish_reason == "not_found"
    assert backend.requests == []


def test_keyword_mode_has_no_similarity_gate() -> None:
    backend = FakeBackend()
    retriever = FakeRetriever([found(1, None)], mode="keyword")
    events = list(RagPipeline(retriever, backend, AnswerConfig()).ask("When?"))
    assert events[-1].finish_reason == "stop" and len(backend.requests) == 1


def test_empty_question_is_refused() -> None:
    pipeline = RagPipeline(FakeRetriever([]), FakeBackend(), AnswerConfig())
    with pytest.raises(ValueError):
        list(pipeline.ask("   "))
