"""The sqlite-vec + FTS5 store: schema, embedder identity, atomic replace, search, integrity."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from ingest import sqlite
from ingest.errors import EmbedderMismatchError, StoreError
from ingest.migrations import MIGRATIONS, schema_version
from ingest.records import Chunk, DocumentRecord
from ingest.store import SqliteVecStore, keyword_query, source_range
from tests.fixtures.ingest_fakes import HashingEmbedder

EMBEDDER = HashingEmbedder(dim=16)


def record(path: str, content: str = "x", title: str | None = "Title") -> DocumentRecord:
    return DocumentRecord(path, f"hash-{content}", 1, 1, "text", title, "sig")


def chunks_of(*texts: str) -> list[Chunk]:
    return [Chunk(i, t, 0, len(t), len(t.split()), ("H1", "H2"), None) for i, t in enumerate(texts)]


def write(store: SqliteVecStore, path: str, *texts: str, content: str = "x") -> None:
    writer = store.begin_document(record(path, content))
    writer.add_chunks(chunks_of(*texts), EMBEDDER.embed(list(texts)).vectors)
    writer.commit()


@pytest.fixture
def store(tmp_path: Path) -> SqliteVecStore:
    opened = SqliteVecStore.open(tmp_path / "sub" / "index.sqlite3")
    opened.bind_embedder(EMBEDDER.name, EMBEDDER.dim)
    yield opened
    opened.close()


def test_driver_can_load_extensions() -> None:
    assert sqlite.can_load_extensions()
    uses_stdlib = hasattr(__import__("sqlite3").Connection, "enable_load_extension")
    assert (sqlite.driver.__name__ == "sqlite3") == uses_stdlib


def test_open_creates_schema_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "new" / "index.sqlite3"
    with SqliteVecStore.open(path) as store:
        assert schema_version(store._conn) == len(MIGRATIONS)
        assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.embedder_identity() is None
    with SqliteVecStore.open(path) as again:  # re-open runs nothing twice
        assert schema_version(again._conn) == len(MIGRATIONS)


def test_newer_schema_and_foreign_databases_are_refused(tmp_path: Path) -> None:
    newer = tmp_path / "newer.sqlite3"
    conn = sqlite.connect(newer)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        SqliteVecStore.open(newer)
    foreign = tmp_path / "foreign.sqlite3"
    conn = sqlite.connect(foreign)
    conn.execute("CREATE TABLE users (id INTEGER)")
    conn.close()
    with pytest.raises(StoreError, match="not an ingest index"):
        SqliteVecStore.open(foreign)
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not a database at all" * 200)
    with pytest.raises(StoreError, match="not a usable index"):
        SqliteVecStore.open(garbage)


def test_another_embedder_is_refused_or_reembedded(store: SqliteVecStore) -> None:
    write(store, "/d/a.txt", "alpha beta")
    store.bind_embedder(EMBEDDER.name, EMBEDDER.dim)  # same model: nothing happens
    with pytest.raises(EmbedderMismatchError, match="--reembed"):
        store.bind_embedder("other-model", 32)
    assert store.counts() == {"documents": 1, "chunks": 1}
    store.bind_embedder("other-model", 32, reembed=True)
    assert store.embedder_identity() == ("other-model", 32)
    assert store.counts() == {"documents": 0, "chunks": 0}
    assert store.check_integrity().ok


def test_replace_is_atomic_and_rollback_keeps_old_version(store: SqliteVecStore) -> None:
    write(store, "/d/a.txt", "old one", "old two")
    writer = store.begin_document(record("/d/a.txt", "new"))
    writer.add_chunks(chunks_of("new one"), EMBEDDER.embed(["new one"]).vectors)
    writer.rollback()
    assert [h.text for h in store.chunks_for_document("/d/a.txt")] == ["old one", "old two"]
    write(store, "/d/a.txt", "new one", content="new")
    assert [h.text for h in store.chunks_for_document("/d/a.txt")] == ["new one"]
    stored = store.documents_under(["/d"])["/d/a.txt"]
    assert (stored.content_hash, stored.num_chunks) == ("hash-new", 1)
    report = store.check_integrity()
    assert report.ok and (report.num_chunks, report.num_vectors) == (1, 1)
    assert store.search_keywords("old") == []


def test_remove_and_touch(store: SqliteVecStore) -> None:
    write(store, "/d/a.txt", "alpha")
    write(store, "/d/b.txt", "beta")
    store.touch_document("/d/a.txt", 99, 12345)
    stored = store.documents_under(["/d"])
    assert (stored["/d/a.txt"].size, stored["/d/a.txt"].mtime_ns) == (99, 12345)
    assert store.remove_documents(["/d/a.txt", "/d/missing.txt"]) == 1
    assert list(store.documents_under(["/d"])) == ["/d/b.txt"]
    assert store.search_keywords("alpha") == []
    assert store.check_integrity().ok


def test_source_ranges_match_folders_not_siblings(store: SqliteVecStore) -> None:
    for path in ("/d/a/x.txt", "/d/a/sub/y.txt", "/d/ab.txt", "/d/a.txt", "/d/a0/z.txt"):
        write(store, path, f"common words {path}")
    assert sorted(store.documents_under(["/d/a"])) == ["/d/a/sub/y.txt", "/d/a/x.txt"]
    assert sorted(store.documents_under(["/d/a/"])) == ["/d/a/sub/y.txt", "/d/a/x.txt"]
    assert sorted(store.documents_under(["/d/a.txt"])) == ["/d/a.txt"]
    assert len(store.documents_under(["/"])) == 5
    assert source_range("/d/a/") == ("/d/a", "/d/a/", "/d/a0")
    query = EMBEDDER.embed(["common words"]).vectors[0]
    hits = store.search_vectors(query, k=10, sources=["/d/a", "/d/ab.txt"])
    assert sorted(h.path for h in hits) == ["/d/a/sub/y.txt", "/d/a/x.txt", "/d/ab.txt"]
    hits = store.search_keywords("common", k=10, sources=["/d/a"])
    assert sorted(h.path for h in hits) == ["/d/a/sub/y.txt", "/d/a/x.txt"]


def test_vector_search_ranks_by_cosine(store: SqliteVecStore) -> None:
    write(store, "/d/fruit.txt", "apples and pears", "bananas are yellow")
    write(store, "/d/ships.txt", "ferries sail at dawn")
    query = EMBEDDER.embed(["ferries sail at dawn"]).vectors[0]
    hits = store.search_vectors(query, k=2)
    assert hits[0].text == "ferries sail at dawn"
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].score > hits[1].score
    assert hits[0].heading_path == ("H1", "H2") and hits[0].title == "Title"
    with pytest.raises(ValueError, match="dims"):
        store.search_vectors(np.zeros(3, dtype=np.float32))


def test_keyword_search_bm25_stemming_and_safe_syntax(store: SqliteVecStore) -> None:
    write(store, "/d/a.txt", "The ferry sails at dawn", "Tickets are sold on board")
    write(store, "/d/b.txt", "Ferries, ferries everywhere: ferry timetables")
    hits = store.search_keywords("ferry")
    assert [h.path for h in hits] == ["/d/b.txt", "/d/a.txt"]  # more matches rank first
    assert hits[0].score > hits[1].score > 0
    assert [h.text for h in store.search_keywords("sailing")] == ["The ferry sails at dawn"]
    for nasty in ('"unbalanced', "AND OR NOT", "col:value*", "(", "NEAR(a b)"):
        store.search_keywords(nasty)  # never an FTS5 syntax error
    assert store.search_keywords("!!!") == []
    assert keyword_query('say "hi"') == '"say" OR "hi"'
    assert [h.text for h in store.search_keywords("ferry dawn", match_all=True)] == [
        "The ferry sails at dawn"
    ]
    assert len(store.search_keywords("ferry tickets")) == 3  # any word by default


def test_integrity_check_finds_planted_damage(store: SqliteVecStore) -> None:
    write(store, "/d/a.txt", "one", "two")
    conn = store._conn
    chunk_id = conn.execute("SELECT min(id) FROM chunks").fetchone()[0]
    conn.execute("DELETE FROM chunk_vectors WHERE chunk_id = ?", (chunk_id,))
    conn.execute("UPDATE documents SET num_chunks = 5")
    report = store.check_integrity()
    assert not report.ok
    assert report.chunks_without_vector == [chunk_id]
    assert report.documents_with_wrong_count == ["/d/a.txt"]


def test_readers_neither_wait_for_nor_see_an_open_document(store: SqliteVecStore) -> None:
    write(store, "/d/a.txt", "old text")
    writer = store.begin_document(record("/d/a.txt", "new"))
    writer.add_chunks(chunks_of("new text"), EMBEDDER.embed(["new text"]).vectors)
    started = time.perf_counter()
    with SqliteVecStore.open(store.path) as reader:  # e.g. the server, while ingest runs
        assert [h.text for h in reader.search_keywords("text")] == ["old text"]
        query = EMBEDDER.embed(["new text"]).vectors[0]
        assert [h.text for h in reader.search_vectors(query, k=5)] == ["old text"]
        writer.commit()
        assert [h.text for h in reader.search_keywords("text")] == ["new text"]
    assert time.perf_counter() - started < 2.0
