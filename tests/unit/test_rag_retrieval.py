"""Reciprocal rank fusion, overlap dedupe and retrieval modes on a hand-made store."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from ingest.records import SearchHit
from rag.retrieval import (
    RetrievalConfig,
    Retriever,
    drop_overlapping,
    reciprocal_rank_fusion,
)


def hit(chunk_id: int, path: str = "a.md", start: int = 0, end: int = 10) -> SearchHit:
    return SearchHit(chunk_id, 0.0, path, None, (), None, start, end, f"chunk {chunk_id}")


def test_rrf_adds_weighted_reciprocal_ranks() -> None:
    fused = reciprocal_rank_fusion(
        {"vector": [hit(1), hit(2)], "keyword": [hit(2), hit(3)]},
        {"vector": 1.0, "keyword": 1.0},
        rrf_k=60,
    )
    assert [c.hit.chunk_id for c in fused] == [2, 1, 3]
    assert fused[0].score == pytest.approx(1 / 62 + 1 / 61)
    assert fused[0].ranks == {"vector": 2, "keyword": 1}
    assert fused[1].score == pytest.approx(1 / 61)


def test_rrf_weights_and_deterministic_ties() -> None:
    lists = {"vector": [hit(5)], "keyword": [hit(4)]}
    tied = reciprocal_rank_fusion(lists, {"vector": 1.0, "keyword": 1.0}, rrf_k=60)
    assert [c.hit.chunk_id for c in tied] == [4, 5]  # equal scores: lower chunk id first
    weighted = reciprocal_rank_fusion(lists, {"vector": 2.0, "keyword": 1.0}, rrf_k=60)
    assert [c.hit.chunk_id for c in weighted] == [5, 4]


def test_overlapping_chunks_of_one_document_are_deduped() -> None:
    fused = reciprocal_rank_fusion(
        {"v": [hit(1, start=0, end=100), hit(2, start=80, end=180), hit(3, "b.md", 80, 180)]},
        {"v": 1.0},
        rrf_k=60,
    )
    assert [c.hit.chunk_id for c in drop_overlapping(fused)] == [1, 3]


@dataclass
class FakeBatch:
    vectors: np.ndarray


class FakeEmbedder:
    def embed(self, texts: list[str]) -> FakeBatch:
        return FakeBatch(np.ones((len(texts), 4), dtype=np.float32))


class FakeStore:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, Sequence[str] | None]] = []

    def search_vectors(self, query, *, k=10, sources=None):  # type: ignore[no-untyped-def]
        self.calls.append(("vector", k, sources))
        return [hit(1, start=0, end=5), hit(2, start=10, end=20)]

    def search_keywords(self, query, *, k=10, sources=None):  # type: ignore[no-untyped-def]
        self.calls.append(("keyword", k, sources))
        return [hit(3, start=30, end=40), hit(1, start=0, end=5)]


@pytest.mark.parametrize(
    ("mode", "expected_ids", "expected_calls"),
    [
        ("hybrid", [1, 3, 2], ["vector", "keyword"]),
        ("vector", [1, 2], ["vector"]),
        ("keyword", [3, 1], ["keyword"]),
    ],
)
def test_retriever_modes(mode: str, expected_ids: list[int], expected_calls: list[str]) -> None:
    store = FakeStore()
    config = RetrievalConfig(top_k=3, num_candidates=7, mode=mode)  # type: ignore[arg-type]
    retriever = Retriever(store, FakeEmbedder(), config)  # type: ignore[arg-type]
    found = retriever.retrieve("question", sources=["docs/"])
    assert [c.hit.chunk_id for c in found] == expected_ids
    assert [c[0] for c in store.calls] == expected_calls
    assert all(k == 7 and sources == ["docs/"] for _, k, sources in store.calls)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        RetrievalConfig(top_k=10, num_candidates=5)
    with pytest.raises(ValueError):
        RetrievalConfig(mode="fuzzy")  # type: ignore[arg-type]
