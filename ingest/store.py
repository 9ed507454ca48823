"""The index store: SQLite with a sqlite-vec `vec0` table for vectors and FTS5 for keywords.

This module owns the schema (with `ingest.migrations`) and is the only one that imports
`sqlite_vec`. Layout:

    documents      one row per source file: path, content hash, size, mtime, title, num_chunks
    chunks         one row per chunk: text, headings, page, char span; FTS5 `chunks_fts` follows it
    chunk_vectors  vec0(chunk_id, embedding float[dim] cosine, path metadata for prefix filters)
    meta           the embedding model's identity and dimension

Every document is replaced inside one write transaction (old chunks, vectors and keywords out,
new ones in, `num_chunks` set last), and the database runs in WAL mode, so a crash at any point
leaves each document either wholly old or wholly new.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sqlite_vec

from ingest import sqlite
from ingest.errors import EmbedderMismatchError, StoreError
from ingest.migrations import apply_migrations
from ingest.records import (
    Chunk,
    ChunkInfo,
    DocumentInfo,
    DocumentRecord,
    IntegrityReport,
    SearchHit,
    StoredDocument,
)
from ingest.sqlite import Connection

VECTOR_TABLE = "chunk_vectors"
HEADING_SEPARATOR = "\n"  # heading texts never hold a newline (loaders collapse whitespace)
_META_EMBEDDER = "embedder_name"
_META_DIM = "embedder_dim"
_KEYWORD_WEIGHTS = (1.0, 0.5, 0.5)  # bm25 weights of chunks_fts columns: text, headings, title
_WORD = re.compile(r"\w+", re.UNICODE)


def source_range(source: str) -> tuple[str, str, str]:
    """(exact, low, high): a path matches `source` if it equals exact or is in [low, high).

    '0' is the character after '/', so [dir + '/', dir + '0') holds exactly the paths under dir;
    a plain prefix would also match the sibling 'dir2/...'.
    """
    base = source.rstrip("/")
    return (base or "/", base + "/", base + "0")


def _source_sql(column: str, sources: Sequence[str]) -> tuple[str, list[str]]:
    clauses = []
    params: list[str] = []
    for source in sources:
        exact, low, high = source_range(source)
        clauses.append(f"({column} = ? OR ({column} >= ? AND {column} < ?))")
        params.extend((exact, low, high))
    return "(" + " OR ".join(clauses) + ")", params


def keyword_query(text: str, *, match_all: bool = False) -> str | None:
    """An FTS5 query for free text: each word quoted (no FTS syntax errors), OR-ed or AND-ed."""
    words = _WORD.findall(text)
    if not words:
        return None
    quoted = ['"' + word.replace('"', '""') + '"' for word in words]
    return (" AND " if match_all else " OR ").join(quoted)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class SqliteDocumentWriter:
    """Replaces one document inside an open write transaction; see `SqliteVecStore.begin_document`."""

    def __init__(self, conn: Connection, document_id: int, path: str, title: str | None) -> None:
        self._conn = conn
        self._document_id = document_id
        self._path = path
        self._title = title or ""
        self._num_chunks = 0
        self._open = True

    def add_chunks(self, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        assert self._open, "document already committed or rolled back"
        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        vector_rows = []
        for chunk, vector in zip(chunks, vectors, strict=True):
            cursor = self._conn.execute(
                "INSERT INTO chunks (document_id, ordinal, text, title, headings, page,"
                " char_start, char_end, num_tokens)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self._document_id,
                    chunk.ordinal,
                    chunk.text,
                    self._title,
                    HEADING_SEPARATOR.join(chunk.heading_path),
                    chunk.page,
                    chunk.char_start,
                    chunk.char_end,
                    chunk.num_tokens,
                ),
            )
            vector_rows.append((cursor.lastrowid, vector.tobytes(), self._path))
        self._conn.executemany(
            f"INSERT INTO {VECTOR_TABLE} (chunk_id, embedding, path) VALUES (?, ?, ?)",
            vector_rows,
        )
        self._num_chunks += len(chunks)

    def commit(self) -> None:
        assert self._open, "document already committed or rolled back"
        self._conn.execute(
            "UPDATE documents SET num_chunks = ?, ingested_at = ? WHERE id = ?",
            (self._num_chunks, _now(), self._document_id),
        )
        self._conn.execute("COMMIT")
        self._open = False

    def rollback(self) -> None:
        if self._open:
            self._conn.execute("ROLLBACK")
            self._open = False


_DOCUMENT_COLUMNS = "id, path, title, kind, size, num_chunks, ingested_at"
_CHUNK_SQL = (
    "SELECT chunks.id, chunks.document_id, chunks.ordinal, documents.path, documents.title,"
    " chunks.headings, chunks.page, chunks.char_start, chunks.char_end, chunks.num_tokens,"
    " chunks.text FROM chunks JOIN documents ON documents.id = chunks.document_id"
)


class SqliteVecStore:
    """The index in one SQLite file. Open with `SqliteVecStore.open(path)`."""

    def __init__(self, conn: Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._dim: int | None = None
        identity = self.embedder_identity()
        if identity is not None:
            self._dim = identity[1]

    @classmethod
    def open(cls, path: Path | str) -> SqliteVecStore:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite.connect(path, extensions=(sqlite_vec.loadable_path(),))
        try:
            # WAL: readers (the server) never block the writer, and a killed writer rolls back.
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode: no fsync per commit; a power cut may lose the last commits,
            # never consistency. A killed process loses nothing that was committed.
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            apply_migrations(conn)
        except sqlite.DatabaseError as exc:
            conn.close()
            raise StoreError(f"{path} is not a usable index database: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return cls(conn, path)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> SqliteVecStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the embedding model ------------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def embedder_identity(self) -> tuple[str, int] | None:
        """(model name, dimension) the vectors were made with, or None for a new index."""
        name, dim = self._meta(_META_EMBEDDER), self._meta(_META_DIM)
        if name is None or dim is None:
            return None
        return name, int(dim)

    def bind_embedder(self, name: str, dim: int, *, reembed: bool = False) -> None:
        """Record the model on a new index; refuse another model unless `reembed`.

        `reembed` empties the index (every document, chunk and vector) and recreates the vector
        table for the new dimension, in one transaction; the caller then ingests again.
        """
        current = self.embedder_identity()
        if current == (name, dim):
            return
        if current is not None and not reembed:
            raise EmbedderMismatchError(
                f"the index {self.path} was built with embedding model {current[0]!r} "
                f"(dim {current[1]}), but this run uses {name!r} (dim {dim}). Re-run with "
                "--reembed to empty the index and embed again with the new model, or use "
                "another --db."
            )
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            if current is not None:
                self._conn.execute("DELETE FROM chunks")
                self._conn.execute("DELETE FROM documents")
                self._conn.execute(f"DROP TABLE IF EXISTS {VECTOR_TABLE}")
            self._conn.execute(
                f"CREATE VIRTUAL TABLE {VECTOR_TABLE} USING vec0("
                f"chunk_id INTEGER PRIMARY KEY, embedding float[{int(dim)}] "
                "distance_metric=cosine, path TEXT)"
            )
            self._conn.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [(_META_EMBEDDER, name), (_META_DIM, str(int(dim)))],
            )
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        self._dim = int(dim)

    # -- documents ---------------------------------------------------------------------------

    def documents_under(self, roots: Sequence[str]) -> dict[str, StoredDocument]:
        """Every stored document whose path is one of `roots` or lies under one of them."""
        if not roots:
            return {}
        where, params = _source_sql("path", roots)
        rows = self._conn.execute(
            "SELECT id, path, content_hash, size, mtime_ns, signature, num_chunks"
            f" FROM documents WHERE {where}",
            params,
        )
        return {row[1]: StoredDocument(*row) for row in rows}

    def begin_document(self, record: DocumentRecord) -> SqliteDocumentWriter:
        """Open a write transaction replacing `record.path`; old chunks are gone once it commits."""
        if self._dim is None:
            raise StoreError("no embedding model bound to the index: call bind_embedder first")
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            row = self._conn.execute(
                "SELECT id FROM documents WHERE path = ?", (record.path,)
            ).fetchone()
            values = (
                record.content_hash,
                record.size,
                record.mtime_ns,
                record.kind,
                record.title,
                record.signature,
                _now(),
            )
            if row is None:
                cursor = self._conn.execute(
                    "INSERT INTO documents (content_hash, size, mtime_ns, kind, title, signature,"
                    " ingested_at, path, num_chunks) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
                    (*values, record.path),
                )
                document_id = int(cursor.lastrowid)
            else:
                document_id = int(row[0])
                self._delete_chunks(document_id)
                self._conn.execute(
                    "UPDATE documents SET content_hash = ?, size = ?, mtime_ns = ?, kind = ?,"
                    " title = ?, signature = ?, ingested_at = ?, num_chunks = 0 WHERE id = ?",
                    (*values, document_id),
                )
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        return SqliteDocumentWriter(self._conn, document_id, record.path, record.title)

    def _delete_chunks(self, document_id: int) -> None:
        chunk_ids = [
            (row[0],)
            for row in self._conn.execute(
                "SELECT id FROM chunks WHERE document_id = ?", (document_id,)
            )
        ]
        # One point delete per vector: vec0 plans `chunk_id = ?` as a lookup, not a scan.
        self._conn.executemany(f"DELETE FROM {VECTOR_TABLE} WHERE chunk_id = ?", chunk_ids)
        self._conn.execute("DELETE FROM chunks WHERE document_id = ?", (document_id,))

    def touch_document(self, path: str, size: int, mtime_ns: int) -> None:
        """Record a new size/mtime for a file whose content hash did not change."""
        self._conn.execute(
            "UPDATE documents SET size = ?, mtime_ns = ? WHERE path = ?", (size, mtime_ns, path)
        )

    def remove_documents(self, paths: Sequence[str]) -> int:
        """Remove documents with their chunks and vectors, one transaction for all; returns count."""
        if not paths:
            return 0
        num_removed = 0
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            for path in paths:
                row = self._conn.execute(
                    "SELECT id FROM documents WHERE path = ?", (path,)
                ).fetchone()
                if row is None:
                    continue
                self._delete_chunks(int(row[0]))
                self._conn.execute("DELETE FROM documents WHERE id = ?", (row[0],))
                num_removed += 1
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        return num_removed

    # -- search ------------------------------------------------------------------------------

    def search_vectors(
        self, query: np.ndarray, *, k: int = 10, sources: Sequence[str] | None = None
    ) -> list[SearchHit]:
        """The k chunks nearest to `query` by cosine similarity, optionally only under `sources`.

        Exact (brute-force) KNN. With sources, the path filter runs inside the KNN scan (a vec0
        metadata constraint), so k results come back even when the filter is selective.
        """
        if self._dim is None or k <= 0:
            return []
        vector = np.ascontiguousarray(query, dtype=np.float32).reshape(-1)
        if vector.shape[0] != self._dim:
            raise ValueError(f"query vector has {vector.shape[0]} dims, the index has {self._dim}")
        sql = f"SELECT chunk_id, distance FROM {VECTOR_TABLE} WHERE embedding MATCH ? AND k = ?"
        blob = vector.tobytes()
        if not sources:
            matches = self._conn.execute(sql, (blob, k)).fetchall()
        else:
            # vec0 accepts no OR across constraints: one KNN per (source, exact|range), merged.
            found: dict[int, float] = {}
            for source in sources:
                exact, low, high = source_range(source)
                for extra, params in (
                    (" AND path = ?", (exact,)),
                    (" AND path >= ? AND path < ?", (low, high)),
                ):
                    for chunk_id, distance in self._conn.execute(sql + extra, (blob, k, *params)):
                        found[chunk_id] = distance
            matches = sorted(found.items(), key=lambda item: item[1])[:k]
        scores = {int(chunk_id): 1.0 - float(distance) for chunk_id, distance in matches}
        return self._hits(scores)

    def search_keywords(
        self,
        query: str,
        *,
        k: int = 10,
        sources: Sequence[str] | None = None,
        match_all: bool = False,
    ) -> list[SearchHit]:
        """The k best chunks for `query` by FTS5 BM25 (porter-stemmed words, any of them by default)."""
        fts_query = keyword_query(query, match_all=match_all)
        if fts_query is None or k <= 0:
            return []
        weights = ", ".join(str(w) for w in _KEYWORD_WEIGHTS)
        sql = (
            f"SELECT chunks.id, bm25(chunks_fts, {weights}) AS rank_score FROM chunks_fts"
            " JOIN chunks ON chunks.id = chunks_fts.rowid"
            " JOIN documents ON documents.id = chunks.document_id"
            " WHERE chunks_fts MATCH ?"
        )
        params: list[Any] = [fts_query]
        if sources:
            where, source_params = _source_sql("documents.path", sources)
            sql += f" AND {where}"
            params.extend(source_params)
        sql += " ORDER BY rank_score LIMIT ?"
        params.append(k)
        scores = {int(cid): -float(bm25) for cid, bm25 in self._conn.execute(sql, params)}
        return self._hits(scores)

    def chunks_for_document(self, path: str) -> list[SearchHit]:
        """A document's chunks in order (score 0), e.g. to show context around a hit."""
        ids = [
            row[0]
            for row in self._conn.execute(
                "SELECT chunks.id FROM chunks JOIN documents ON documents.id = chunks.document_id"
                " WHERE documents.path = ? ORDER BY chunks.ordinal",
                (path,),
            )
        ]
        return self._hits(dict.fromkeys(ids, 0.0))

    def list_documents(self) -> list[DocumentInfo]:
        rows = self._conn.execute(
            f"SELECT {_DOCUMENT_COLUMNS} FROM documents WHERE num_chunks > 0 ORDER BY path"
        )
        return [DocumentInfo(*row) for row in rows]

    def document(self, document_id: int) -> DocumentInfo | None:
        row = self._conn.execute(
            f"SELECT {_DOCUMENT_COLUMNS} FROM documents WHERE id = ?", (document_id,)
        ).fetchone()
        return None if row is None else DocumentInfo(*row)

    def chunk(self, chunk_id: int) -> ChunkInfo | None:
        row = self._conn.execute(_CHUNK_SQL + " WHERE chunks.id = ?", (chunk_id,)).fetchone()
        return None if row is None else _chunk_info(row)

    def document_chunks(self, document_id: int) -> list[ChunkInfo]:
        rows = self._conn.execute(
            _CHUNK_SQL + " WHERE chunks.document_id = ? ORDER BY chunks.ordinal", (document_id,)
        )
        return [_chunk_info(row) for row in rows]

    def _hits(self, scores: dict[int, float]) -> list[SearchHit]:
        """SearchHits for chunk ids, in the order of `scores`."""
        if not scores:
            return []
        placeholders = ", ".join("?" * len(scores))
        rows = self._conn.execute(
            "SELECT chunks.id, documents.path, documents.title, chunks.headings, chunks.page,"
            " chunks.char_start, chunks.char_end, chunks.text"
            " FROM chunks JOIN documents ON documents.id = chunks.document_id"
            f" WHERE chunks.id IN ({placeholders})",
            list(scores),
        ).fetchall()
        by_id = {row[0]: row for row in rows}
        hits = []
        for chunk_id, score in scores.items():
            row = by_id.get(chunk_id)
            if row is None:
                continue
            _, path, title, headings, page, start, end, text = row
            heading_path = tuple(headings.split(HEADING_SEPARATOR)) if headings else ()
            hits.append(
                SearchHit(chunk_id, score, path, title, heading_path, page, start, end, text)
            )
        return hits

    # -- health ------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        num_documents = self._conn.execute("SELECT count(*) FROM documents").fetchone()[0]
        num_chunks = self._conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
        return {"documents": int(num_documents), "chunks": int(num_chunks)}

    def _vector_ids(self) -> set[int]:
        if self._dim is None:
            return set()
        return {int(row[0]) for row in self._conn.execute(f"SELECT chunk_id FROM {VECTOR_TABLE}")}

    def check_integrity(self) -> IntegrityReport:
        """Cross-check documents, chunks, vectors and FTS5; cheap enough to run after a crash."""
        chunk_ids = {int(row[0]) for row in self._conn.execute("SELECT id FROM chunks")}
        vector_ids = self._vector_ids()
        wrong_counts = [
            row[0]
            for row in self._conn.execute(
                "SELECT documents.path FROM documents LEFT JOIN"
                " (SELECT document_id, count(*) AS n FROM chunks GROUP BY document_id) AS c"
                " ON c.document_id = documents.id"
                " WHERE coalesce(c.n, 0) != documents.num_chunks OR documents.num_chunks = 0"
            )
        ]
        problems = [
            str(row[0])
            for row in self._conn.execute("PRAGMA quick_check")
            if str(row[0]).lower() != "ok"
        ]
        try:
            self._conn.execute(
                "INSERT INTO chunks_fts(chunks_fts, rank) VALUES ('integrity-check', 1)"
            )
        except sqlite.DatabaseError as exc:
            problems.append(f"chunks_fts: {exc}")
        num_documents = self._conn.execute("SELECT count(*) FROM documents").fetchone()[0]
        return IntegrityReport(
            num_documents=int(num_documents),
            num_chunks=len(chunk_ids),
            num_vectors=len(vector_ids),
            chunks_without_vector=sorted(chunk_ids - vector_ids),
            vectors_without_chunk=sorted(vector_ids - chunk_ids),
            documents_with_wrong_count=sorted(wrong_counts),
            problems=problems,
        )


def _chunk_info(row: tuple) -> ChunkInfo:
    chunk_id, document_id, ordinal, path, title, headings, page, start, end, num_tokens, text = row
    heading_path = tuple(headings.split(HEADING_SEPARATOR)) if headings else ()
    return ChunkInfo(
        chunk_id,
        document_id,
        ordinal,
        path,
        title,
        heading_path,
        page,
        start,
        end,
        num_tokens,
        text,
    )
