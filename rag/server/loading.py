"""Loading what `rag serve` serves: the chat models, the embedder, the reranker and the index.

Chat models live in a ModelPool: the one named by --model (or the default) is pinned and loaded
at start; any other model of the user's model dir loads when a request names it, and the least
recently used idle ones are unloaded to stay within the memory limit. Clients can only name
models the listing shows, never a path on the server's disk.

With upstreams (`--upstream`), no local chat engine is loaded: one RemoteBackend (rag.upstreams)
routes generation to them, tokenizing with the chat model's local folder (or
--upstream-tokenizer); its per-upstream metrics join /metrics.

With `--embedder-url` / `--reranker-url`, queries are embedded and reranked by remote servers
(rag.upstreams.embeddings, .rerank); a remote embedder whose model name or dimension differs
from what the index records is refused here, before the server starts.

A missing embedder is said once at start-up; the server still starts (chat-only is useful), and
the routes that need it answer with a clear 4xx.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from inference.chat_model import (
    DEFAULT_CHAT_MODEL,
    ModelNotFoundError,
    list_chat_models,
    resolve_chat_model,
)
from inference.engine import Engine, EngineConfig
from inference.model_pool import ModelPool, ModelSpec, PoolConfig, kv_bytes_per_token, weights_bytes

from ingest.cli import load_embedder
from ingest.config import default_db_path
from ingest.errors import IngestError
from ingest.protocols import TextEmbedder
from ingest.store import SqliteVecStore
from rag.reranking import Reranker
from rag.server.reranker_choice import choose_reranker
from rag.server.services import ModelRegistry, PooledModelRegistry, Services, StaticModelRegistry
from rag.upstreams.backend import RemoteBackend, make_remote_backend
from rag.upstreams.config import RouterConfig, UpstreamSpec
from rag.upstreams.embeddings import RemoteEmbedder, connect_embedder
from rag.upstreams.metrics import UpstreamCollector
from rag.upstreams.rerank import connect_reranker

log = logging.getLogger(__name__)

TYPICAL_TOKENS_PER_SEQUENCE = 2048  # KV estimate per running request: a RAG prompt and answer


@dataclass(frozen=True)
class LoadOptions:
    model: str | None = None  # a folder, a .gguf, or a name in $RAG_MODEL_DIR; None: the default
    embedder: Path | None = None  # None: the packaged default
    reranker: Path | None = None  # a cross-encoder folder; None: see rag.server.reranker_choice
    index_path: Path | None = None  # None: $RAG_DATA_DIR/index.sqlite3
    engine: EngineConfig = field(default_factory=EngineConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)  # `pinned` is set to the main model
    upstreams: tuple[UpstreamSpec, ...] = ()  # non-empty: generation is remote, no local engine
    router: RouterConfig = field(default_factory=RouterConfig)
    upstream_tokenizer: Path | None = None  # None: the folder `model` resolves to
    embedder_url: UpstreamSpec | None = None  # a remote /v1/embeddings instead of `embedder`
    reranker_url: UpstreamSpec | None = None  # a remote /v1/rerank instead of `reranker`


def model_cost_bytes(folder: Path, engine: EngineConfig) -> int:
    """What a loaded model is expected to hold: weights, a typical full batch of KV, and its
    prefix cache's RAM tier."""
    tokens = engine.max_kv_tokens or engine.max_num_seqs * min(
        engine.max_model_len or TYPICAL_TOKENS_PER_SEQUENCE, TYPICAL_TOKENS_PER_SEQUENCE
    )
    kv_bytes = tokens * kv_bytes_per_token(folder)
    return weights_bytes(folder) + kv_bytes + engine.prefix_cache_ram_bytes


