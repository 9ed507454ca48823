"""What a reranker is to the rest of `rag`: query + documents in, relevance in [0, 1] out.

The HTTP `/v1/rerank` route and the RAG pipeline's rerank stage both speak this protocol, so an
MLX cross-encoder, an embedding-similarity fallback, or a remote reranker (scale-out) plug in alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class RerankScores:
    scores: list[float]  # one per document, in input order; relevance in [0, 1]
    num_tokens: int  # tokens the model read (for usage)


@runtime_checkable
class Reranker(Protocol):
    @property
    def name(self) -> str: ...  # the model id clients name in requests

    @property
    def kind(self) -> str: ...  # "cross-encoder" or "embedding-similarity": said in /v1/models

    def score(self, query: str, documents: Sequence[str]) -> RerankScores: ...
