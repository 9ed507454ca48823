"""A remote embedding model: ingest's TextEmbedder over an OpenAI-compatible /v1/embeddings.

    embedder = connect_embedder(UpstreamSpec(url, model), RouterConfig())
    embedder.name, embedder.dim, embedder.max_tokens     from /v1/models and one probe embedding
    embedder.embed(texts) -> vectors [n, dim], L2-normalised, in input order

`rag serve --embedder-url` uses it for queries (retrieval, the embedding-similarity reranker)
and /v1/embeddings; the server checks its name and dimension against the index's record first
(rag.server.loading), since vectors of another model would retrieve nonsense. Texts go out in
batches of `batch_size`; each call is retried with backoff (json_client.py). Works with vLLM
(`--task embed`), TEI's OpenAI route, and another `rag serve`.

Ignores, by choice: ingest. Cutting documents into chunks needs the model's tokenizer
(`token_spans`), which a URL does not give; ingest with the same model locally (`ingest
--model FOLDER`), whose name the index records, and serve with the remote one. The remote does not
say per input how many tokens it read or whether it cut one: `num_tokens` splits the reported
total over the batch by text length (exact for one input, and in sum), `truncated` is False.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from inference.embedder import InputTooLongError

import numpy as np

from ingest.errors import IngestError
from rag.upstreams.config import RouterConfig, UpstreamSpec
from rag.upstreams.json_client import JSONClient, RemoteRequestError

DEFAULT_BATCH_SIZE = 64  # inputs per request: large enough to batch well on a GPU server
DEFAULT_MAX_TOKENS = 512  # when the server does not say (BERT-sized models)
_PROBE = "dimension probe"
# This appliance's wording for an input over the limit (routes_embeddings.py).
_TOO_LONG = re.compile(r"input\[(\d+)\] has (\d+) tokens; .* takes at most (\d+)")


@dataclass(frozen=True)
class RemoteEmbeddings:
    vectors: np.ndarray  # float32 [n, dim], L2-normalised
    num_tokens: list[int]
    truncated: list[bool]


class RemoteEmbedder:
    """TextEmbedder (ingest.protocols) over one remote server; thread-safe."""

    def __init__(
        self,
        client: JSONClient,
        name: str,
        dim: int,
        max_tokens: int,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        self._client = client
        self._name = name
        self._dim = dim
        self._max_tokens = max_tokens
        self._batch_size = batch_size

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def max_tokens(self) -> int:
        return self._max_tokens

    @property
    def num_special_tokens(self) -> int:
        return 0  # only chunking reads it, and chunking needs token_spans, which refuses

    @property
    def url(self) -> str:
        return self._client.spec.url

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Refused (IngestError: an ingest run or upload job fails with this message)."""
        raise IngestError(
            f"the embedding model {self._name!r} is remote ({self.url}): ingest needs its "
            "tokenizer to cut chunks; ingest with the same model locally (ingest --model FOLDER)"
        )

    def embed(self, texts: list[str], *, truncate: bool = True) -> RemoteEmbeddings:
        return self._embed(list(texts), truncate, [len(t) for t in texts])

    def embed_ids(self, token_ids: list[list[int]], *, truncate: bool = True) -> RemoteEmbeddings:
        """Token ids of the remote model's tokenizer (this appliance's /v1/embeddings takes them)."""
        return self._embed([list(ids) for ids in token_ids], truncate, [len(i) for i in token_ids])

    def _embed(self, inputs: list[Any], truncate: bool, sizes: list[int]) -> RemoteEmbeddings:
        vectors: list[np.ndarray] = []
        num_tokens: list[int] = []
        for start in range(0, len(inputs), self._batch_size):
            batch = inputs[start : start + self._batch_size]
            rows, total = self._call(batch, truncate, start)
            vectors.append(rows)
            num_tokens += _split(total, sizes[start : start + len(batch)])
        matrix = np.concatenate(vectors) if vectors else np.zeros((0, self._dim), np.float32)
        return RemoteEmbeddings(matrix, num_tokens, [False] * len(inputs))

    def _call(self, batch: list[Any], truncate: bool, offset: int) -> tuple[np.ndarray, int]:
        body: dict[str, Any] = {"model": self._name, "input": batch, "encoding_format": "float"}
        if truncate:  # this appliance's field, and vLLM's
            body.update(truncate=True, truncate_prompt_tokens=self._max_tokens)
        try:
            reply = self._client.post("/v1/embeddings", body)
        except RemoteRequestError as exc:
            if match := _TOO_LONG.search(exc.message):
                index, count, limit = (int(g) for g in match.groups())
                raise InputTooLongError(offset + index, count, limit) from exc
            raise
        data = sorted(reply.get("data") or [], key=lambda item: item.get("index", 0))
        if len(data) != len(batch):
            raise ValueError(f"{self.url} returned {len(data)} embeddings for {len(batch)} inputs")
        rows = np.asarray([item["embedding"] for item in data], dtype=np.float32)
        if rows.ndim != 2 or (self._dim and rows.shape[1] != self._dim):
            raise ValueError(
                f"{self.url} returned vectors of shape {rows.shape}, not [n, {self._dim}]"
            )
        # Normalised here: cosine search assumes unit vectors, and not every server sends them.
        rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        usage = reply.get("usage") or {}
        return rows, int(usage.get("prompt_tokens") or usage.get("total_tokens") or 0)

    def close(self) -> None:
        self._client.close()


def _split(total: int, sizes: list[int]) -> list[int]:
    """`total` tokens over inputs of these sizes, in proportion, summing to total exactly."""
    weight = sum(sizes) or 1
    shares = [total * size // weight for size in sizes]
    if shares:
        shares[-1] += total - sum(shares)
    return shares


def connect_embedder(
    spec: UpstreamSpec, config: RouterConfig, batch_size: int = DEFAULT_BATCH_SIZE
) -> RemoteEmbedder:
    """Ask the server which model it embeds with and its dimension; ValueError if it can't say."""
    client = JSONClient(spec, config)
    try:
        card = _embedding_card(client.models(), spec.model)
        name = spec.model or (card or {}).get("id")
        if not name:
            raise ValueError(
                f"{spec.url} lists no embedding model: name it with --embedder-url URL,model=NAME"
            )
        limit = (card or {}).get("max_input_tokens") or (card or {}).get("max_model_len")
        embedder = RemoteEmbedder(
            client, str(name), 0, int(limit or DEFAULT_MAX_TOKENS), batch_size
        )
        # The dimension from a real embedding: not every server lists it, and this proves it works.
        dim = int(embedder.embed([_PROBE]).vectors.shape[1])
    except Exception:
        client.close()
        raise
    return RemoteEmbedder(client, str(name), dim, embedder.max_tokens, batch_size)


def _embedding_card(cards: list[dict[str, Any]], model: str | None) -> dict[str, Any] | None:
    """The named model's card; else the first embedding card (this appliance types its cards)."""
    if model is not None:
        return next((c for c in cards if c.get("id") == model), None)
    typed = [c for c in cards if c.get("type") == "embedding"]
    untyped = [c for c in cards if "type" not in c]  # vLLM: the one model it serves
    return (typed or untyped or [None])[0]
