"""Operations: liveness, Prometheus metrics, and the model list (OpenAI's /v1/models)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from rag.server.metrics import CONTENT_TYPE
from rag.server.services import Services

router = APIRouter()


def services_of(request: Request) -> Services:
    return request.app.state.services


@router.get("/health")
async def health(request: Request) -> dict:
    services = services_of(request)
    return {
        "status": "ok",
        "chat_models": services.models.names(),
        "embedding_model": services.embedder.name if services.embedder else None,
        "reranker": services.reranker.name if services.reranker else None,
    }


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    services = services_of(request)
    assert services.metrics is not None
    return Response(services.metrics.render(), media_type=CONTENT_TYPE)


def _model(model_id: str, created: int, kind: str, **extra: object) -> dict:
    # OpenAI's model object, plus what kind of model it is (chat, embedding, rerank).
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "local",
        "type": kind,
        **extra,
    }


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    services = services_of(request)
    created = int(services.started_at)
    data = []
    loaded = set(services.models.loaded_names())
    for name in services.models.names():
        extra: dict[str, object] = {"loaded": name in loaded}
        if name in loaded:  # asking an unloaded model its context length would load it
            extra["max_model_len"] = services.models.get(name).max_model_len
        data.append(_model(name, created, "chat", **extra))
    if services.embedder is not None and services.index_path is not None:
        # Chat completions with model "rag" answer from the indexed documents (rag_chat.py).
        data.append(
            _model("rag", created, "chat", rag=True, chat_model=services.models.default_name)
        )
    if services.embedder is not None:
        e = services.embedder
        data.append(
            _model(e.name, created, "embedding", dimensions=e.dim, max_input_tokens=e.max_tokens)
        )
    if services.reranker is not None:
        r = services.reranker
        data.append(_model(r.name, created, "rerank", reranker_kind=r.kind))
    return {"object": "list", "data": data}
