"""The answer pipeline's stages one by one: rerank, the prompt budget, the generation tracker."""

from __future__ import annotations

from collections.abc import Sequence

from inference.backend import GenerationChunk, GenerationRequest, Usage

import pytest

from rag.answer import (
    AnswerConfig,
    AnswerError,
    AnswerText,
    AnswerTracker,
    PreparedAnswer,
    RagPipeline,
    rerank_chunks,
)
from rag.reranking import RerankScores
from tests.unit.test_rag_answer import FakeBackend, FakeRetriever, found


class FakeReranker:
    name = "fake-reranker"
    kind = "cross-encoder"

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores
        self.calls: list[tuple[str, list[str]]] = []

    def score(self, query: str, documents: Sequence[str]) -> RerankScores:
        self.calls.append((query, list(documents)))
        return RerankScores([self.scores.get(d, 0.0) for d in documents], 10)


def test_rerank_keeps_the_best_scored_and_breaks_ties_by_fused_order() -> None:
    chunks = [found(1, 0.9), found(2, 0.8), found(3, 0.7), found(4, 0.6)]
    reranker = FakeReranker({"passage 3": 0.9, "passage 2": 0.5, "passage 4": 0.5})
    kept = rerank_chunks(reranker, "q", chunks, top_k=3)
    assert [c.hit.chunk_id for c in kept] == [3, 2, 4]
    assert reranker.calls == [("q", ["passage 1", "passage 2", "passage 3", "passage 4"])]


class RecordingRetriever(FakeRetriever):
    def __init__(self, chunks) -> None:  # type: ignore[no-untyped-def]
        super().__init__(chunks)
        self.top_ks: list[int | None] = []

    def retrieve(self, question, *, sources=None, top_k=None):  # type: ignore[no-untyped-def]
        self.top_ks.append(top_k)
        return self.chunks[: top_k or self.config.top_k]


def test_prepare_with_rerank_scores_every_candidate_and_times_it() -> None:
    chunks = [found(n, 0.5) for n in range(1, 9)]
    retriever = RecordingRetriever(chunks)
    reranker = FakeReranker({"passage 8": 1.0, "passage 7": 0.9})
    pipeline = RagPipeline(retriever, FakeBackend(), AnswerConfig(), reranker)
    prepared = pipeline.prepare("q", rerank=True)
    assert retriever.top_ks == [retriever.config.num_candidates]
    assert len(reranker.calls[0][1]) == 8
    assert {c.chunk_id for c in prepared.citations} == {8, 7, 1, 2, 3}
    assert prepared.rerank_s > 0
    plain = RagPipeline(RecordingRetriever(chunks), FakeBackend(), AnswerConfig(), reranker)
    assert plain.prepare("q").rerank_s == 0
    assert len(reranker.calls) == 1  # rerank=False: the reranker is not asked


def test_rerank_without_a_reranker_is_refused() -> None:
    pipeline = RagPipeline(FakeRetriever([found(1, 0.9)]), FakeBackend(), AnswerConfig())
    with pytest.raises(AnswerError, match="no reranker"):
        pipeline.prepare("q", rerank=True)


def test_no_room_for_any_source_is_an_error_not_an_empty_prompt() -> None:
    backend = FakeBackend()
    backend.max_model_len = 20
    pipeline = RagPipeline(
        FakeRetriever([found(1, 0.9)]), backend, AnswerConfig(max_answer_tokens=16)
    )
    with pytest.raises(AnswerError, match="no source fits"):
        pipeline.prepare("q")


def chunk(text: str, n: int, finish: str | None = None) -> GenerationChunk:
    return GenerationChunk("r", text, (n,) if text else (), Usage(7, 3, n), finish)  # type: ignore[arg-type]


def test_tracker_collects_text_usage_and_finish() -> None:
    prepared = PreparedAnswer([], GenerationRequest((1, 2)), retrieve_s=0.25, rerank_s=0.5)
    tracker = AnswerTracker(prepared)
    events = [
        tracker.add(chunk("Hel", 1)),
        tracker.add(chunk("", 1)),
        tracker.add(chunk("lo", 2, "length")),
    ]
    assert events == [AnswerText("Hel"), None, AnswerText("lo")]
    done = tracker.done()
    assert done.answer == "Hello" and done.finish_reason == "length"
    t = done.timings
    assert (t.retrieve_s, t.rerank_s) == (0.25, 0.5)
    assert (t.num_prompt_tokens, t.num_cached_tokens, t.num_completion_tokens) == (7, 3, 2)
    assert t.prefill_s >= 0 and t.decode_s >= 0


def test_tracker_of_a_stream_cut_short_says_cancelled() -> None:
    tracker = AnswerTracker(PreparedAnswer([], GenerationRequest((1, 2, 3)), 0.0))
    tracker.add(chunk("a", 1))
    done = tracker.done()
    assert done.finish_reason == "cancelled" and done.timings.num_completion_tokens == 1
