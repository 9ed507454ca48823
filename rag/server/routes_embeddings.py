"""`POST /v1/embeddings`, OpenAI's shape, over the loaded embedder.

Ignores: `user` (accepted, unused); the chat models (an embedding request never reaches them).
"""

from __future__ import annotations

import base64
from typing import Literal

from inference.embedder import InputTooLongError, TokenIdError

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from rag.server.errors import APIError
from rag.server.services import Services
from rag.server.settings import ServerSettings

router = APIRouter()

Inputs = str | list[str] | list[int] | list[list[int]]


class EmbeddingsRequest(BaseModel):
    input: Inputs
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate: bool = Field(
        default=False,
        description="Extension: cut inputs longer than the model takes instead of refusing them.",
    )


@router.post("/v1/embeddings")
async def create_embeddings(body: EmbeddingsRequest, request: Request) -> dict:
    """Embed `input`: a string, a list of strings, a list of token ids or a list of id lists.

    Token ids are ids of this server's embedding model's tokenizer (not OpenAI's), content only:
    the model's special tokens are added here, as for text, and the ids are embedded directly
    (no decode and re-encode). An input longer than the model takes is a 400 naming its index and
    length, unless the request sets the extension field `truncate: true`, which cuts it instead.
    `encoding_format: "base64"` gives little-endian float32 bytes (what the official client asks
    for by default); `dimensions` keeps the first n components and re-normalises them to length 1.
    """
    services: Services = request.app.state.services
    settings: ServerSettings = request.app.state.settings
    embedder = services.require_embedder()
    if body.model and body.model != embedder.name:
        raise APIError(
            404,
            f"model {body.model!r} does not exist; the embedding model is {embedder.name!r}",
            param="model",
            code="model_not_found",
        )
    texts, token_ids = _split_input(body.input, settings.max_embedding_inputs)
    if body.dimensions is not None and not 0 < body.dimensions <= embedder.dim:
        raise APIError(
            400,
            f"dimensions={body.dimensions}: this model gives 1..{embedder.dim}",
            param="dimensions",
        )

    embed_ids = getattr(embedder, "embed_ids", None)
    if token_ids is not None and embed_ids is None:
        raise APIError(400, "this embedding model takes text only, not token ids", param="input")
    try:
        if token_ids is not None:
            result = await services.encoder.run(
                lambda: embed_ids(token_ids, truncate=body.truncate)
            )
        else:
            result = await services.encoder.run(
                lambda: embedder.embed(texts, truncate=body.truncate)
            )
    except InputTooLongError as exc:
        raise APIError(
            400,
            f"input[{exc.index}] has {exc.num_tokens} tokens; {embedder.name} takes at most "
            f'{exc.max_tokens}. Shorten it, or send "truncate": true to cut it.',
            param="input",
            code="context_length_exceeded",
        ) from exc
    except TokenIdError as exc:
        raise APIError(400, f"input[{exc.index}]: {exc}", param="input") from exc

    vectors = _fit_dimensions(np.asarray(result.vectors, dtype=np.float32), body.dimensions)
    num_tokens = int(sum(result.num_tokens))
    assert services.metrics is not None
    services.metrics.embedded_inputs.labels(embedder.name).inc(len(vectors))
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": embedder.name,
        "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
    }


def _split_input(
    value: Inputs, max_inputs: int
) -> tuple[list[str], None] | tuple[None, list[list[int]]]:
    """The request's input as texts, or as token-id lists; 400 for empty or too many inputs."""
    if isinstance(value, str):
        value = [value]
    if not value:
        raise APIError(400, "input is empty; send at least one string", param="input")
    if len(value) > max_inputs:
        raise APIError(
            400,
            f"input has {len(value)} items; this server takes at most {max_inputs} per request",
            param="input",
        )
    if isinstance(value[0], int):
        return None, [list(value)]  # type: ignore[arg-type]  # one pre-tokenized input
    for i, item in enumerate(value):
        if len(item) == 0:  # type: ignore[arg-type]
            raise APIError(400, f"input[{i}] is empty; embeddings need some content", param="input")
    if isinstance(value[0], str):
        return list(value), None  # type: ignore[arg-type]
    return None, [list(ids) for ids in value]  # type: ignore[arg-type, union-attr]


def _fit_dimensions(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Keep the first `dimensions` components and scale each row back to unit length."""
    if dimensions is None or dimensions == vectors.shape[1]:
        return vectors
    cut = vectors[:, :dimensions]
    return cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
