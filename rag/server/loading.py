"""Loading what `rag serve` serves: the chat engine, the embedder, the reranker and the index.

Each part that is missing is said once at start-up; the server still starts with the rest (an
embeddings-only or chat-only appliance is useful too), and the routes that need the missing part
answer with a clear 4xx.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from inference.chat_model import resolve_chat_model
from inference.engine import Engine, EngineConfig

from ingest.cli import load_embedder
from ingest.config import default_db_path
from ingest.errors import IngestError
from rag.reranking import Reranker
from rag.server.services import Services, StaticModelRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadOptions:
    model: str | None = None  # a folder, a .gguf, or a name in $RAG_MODEL_DIR; None: the default
    embedder: Path | None = None  # None: the packaged default
    reranker: Path | None = None  # a cross-encoder folder; None: see rag.server.reranker_choice
    index_path: Path | None = None  # None: $RAG_DATA_DIR/index.sqlite3
    engine: EngineConfig = field(default_factory=EngineConfig)


def load_services(options: LoadOptions) -> Services:
    """Load the models (minutes for big ones); raises ModelNotFoundError for a missing chat model."""
    model_path = resolve_chat_model(options.model)
    engine = Engine.from_path(model_path, config=options.engine)
    try:
        embedder = load_embedder(options.embedder)
    except IngestError as exc:
        log.warning("no embedding model: %s; /v1/embeddings and RAG are off", exc)
        embedder = None
    reranker = _load_reranker(options.reranker, embedder)
    index_path = (options.index_path or default_db_path()).expanduser()
    return Services(
        models=StaticModelRegistry([engine]),
        embedder=embedder,
        reranker=reranker,
        index_path=index_path,
    )


def _load_reranker(path: Path | None, embedder: object) -> Reranker | None:
    from rag.server.reranker_choice import choose_reranker

    return choose_reranker(path, embedder)
