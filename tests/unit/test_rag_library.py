"""The server's per-thread index store: reopened when a model is bound, checks before a query."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.pipeline import run_ingest
from ingest.store import SqliteVecStore
from rag.server.errors import APIError
from rag.server.library import close_thread_stores, index_store, query_store
from tests.fixtures.ingest_fakes import HashingEmbedder


class FakeServices:
    def __init__(self, index_path: Path | None, embedder: HashingEmbedder | None = None) -> None:
        self.index_path = index_path
        self.embedder = embedder


@pytest.fixture(autouse=True)
def fresh_stores():  # type: ignore[no-untyped-def]
    yield
    close_thread_stores()


def test_store_is_cached_per_thread_and_reopened_after_binding(tmp_path: Path) -> None:
    index = tmp_path / "index.sqlite3"
    services = FakeServices(index, HashingEmbedder())
    assert index_store(services) is None  # type: ignore[arg-type]
    first = index_store(services, create=True)  # type: ignore[arg-type]
    assert first is not None and first.embedder_identity() is None
    assert index_store(services) is first  # type: ignore[arg-type]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\n\nAlpha beta gamma.\n")
    with SqliteVecStore.open(index) as writer:  # another connection, as the ingest worker's
        run_ingest([docs], writer, HashingEmbedder)
    store = query_store(services)  # type: ignore[arg-type]
    assert store is not first  # the vector table appeared: the cached store was reopened
    assert store.search_vectors(HashingEmbedder().embed(["alpha"]).vectors[0], k=1)
    [document] = store.list_documents()
    assert document.path.endswith("a.md") and document.num_chunks >= 1
    chunk = store.document_chunks(document.id)[0]
    assert store.chunk(chunk.id) == chunk and chunk.heading_path == ("A",)
    assert store.chunk(10_000) is None and store.document(10_000) is None


def test_query_store_refuses_a_missing_empty_or_foreign_index(tmp_path: Path) -> None:
    index = tmp_path / "index.sqlite3"
    with pytest.raises(APIError) as missing:
        query_store(FakeServices(index, HashingEmbedder()))  # type: ignore[arg-type]
    assert (missing.value.status_code, missing.value.code) == (409, "no_index")
    SqliteVecStore.open(index).close()
    with pytest.raises(APIError) as empty:
        query_store(FakeServices(index, HashingEmbedder()))  # type: ignore[arg-type]
    assert empty.value.code == "index_empty"
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("Alpha beta gamma.\n")
    with SqliteVecStore.open(index) as writer:
        run_ingest([docs], writer, lambda: HashingEmbedder(dim=32))
    with pytest.raises(APIError) as foreign:
        query_store(FakeServices(index, HashingEmbedder(dim=64)))  # type: ignore[arg-type]
    assert foreign.value.code == "embedder_mismatch" and "hashing-32" in foreign.value.message


def test_a_replaced_index_file_is_reopened(tmp_path: Path) -> None:
    index = tmp_path / "index.sqlite3"
    services = FakeServices(index, HashingEmbedder())
    first = index_store(services, create=True)  # type: ignore[arg-type]
    for suffix in ("", "-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    SqliteVecStore.open(index).close()  # made anew, e.g. after `rm index.sqlite3; ingest ...`
    assert index_store(services) is not first  # type: ignore[arg-type]