def make_model_registry(options: LoadOptions) -> PooledModelRegistry:
    main_path = resolve_chat_model(options.model)  # fails early when the main model is missing
    main_name = DEFAULT_CHAT_MODEL if options.model is None else Path(options.model).name

    def available() -> list[str]:
        return [entry.name for entry in list_chat_models()]

    def resolve(name: str) -> ModelSpec:
        if name == main_name:
            path = main_path
        elif name in available():
            path = resolve_chat_model(name)
        else:
            raise ModelNotFoundError(
                f"model {name!r} does not exist; available: {', '.join([main_name, *available()])}"
            )
        return ModelSpec(
            name,
            model_cost_bytes(path, options.engine),
            lambda: Engine.from_path(path, config=options.engine, model_name=name),
        )

    pool_config = PoolConfig(
        memory_limit_bytes=options.pool.memory_limit_bytes,
        pinned=(main_name, *options.pool.pinned),
        idle_ttl_s=options.pool.idle_ttl_s,
        idle_ttl_overrides=options.pool.idle_ttl_overrides,
        wait_s=options.pool.wait_s,
    )
    return PooledModelRegistry(ModelPool(resolve, pool_config), main_name, available)


def make_remote_registry(options: LoadOptions) -> StaticModelRegistry:
    """One RemoteBackend over the upstreams; the tokenizer comes from a local model folder."""
    folder = options.upstream_tokenizer or resolve_chat_model(options.model)
    backend = make_remote_backend(options.upstreams, options.router, folder.expanduser())
    return StaticModelRegistry([backend])


def load_services(options: LoadOptions) -> Services:
    """Load the models (minutes for big ones); raises ModelNotFoundError for a missing chat model."""
    index_path = (options.index_path or default_db_path()).expanduser()
    embedder: TextEmbedder | None
    if options.embedder_url is not None:
        embedder = connect_embedder(options.embedder_url, options.router)
        check_index_embedder(index_path, embedder)
        log.info("embeddings: %s (%d dims) at %s", embedder.name, embedder.dim, embedder.url)
    else:
        try:
            embedder = load_embedder(options.embedder)
        except IngestError as exc:
            log.warning("no embedding model: %s; /v1/embeddings and RAG are off", exc)
            embedder = None
    reranker: Reranker | None
    if options.reranker_url is not None:
        reranker = connect_reranker(options.reranker_url, options.router)
        log.info("reranker: %s (%s) at %s", reranker.name, reranker.kind, options.reranker_url.url)
    else:
        reranker = choose_reranker(options.reranker, embedder)
    # Last: the remote checks above refuse in seconds, before minutes of loading a chat model.
    models: ModelRegistry = (
        make_remote_registry(options) if options.upstreams else make_model_registry(options)
    )
    services = Services(models=models, embedder=embedder, reranker=reranker, index_path=index_path)
    if options.upstreams:
        register_upstream_metrics(services)
    return services


def check_index_embedder(index_path: Path, embedder: RemoteEmbedder) -> None:
    """ValueError unless the index (if there is one) was built with the remote's model and dim."""
    if not index_path.exists():
        return
    with SqliteVecStore.open(index_path) as store:
        identity = store.embedder_identity()
    if identity is None or identity == (embedder.name, embedder.dim):
        return
    raise ValueError(
        f"the index {index_path} was built with embedding model {identity[0]!r} "
        f"({identity[1]} dims), but the remote embedder at {embedder.url} serves "
        f"{embedder.name!r} ({embedder.dim} dims): point --embedder-url at a server of "
        f"{identity[0]!r}, or re-ingest with `ingest --reembed`"
    )


def register_upstream_metrics(services: Services) -> None:
    """rag_upstream_* on /metrics, for every RemoteBackend the registry holds."""
    assert services.metrics is not None

    def probe() -> dict[str, list]:
        backends = {name: services.models.get(name) for name in services.models.loaded_names()}
        return {
            name: b.upstream_stats() for name, b in backends.items() if isinstance(b, RemoteBackend)
        }

    services.metrics.registry.register(UpstreamCollector(probe))
