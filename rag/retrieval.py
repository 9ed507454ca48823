"""Hybrid retrieval over the ingest store: vector KNN and BM25, fused by reciprocal rank.

Each retriever returns its own top candidates; reciprocal rank fusion (RRF) adds
`weight / (rrf_k + rank)` per list, so neither score scale has to be calibrated against the
other. Chunks that overlap an already-kept chunk of the same document (ingest overlaps
neighbours) are dropped as duplicates. This module ignores prompts and generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from ingest.protocols import IndexStore, TextEmbedder
from ingest.records import SearchHit

RetrievalMode = Literal["hybrid", "vector", "keyword"]


@dataclass(frozen=True)
class RetrievalConfig:
    top_k: int = 5  # chunks handed to the prompt
    num_candidates: int = 20  # chunks each retriever contributes before fusion
    rrf_k: int = 60  # the usual RRF constant: damps the weight of the very first ranks
    vector_weight: float = 1.0
    keyword_weight: float = 1.0
    mode: RetrievalMode = "hybrid"

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.num_candidates < self.top_k:
            raise ValueError("need 1 <= top_k <= num_candidates")
        if self.rrf_k < 0 or self.vector_weight < 0 or self.keyword_weight < 0:
            raise ValueError("rrf_k and weights must be >= 0")
        if self.mode not in ("hybrid", "vector", "keyword"):
            raise ValueError(f"mode must be hybrid, vector or keyword, got {self.mode!r}")


@dataclass(frozen=True)
class RetrievedChunk:
    hit: SearchHit
    score: float  # fused score (RRF), higher is better
    ranks: dict[str, int] = field(default_factory=dict)  # 1-based rank per retriever
    scores: dict[str, float] = field(default_factory=dict)  # each retriever's own score

    @property
    def similarity(self) -> float | None:
        """Cosine similarity to the question, when the vector retriever found this chunk."""
        return self.scores.get("vector")


def reciprocal_rank_fusion(
    ranked_lists: dict[str, list[SearchHit]], weights: dict[str, float], rrf_k: int
) -> list[RetrievedChunk]:
    """Fuse ranked hit lists; ties break by chunk id so the order is deterministic."""
    scores: dict[int, float] = {}
    ranks: dict[int, dict[str, int]] = {}
    own_scores: dict[int, dict[str, float]] = {}
    hits: dict[int, SearchHit] = {}
    for name, hit_list in ranked_lists.items():
        for rank, hit in enumerate(hit_list, 1):
            scores[hit.chunk_id] = scores.get(hit.chunk_id, 0.0) + weights[name] / (rrf_k + rank)
            ranks.setdefault(hit.chunk_id, {})[name] = rank
            own_scores.setdefault(hit.chunk_id, {})[name] = hit.score
            hits.setdefault(hit.chunk_id, hit)
    order = sorted(scores, key=lambda chunk_id: (-scores[chunk_id], chunk_id))
    return [RetrievedChunk(hits[c], scores[c], ranks[c], own_scores[c]) for c in order]


def _overlaps(a: SearchHit, b: SearchHit) -> bool:
    return a.path == b.path and a.char_start < b.char_end and b.char_start < a.char_end


def drop_overlapping(chunks: list[RetrievedChunk]) -> list[RetrievedChunk]:
    kept: list[RetrievedChunk] = []
    for chunk in chunks:
        if not any(_overlaps(chunk.hit, other.hit) for other in kept):
            kept.append(chunk)
    return kept


class Retriever:
    """Question in, the best `top_k` chunks out."""

    def __init__(self, store: IndexStore, embedder: TextEmbedder, config: RetrievalConfig):
        self._store = store
        self._embedder = embedder
        self.config = config

    def retrieve(
        self, question: str, *, sources: Sequence[str] | None = None, top_k: int | None = None
    ) -> list[RetrievedChunk]:
        config = self.config
        lists: dict[str, list[SearchHit]] = {}
        if config.mode in ("hybrid", "vector"):
            vector = self._embedder.embed([question]).vectors[0]
            lists["vector"] = self._store.search_vectors(
                vector, k=config.num_candidates, sources=sources
            )
        if config.mode in ("hybrid", "keyword"):
            lists["keyword"] = self._store.search_keywords(
                question, k=config.num_candidates, sources=sources
            )
        weights = {"vector": config.vector_weight, "keyword": config.keyword_weight}
        fused = drop_overlapping(reciprocal_rank_fusion(lists, weights, config.rrf_k))
        return fused[: top_k or config.top_k]
