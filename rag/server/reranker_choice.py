"""Which reranker a server runs: the user's cross-encoder, else the best honest default.

    --reranker PATH   a *ForSequenceClassification folder (BERT / XLM-RoBERTa): CrossEncoderReranker
                      named after the folder; a folder that is not one is an error, not a fallback
    no flag           no cross-encoder ships with the appliance (none is packaged on PyPI), so the
                      default is embedding similarity over the loaded embedder, which /v1/models
                      labels reranker_kind "embedding-similarity"; None without an embedder

Whether the RAG pipeline *uses* a reranker by default is decided elsewhere, from a measurement.
Ignores: HTTP, and when the embedder itself fails to load (loading.py reports that).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ingest.protocols import TextEmbedder
from rag.reranking import CrossEncoderReranker, EmbeddingSimilarityReranker, Reranker

log = logging.getLogger(__name__)


def choose_reranker(path: Path | None, embedder: TextEmbedder | None) -> Reranker | None:
    """The reranker to serve; raises FileNotFoundError or ValueError for a bad `path`."""
    if path is not None:
        from inference.reranker import CrossEncoder  # loads MLX only when asked for

        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"--reranker {folder}: no such folder")
        encoder = CrossEncoder.load(folder)
        log.info("reranker: cross-encoder %s (max %d tokens)", encoder.name, encoder.max_tokens)
        return CrossEncoderReranker(encoder)
    if embedder is None:
        log.warning("no reranker: no embedding model, and no --reranker cross-encoder folder")
        return None
    reranker = EmbeddingSimilarityReranker(embedder)
    log.info(
        "reranker: %s (embedding similarity; pass --reranker PATH for a cross-encoder)",
        reranker.name,
    )
    return reranker
