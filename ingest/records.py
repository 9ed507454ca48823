"""Dataclasses that cross module boundaries: what loaders, the chunker, the pipeline and the store exchange.

Paths are absolute strings as stored in the index (`str(Path.resolve())`), never relative to a
working directory, so a second run from another directory finds the same documents.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Block:
    """A structural unit of a loaded document: a paragraph, a heading, a list item, a code block.

    `start`/`end` are a character span in `LoadedDocument.text`.
    """

    start: int
    end: int
    heading_path: tuple[str, ...] = ()
    page: int | None = None  # 1-based PDF page
    is_heading: bool = False


@dataclass(frozen=True)
class LoadedDocument:
    """A file's text as a loader extracted it, plus its structure.

    For .txt and .md files `text` is the file's own text, so chunk spans are spans of the file;
    for HTML, PDF and DOCX it is the extracted text with blocks joined by blank lines.
    """

    text: str
    blocks: list[Block]
    title: str | None
    kind: str  # the loader's name: "text", "markdown", "html", "pdf", "docx"


@dataclass(frozen=True)
class Chunk:
    """A piece of a document small enough to embed, with where it came from."""

    ordinal: int  # position within its document, from 0
    text: str
    char_start: int  # span in LoadedDocument.text
    char_end: int
    num_tokens: int  # content tokens as the embedder counts them (no special tokens)
    heading_path: tuple[str, ...] = ()
    page: int | None = None


@dataclass(frozen=True)
class DocumentRecord:
    """What the store keeps about one source file."""

    path: str
    content_hash: str  # sha256 of the file's bytes
    size: int
    mtime_ns: int
    kind: str
    title: str | None
    signature: str  # loader + chunking settings; a change re-chunks the file


@dataclass(frozen=True)
class StoredDocument:
    """A document row read back from the store, for the incremental check."""

    document_id: int
    path: str
    content_hash: str
    size: int
    mtime_ns: int
    signature: str
    num_chunks: int


@dataclass(frozen=True)
class SearchHit:
    """One chunk returned by a search. `score`: higher is better (cosine similarity, or -BM25)."""

    chunk_id: int
    score: float
    path: str
    title: str | None
    heading_path: tuple[str, ...]
    page: int | None
    char_start: int
    char_end: int
    text: str


@dataclass(frozen=True)
class IntegrityReport:
    """Cross-table consistency of the index; `ok` when every list is empty."""

    num_documents: int
    num_chunks: int
    num_vectors: int
    chunks_without_vector: list[int] = field(default_factory=list)
    vectors_without_chunk: list[int] = field(default_factory=list)
    documents_with_wrong_count: list[str] = field(default_factory=list)  # half-written documents
    problems: list[str] = field(default_factory=list)  # SQLite / FTS5 integrity-check messages

    @property
    def ok(self) -> bool:
        return not (
            self.chunks_without_vector
            or self.vectors_without_chunk
            or self.documents_with_wrong_count
            or self.problems
        )


@dataclass(frozen=True)
class DocumentInfo:
    """A document as the library lists it."""

    id: int
    path: str
    title: str | None
    kind: str
    size: int
    num_chunks: int
    ingested_at: str  # ISO 8601, UTC


@dataclass(frozen=True)
class ChunkInfo:
    """One chunk with its document, for the library and citation views."""

    id: int
    document_id: int
    ordinal: int  # position in its document, from 0
    path: str
    title: str | None
    heading_path: tuple[str, ...]
    page: int | None
    char_start: int
    char_end: int
    num_tokens: int
    text: str
