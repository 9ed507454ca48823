"""`POST /v1/rerank` (also `/rerank` and `/v2/rerank`): Cohere / Jina and TEI request shapes.

    Cohere v1/v2, Jina  {model?, query, documents: [str | {text}], top_n?, return_documents?}
                     -> {id, model, results: [{index, relevance_score, document?: {text}}],
                         meta: {api_version, tokens}, usage: {total_tokens, prompt_tokens}}
    TEI                 {query, texts: [str], raw_scores?, return_text?}
                     -> [{index, score, text?}]            (a bare list, as TEI's /rerank answers)

The request's shape picks the response's, on any of the three paths: `texts` means a TEI client,
`documents` a Cohere or Jina one. Results are sorted by score, best first. `relevance_score` and
TEI's `score` are in [0, 1]; TEI's `raw_scores: true` gives the model's raw number instead (a
cross-encoder's logit, or a cosine for the embedding-similarity reranker).

Decisions: `return_documents` defaults to true (Jina's default; Cohere clients ignore the extra
field, Jina clients find the text they expect). Documents longer than the model takes are cut,
never refused (Cohere truncates too); `max_chunks_per_doc`, `rank_fields` and TEI's `truncate` /
`truncation_direction` are accepted and ignored. Ignores: the index (this ranks what it is sent).
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from rag.reranking import Reranker
from rag.server.errors import APIError
from rag.server.services import Services
from rag.server.settings import ServerSettings

router = APIRouter()

ENABLE_HINT = (
    "start the server with `rag serve --reranker PATH` (a BERT or XLM-RoBERTa cross-encoder "
    "folder), or with an embedding model for the embedding-similarity reranker"
)


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="allow")  # Cohere v1 documents may carry other fields
    text: str


class RerankRequest(BaseModel):
    query: str
    model: str | None = None
    documents: list[str | RerankDocument] | None = None  # Cohere, Jina
    texts: list[str] | None = None  # TEI
    top_n: int | None = None
    return_documents: bool = True
    max_chunks_per_doc: int | None = None  # accepted, ignored
    rank_fields: list[str] | None = None  # accepted, ignored
    raw_scores: bool = False  # TEI
    return_text: bool = False  # TEI
    truncate: bool | None = None  # TEI; accepted, ignored: documents are always cut to fit
    truncation_direction: str | None = None  # TEI; accepted, ignored


@router.post("/v1/rerank")
@router.post("/v2/rerank")
@router.post("/rerank")
async def rerank(body: RerankRequest, request: Request) -> dict | list:
    """Score `documents` (or TEI's `texts`) against `query`; best first, cut to `top_n`."""
    services: Services = request.app.state.services
    settings: ServerSettings = request.app.state.settings
    reranker = _require_reranker(services, body.model)
    documents, tei = _documents(body, settings.max_rerank_documents)
    if body.top_n is not None and body.top_n < 1:
        raise APIError(400, f"top_n={body.top_n}: must be at least 1", param="top_n")

    scores = await services.encoder.run(reranker.score, body.query, documents)
    assert services.metrics is not None
    services.metrics.reranked_documents.labels(reranker.name).inc(len(documents))
    order = sorted(range(len(documents)), key=lambda i: -scores.scores[i])[: body.top_n]

    if tei:
        raw = scores.raw_scores if body.raw_scores and scores.raw_scores else scores.scores
        return [
            {"index": i, "score": raw[i], **({"text": documents[i]} if body.return_text else {})}
            for i in order
        ]
    results = []
    for i in order:
        result: dict = {"index": i, "relevance_score": scores.scores[i]}
        if body.return_documents:
            result["document"] = {"text": documents[i]}
        results.append(result)
    version = "2" if request.url.path.startswith("/v2/") else "1"
    return {
        "id": uuid.uuid4().hex,
        "model": reranker.name,
        "results": results,
        "meta": {
            "api_version": {"version": version},
            "tokens": {"input_tokens": scores.num_tokens, "output_tokens": 0},
        },
        "usage": {"total_tokens": scores.num_tokens, "prompt_tokens": scores.num_tokens},
    }


def _require_reranker(services: Services, model: str | None) -> Reranker:
    reranker = services.reranker
    if reranker is None:
        raise APIError(404, f"this server has no reranker; {ENABLE_HINT}", code="model_not_found")
    if model and model != reranker.name:
        raise APIError(
            404,
            f"model {model!r} does not exist; the reranker is {reranker.name!r} ({reranker.kind})",
            param="model",
            code="model_not_found",
        )
    return reranker


def _documents(body: RerankRequest, max_documents: int) -> tuple[list[str], bool]:
    """The texts to score, and whether the request is TEI-shaped; 400 for a malformed list."""
    if (body.documents is None) == (body.texts is None):
        raise APIError(
            400,
            "send the texts to rank as `documents` (Cohere, Jina) or `texts` (TEI), exactly one",
            param="documents",
        )
    tei = body.texts is not None
    param = "texts" if tei else "documents"
    items = body.texts if tei else body.documents
    assert items is not None
    if not items:
        raise APIError(400, f"{param} is empty; send at least one", param=param)
    if len(items) > max_documents:
        raise APIError(
            400,
            f"{param} has {len(items)} items; this server ranks at most {max_documents} per request",
            param=param,
        )
    if not body.query.strip():
        raise APIError(400, "query is empty", param="query")
    return [d if isinstance(d, str) else d.text for d in items], tei
