"""A remote reranker: `rag.reranking.Reranker` over a Cohere/Jina-shaped /v1/rerank.

    reranker = connect_reranker(UpstreamSpec(url, model), RouterConfig())
    reranker.score(query, documents) -> RerankScores (input order, relevance in [0, 1])

`rag serve --reranker-url` uses it for /v1/rerank and the RAG path's rerank stage. Works with
vLLM's and Infinity's /v1/rerank, TEI's OpenAI-compatible route, and another `rag serve`.
Documents go out in batches of `batch_size` (pairs are scored independently, so batches do not
change a score); each call is retried with backoff (json_client.py).

Ignores: sorting and top_n (the callers do that on the full list); raw scores (the remote sends
relevance only, so raw_scores is None).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rag.reranking import CROSS_ENCODER, RerankScores
from rag.upstreams.config import RouterConfig, UpstreamSpec
from rag.upstreams.json_client import JSONClient

DEFAULT_BATCH_SIZE = 256  # documents per request; Cohere takes 1000


class RemoteReranker:
    """Reranker over one remote server; thread-safe."""

    def __init__(
        self, client: JSONClient, name: str, kind: str, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> None:
        self._client = client
        self.name = name
        self.kind = kind
        self._batch_size = batch_size

    def score(self, query: str, documents: Sequence[str]) -> RerankScores:
        scores: list[float] = []
        num_tokens = 0
        for start in range(0, len(documents), self._batch_size):
            batch = list(documents[start : start + self._batch_size])
            body = {"model": self.name, "query": query, "documents": batch}
            reply = self._client.post("/v1/rerank", {**body, "return_documents": False})
            by_index = {int(r["index"]): float(r["relevance_score"]) for r in reply["results"]}
            if sorted(by_index) != list(range(len(batch))):
                raise ValueError(
                    f"{self._client.spec.url} ranked {len(by_index)} of {len(batch)} documents"
                )
            scores += [by_index[i] for i in range(len(batch))]
            usage = reply.get("usage") or {}
            num_tokens += int(usage.get("total_tokens") or usage.get("prompt_tokens") or 0)
        return RerankScores(scores=scores, num_tokens=num_tokens)

    def close(self) -> None:
        self._client.close()


def connect_reranker(spec: UpstreamSpec, config: RouterConfig) -> RemoteReranker:
    """Ask the server which reranker it serves; ValueError when it lists none and none is named."""
    client = JSONClient(spec, config)
    try:
        card = _rerank_card(client.models(), spec.model)
    except Exception:
        client.close()
        raise
    name = spec.model or (card or {}).get("id")
    if not name:
        client.close()
        raise ValueError(
            f"{spec.url} lists no rerank model: name it with --reranker-url URL,model=NAME"
        )
    # This appliance says which kind; vLLM, TEI and Infinity serve cross-encoders.
    kind = (card or {}).get("reranker_kind") or CROSS_ENCODER
    return RemoteReranker(client, str(name), str(kind))


def _rerank_card(cards: list[dict[str, Any]], model: str | None) -> dict[str, Any] | None:
    if model is not None:
        return next((c for c in cards if c.get("id") == model), None)
    typed = [c for c in cards if c.get("type") == "rerank"]
    untyped = [c for c in cards if "type" not in c]
    return (typed or untyped or [None])[0]
