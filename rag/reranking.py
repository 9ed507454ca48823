"""What a reranker is to the rest of `rag`: query + documents in, relevance in [0, 1] out.

The HTTP `/v1/rerank` route and the RAG pipeline's rerank stage both speak this protocol, so an
MLX cross-encoder, an embedding-similarity fallback, or a remote reranker (scale-out) plug in alike.

Two implementations live here, above `inference`:
    CrossEncoderReranker         an `inference.reranker.CrossEncoder`: kind "cross-encoder"
    EmbeddingSimilarityReranker  cosine of query and document vectors from any TextEmbedder,
                                 mapped to [0, 1] as (cos + 1) / 2: kind "embedding-similarity"
Both are synchronous and do their model work on the calling thread (the server calls them on its
encoder thread). Ignores: how results are sorted, cut to top_n or shown (the callers do that).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from ingest.protocols import TextEmbedder

CROSS_ENCODER = "cross-encoder"
EMBEDDING_SIMILARITY = "embedding-similarity"


@dataclass(frozen=True)
class RerankScores:
    scores: list[float]  # one per document, in input order; relevance in [0, 1]
    num_tokens: int  # tokens the model read (for usage)
    # The model's own number before it was mapped to [0, 1] (a logit, or a cosine); None: same.
    raw_scores: list[float] | None = None


@runtime_checkable
class Reranker(Protocol):
    @property
    def name(self) -> str: ...  # the model id clients name in requests

    @property
    def kind(self) -> str: ...  # "cross-encoder" or "embedding-similarity": said in /v1/models

    def score(self, query: str, documents: Sequence[str]) -> RerankScores: ...


class PairScorer(Protocol):
    """What `CrossEncoderReranker` needs of `inference.reranker.CrossEncoder`."""

    @property
    def name(self) -> str: ...

    def score(self, query: str, documents: list[str]) -> PairScores: ...


class PairScores(Protocol):
    @property
    def raw(self) -> np.ndarray: ...

    @property
    def scores(self) -> list[float]: ...

    @property
    def num_tokens(self) -> list[int]: ...


class CrossEncoderReranker:
    """A cross-encoder reads query and document together: the most accurate kind of reranker."""

    kind = CROSS_ENCODER

    def __init__(self, encoder: PairScorer, *, name: str | None = None):
        self.encoder = encoder
        self.name = name or encoder.name

    def score(self, query: str, documents: Sequence[str]) -> RerankScores:
        result = self.encoder.score(query, list(documents))
        return RerankScores(
            scores=list(result.scores),
            num_tokens=sum(result.num_tokens),
            raw_scores=[float(x) for x in result.raw],
        )


class EmbeddingSimilarityReranker:
    """Relevance from the embedder the index already uses: no extra model, but only as good as
    first-stage retrieval (it re-measures what vector search measured, on untruncated text)."""

    kind = EMBEDDING_SIMILARITY

    def __init__(self, embedder: TextEmbedder, *, name: str | None = None):
        self.embedder = embedder
        self.name = name or f"{embedder.name}-similarity"

    def score(self, query: str, documents: Sequence[str]) -> RerankScores:
        if not documents:
            return RerankScores(scores=[], num_tokens=0, raw_scores=[])
        # One call: the query and the documents share batches. Long documents are cut to the
        # embedder's limit, as they were when they were indexed.
        result = self.embedder.embed([query, *documents], truncate=True)
        vectors = np.asarray(result.vectors, dtype=np.float64)
        norms = np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)
        cosine = np.clip((vectors[1:] @ vectors[0]) / (norms[1:] * norms[0]), -1.0, 1.0)
        num_tokens = getattr(result, "num_tokens", None)  # a remote embedder may not count
        return RerankScores(
            scores=((cosine + 1.0) / 2.0).tolist(),
            num_tokens=sum(num_tokens) if num_tokens is not None else 0,
            raw_scores=cosine.tolist(),
        )
