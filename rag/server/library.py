"""The index as the server reads it: one store per thread, the checks before a query, lookups.

    store = index_store(services)          on the encoder thread; raises APIError 409 / 404
    store.list_documents() / store.document(id) / store.chunk(chunk_id) / chunks_for_document(path)

SQLite connections belong to the thread that opened them, so each thread keeps its own store per
index file (thread-local, opened on first use). Routes call these only on `services.encoder`.
A cached store is reopened when ingest bound a new embedding model (its vector table changed) or
the file was replaced; otherwise WAL mode lets it see every document committed after it opened.
Ignores: writing documents (ingest_jobs.py), answering (rag_service.py).
"""

from __future__ import annotations

import threading
from pathlib import Path

from ingest.records import ChunkInfo, SearchHit
from ingest.sqlite import Connection
from ingest.store import SqliteVecStore
from rag.server.errors import APIError
from rag.server.services import Services


class LibraryStore(SqliteVecStore):
    """The ingest store, remembering what it was opened on (to notice a re-embed or new file)."""

    def __init__(self, conn: Connection, path: Path) -> None:
        super().__init__(conn, path)
        self.opened_identity = self.embedder_identity()
        self.opened_inode = _inode(path)


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def heading_of(hit: SearchHit | ChunkInfo) -> str | None:
    return " > ".join(hit.heading_path) if hit.heading_path else None


_local = threading.local()


def _thread_store(path: Path) -> LibraryStore:
    """This thread's store for `path`, reopened if the file or its embedding model changed."""
    stores: dict[Path, LibraryStore] = _local.__dict__.setdefault("stores", {})
    store = stores.get(path)
    if store is not None and (
        store.embedder_identity() != store.opened_identity  # a first model, or --reembed
        or _inode(path) != store.opened_inode  # the file was deleted and made anew
    ):
        store.close()
        store = None
    if store is None:
        store = stores[path] = LibraryStore.open(path)
    return store


def close_thread_stores() -> None:
    """Close this thread's stores (tests; a thread that ends closes them when collected)."""
    stores: dict[Path, LibraryStore] = _local.__dict__.pop("stores", {})
    for store in stores.values():
        store.close()


def index_path_of(services: Services) -> Path:
    if services.index_path is None:
        raise APIError(409, "this server has no index configured", code="no_index")
    return services.index_path


def index_store(services: Services, *, create: bool = False) -> LibraryStore | None:
    """The calling thread's store, or None when the index file does not exist and not `create`."""
    path = index_path_of(services)
    if not create and not path.exists():
        return None
    return _thread_store(path)


def ingest_hint(path: Path) -> str:
    return (
        "upload documents (the web page, or POST /v1/documents) or run "
        f"`ingest ./your-docs --db {path}`"
    )


def query_store(services: Services) -> LibraryStore:
    """The store for a RAG query: it exists, holds chunks, and matches the server's embedder."""
    path = index_path_of(services)
    store = index_store(services)
    if store is None:
        raise APIError(
            409, f"there is no index at {path} yet: {ingest_hint(path)}", code="no_index"
        )
    if store.counts()["chunks"] == 0:
        raise APIError(
            409, f"the index at {path} is empty: {ingest_hint(path)}", code="index_empty"
        )
    check_embedder(services, store)
    return store


def check_embedder(services: Services, store: SqliteVecStore) -> None:
    identity = store.embedder_identity()
    embedder = services.embedder
    if identity is None or embedder is None or identity == (embedder.name, embedder.dim):
        return
    raise APIError(
        409,
        f"the index at {store.path} was built with embedding model {identity[0]!r} "
        f"({identity[1]} dims), but this server embeds with {embedder.name!r} "
        f"({embedder.dim} dims): start the server with that model (--embedder) or re-ingest "
        "with `ingest --reembed`",
        code="embedder_mismatch",
    )
