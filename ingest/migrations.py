"""Schema migrations of the index database, as numbered functions applied in order.

`PRAGMA user_version` records how many have run. Each migration runs in its own transaction with
the version bump, so a crash leaves either the old or the new schema. The vectors table is not
created here: its width is the embedding model's dimension, known only when a model is bound
(`SqliteVecStore.bind_embedder`).

Never edit a released migration; append a new one.
"""

from __future__ import annotations

from collections.abc import Callable

from ingest.errors import StoreError
from ingest.sqlite import Connection

Migration = Callable[[Connection], None]


def m001_create_tables(conn: Connection) -> None:
    conn.execute(
        """
        CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )
        """
    )
    conn.execute(
        """
        CREATE TABLE documents (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            path TEXT NOT NULL UNIQUE,
            content_hash TEXT NOT NULL,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            kind TEXT NOT NULL,
            title TEXT,
            signature TEXT NOT NULL,
            num_chunks INTEGER NOT NULL,
            ingested_at TEXT NOT NULL
        )
        """
    )
    # AUTOINCREMENT: a chunk id is never reused, so a cached search hit never names another chunk.
    conn.execute(
        """
        CREATE TABLE chunks (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
            ordinal INTEGER NOT NULL,
            text TEXT NOT NULL,
            title TEXT NOT NULL,
            headings TEXT NOT NULL,
            page INTEGER,
            char_start INTEGER NOT NULL,
            char_end INTEGER NOT NULL,
            num_tokens INTEGER NOT NULL,
            UNIQUE (document_id, ordinal)
        )
        """
    )
    # Keywords over the same rows: an external-content FTS5 index kept in step by triggers.
    conn.execute(
        """
        CREATE VIRTUAL TABLE chunks_fts USING fts5(
            text, headings, title,
            content='chunks', content_rowid='id',
            tokenize='porter unicode61 remove_diacritics 2'
        )
        """
    )
    conn.execute(
        """
        CREATE TRIGGER chunks_fts_insert AFTER INSERT ON chunks BEGIN
            INSERT INTO chunks_fts(rowid, text, headings, title)
            VALUES (new.id, new.text, new.headings, new.title);
        END
        """
    )
    conn.execute(
        """
        CREATE TRIGGER chunks_fts_delete AFTER DELETE ON chunks BEGIN
            INSERT INTO chunks_fts(chunks_fts, rowid, text, headings, title)
            VALUES ('delete', old.id, old.text, old.headings, old.title);
        END
        """
    )


MIGRATIONS: list[Migration] = [
    m001_create_tables,
]


def schema_version(conn: Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def apply_migrations(conn: Connection) -> int:
    """Bring the schema up to date; returns how many migrations ran.

    The version is re-read inside each write transaction, so two processes opening a new index
    at once do not both run the same migration.
    """
    if schema_version(conn) == len(MIGRATIONS):
        return 0  # the common case takes no write lock: opening never waits for a running ingest
    num_applied = 0
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = schema_version(conn)
            if current > len(MIGRATIONS):
                raise StoreError(
                    f"the index has schema version {current}, newer than this code knows "
                    f"({len(MIGRATIONS)}): upgrade the appliance or use another --db"
                )
            if current == len(MIGRATIONS):
                conn.execute("COMMIT")
                return num_applied
            if current == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise StoreError("the database already has tables but is not an ingest index")
            MIGRATIONS[current](conn)
            conn.execute(f"PRAGMA user_version = {current + 1}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        num_applied += 1
