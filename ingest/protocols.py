"""The two seams of ingest: the embedder it calls and the index store it writes.

`inference.embedder.Embedder` satisfies `TextEmbedder`; a remote embedder (scale-out) can too.
`ingest.store.SqliteVecStore` satisfies `IndexStore`; a server-grade vector store can too. The
pipeline sees only these protocols, so neither MLX nor sqlite-vec leaks into it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from ingest.records import (
    Chunk,
    DocumentRecord,
    IntegrityReport,
    SearchHit,
    StoredDocument,
)


class EmbeddingResult(Protocol):
    @property
    def vectors(self) -> np.ndarray: ...  # float32 [n, dim], L2-normalised

    @property
    def truncated(self) -> list[bool]: ...

    @property
    def num_tokens(self) -> list[int]: ...  # per text, special tokens included (for usage)


@runtime_checkable
class TextEmbedder(Protocol):
    """The subset of `inference.embedder.Embedder` that ingest uses."""

    @property
    def name(self) -> str: ...  # model identity, recorded in the index

    @property
    def dim(self) -> int: ...

    @property
    def max_tokens(self) -> int: ...  # including special tokens

    @property
    def num_special_tokens(self) -> int: ...

    def token_spans(self, text: str) -> list[tuple[int, int]]: ...

    def embed(self, texts: list[str], *, truncate: bool = True) -> EmbeddingResult: ...


class DocumentWriter(Protocol):
    """One document being replaced: nothing is visible to readers until `commit`."""

    def add_chunks(self, chunks: Sequence[Chunk], vectors: np.ndarray) -> None: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...


class IndexStore(Protocol):
    """Documents, chunks, vectors and keywords, kept consistent per document."""

    def embedder_identity(self) -> tuple[str, int] | None: ...

    def bind_embedder(self, name: str, dim: int, *, reembed: bool = False) -> None: ...

    def documents_under(self, roots: Sequence[str]) -> dict[str, StoredDocument]: ...

    def begin_document(self, record: DocumentRecord) -> DocumentWriter: ...

    def touch_document(self, path: str, size: int, mtime_ns: int) -> None: ...

    def remove_documents(self, paths: Sequence[str]) -> int: ...

    def search_vectors(
        self, query: np.ndarray, *, k: int = 10, sources: Sequence[str] | None = None
    ) -> list[SearchHit]: ...

    def search_keywords(
        self, query: str, *, k: int = 10, sources: Sequence[str] | None = None
    ) -> list[SearchHit]: ...

    def chunks_for_document(self, path: str) -> list[SearchHit]: ...

    def counts(self) -> dict[str, int]: ...  # {"documents": n, "chunks": n}

    def check_integrity(self) -> IntegrityReport: ...

    def close(self) -> None: ...
