"""One ingest run: scan folders, skip unchanged files, load, chunk, embed in batches, write.

The pipeline sees the embedder and the store only through `ingest.protocols`, and reports
progress through `ingest.progress.ProgressSink`; it prints nothing.

    scan ─▶ per file: unchanged? ─▶ read + hash ─▶ same hash? ─▶ load ─▶ chunk ─▶ queue
                                                                               │
         store ◀── one transaction per document ◀── embed a batch of queued chunks

1. Scan the roots; with prune, remove stored documents whose files are gone.
2. For each file: size, mtime and settings unchanged -> skip without reading (or, with
   check_hashes, read and compare the content hash). Same hash -> record the new mtime only.
3. Otherwise load and chunk it and queue its chunks. Batches of `batch_size` chunks are
   embedded across document boundaries (small files would otherwise embed one chunk at a time).
4. A document's transaction opens when its first vectors arrive and commits with its last, so
   a kill at any point leaves every document wholly old or wholly new. Store writes that come up
   while a document is open (recording a new mtime, removing a failed file) wait in the queue.

The embedding model is loaded only when a file needs embedding: a run with nothing changed
costs a folder walk and one query.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ingest.chunking import ChunkLimits, chunk_document, make_limits
from ingest.config import IngestConfig
from ingest.errors import LoadError
from ingest.progress import NullProgress, ProgressSink
from ingest.protocols import DocumentWriter, IndexStore, TextEmbedder
from ingest.records import Chunk, DocumentRecord, StoredDocument
from ingest.report import FileFailure, IngestReport
from ingest.scan import SourceFile, scan_roots

EmbedderFactory = Callable[[], TextEmbedder]


@dataclass
class _QueuedDocument:
    """A document whose chunks wait for vectors; `writer` is open once some are written."""

    record: DocumentRecord
    chunks: list[Chunk]
    status: str  # "added" or "updated"
    num_embedded: int = 0  # chunks handed to the embedder
    num_written: int = 0
    writer: DocumentWriter | None = None


@dataclass
class _QueuedWrite:
    """A small store write deferred until no document transaction is open."""

    apply: Callable[[], None]


@dataclass
class _Run:
    store: IndexStore
    make_embedder: EmbedderFactory
    config: IngestConfig
    progress: ProgressSink
    report: IngestReport
    stored: dict[str, StoredDocument] = field(default_factory=dict)
    queue: deque[_QueuedDocument | _QueuedWrite] = field(default_factory=deque)
    num_queued_chunks: int = 0  # chunks in the queue not yet handed to the embedder
    _embedder: TextEmbedder | None = None
    _limits: ChunkLimits | None = None

    # -- the model, loaded on first need --------------------------------------------------

    @property
    def embedder(self) -> TextEmbedder:
        if self._embedder is None:
            embedder = self.make_embedder()
            self.store.bind_embedder(embedder.name, embedder.dim, reembed=self.config.reembed)
            self._limits = make_limits(
                self.config.chunk_tokens,
                self.config.chunk_overlap,
                embedder.max_tokens,
                embedder.num_special_tokens,
            )
            self._embedder = embedder
            self.report.embedder = embedder.name
        return self._embedder

    @property
    def limits(self) -> ChunkLimits:
        _ = self.embedder
        assert self._limits is not None
        return self._limits

    # -- per file ---------------------------------------------------------------------------

    def fail(self, path: str, reason: str) -> None:
        """Report a file; if an older version is indexed, remove it: the index mirrors the folder."""
        self.report.failures.append(FileFailure(path, reason))
        if path in self.stored:
            self.defer(lambda: self.store.remove_documents([path]))
        self.progress.file_done(path, "failed", 0)

    def unchanged(self, source: SourceFile, touch: bool) -> None:
        self.report.unchanged += 1
        if touch:
            self.defer(lambda: self.store.touch_document(source.path, source.size, source.mtime_ns))
        self.progress.file_done(source.path, "unchanged", 0)

    def process(self, source: SourceFile) -> None:
        config = self.config
        signature = config.signature(source.loader.name, source.loader.version)
        stored = self.stored.get(source.path)
        same_settings = stored is not None and stored.signature == signature
        if (
            same_settings
            and not config.check_hashes
            and stored is not None
            and (stored.size, stored.mtime_ns) == (source.size, source.mtime_ns)
        ):
            self.unchanged(source, touch=False)
            return
        if source.size > config.max_file_bytes:
            self.fail(
                source.path,
                f"too large: {source.size / 2**20:.1f} MB > --max-file-mb {config.max_file_mb:g}",
            )
            return
        try:
            data = Path(source.path).read_bytes()
        except OSError as exc:
            self.fail(source.path, f"cannot read: {exc.strerror or exc}")
            return
        content_hash = hashlib.sha256(data).hexdigest()
        if same_settings and stored is not None and stored.content_hash == content_hash:
            self.unchanged(
                source, touch=(stored.size, stored.mtime_ns) != (source.size, source.mtime_ns)
            )
            return
        try:
            loaded = source.loader.load(data, Path(source.path))
        except LoadError as exc:
            self.fail(source.path, str(exc))
            return
        except Exception as exc:  # a loader bug or an exotic file must not stop the other files
            self.fail(
                source.path, f"unreadable {source.loader.name} file: {type(exc).__name__}: {exc}"
            )
            return
        del data
        chunks = chunk_document(loaded, self.embedder.token_spans, self.limits)
        if not chunks:
            self.fail(source.path, "empty: no text to index")
            return
        record = DocumentRecord(
            path=source.path,
            content_hash=content_hash,
            size=source.size,
            mtime_ns=source.mtime_ns,
            kind=loaded.kind,
            title=loaded.title or Path(source.path).stem,
            signature=signature,
        )
        status = "added" if stored is None else "updated"
        self.queue.append(_QueuedDocument(record, chunks, status))
        self.num_queued_chunks += len(chunks)
        while self.num_queued_chunks >= config.batch_size:
            self.embed_batch()

    # -- the queue ----------------------------------------------------------------------------

    def defer(self, write: Callable[[], None]) -> None:
        if self.queue:
            self.queue.append(_QueuedWrite(write))
        else:
            write()

    def drain_writes(self) -> None:
        while self.queue and isinstance(self.queue[0], _QueuedWrite):
            self.queue.popleft().apply()

    def embed_batch(self) -> None:
        """Embed up to batch_size queued chunks, then write every document they complete."""
        # 1. Take chunks in queue order, across documents.
        parts: list[tuple[_QueuedDocument, int, int]] = []  # (document, first, end)
        texts: list[str] = []
        for item in self.queue:
            if len(texts) >= self.config.batch_size:
                break
            if isinstance(item, _QueuedWrite) or item.num_embedded == len(item.chunks):
                continue
            take = min(len(item.chunks) - item.num_embedded, self.config.batch_size - len(texts))
            first = item.num_embedded
            parts.append((item, first, first + take))
            texts.extend(chunk.text for chunk in item.chunks[first : first + take])
            item.num_embedded += take
        if not texts:
            return
        # 2. Embed: vectors [n, dim], rows in the order of `texts`.
        result = self.embedder.embed(texts, truncate=True)
        vectors = np.asarray(result.vectors, dtype=np.float32)
        assert vectors.shape[0] == len(texts), (vectors.shape, len(texts))
        self.num_queued_chunks -= len(texts)
        self.report.num_truncated += sum(bool(t) for t in result.truncated)
        self.progress.chunks_embedded(len(texts))
        # 3. Write in queue order: at most one document transaction is open at any time.
        row = 0
        for document, first, end in parts:
            self.drain_writes()
            if document.writer is None:
                document.writer = self.store.begin_document(document.record)
            document.writer.add_chunks(document.chunks[first:end], vectors[row : row + end - first])
            row += end - first
            document.num_written = end
            if document.num_written == len(document.chunks):
                self.commit(document)

    def commit(self, document: _QueuedDocument) -> None:
        assert document.writer is not None and self.queue[0] is document
        document.writer.commit()
        self.queue.popleft()
        status = document.status
        setattr(self.report, status, getattr(self.report, status) + 1)
        self.report.num_chunks += len(document.chunks)
        self.report.num_tokens += sum(chunk.num_tokens for chunk in document.chunks)
        self.progress.file_done(document.record.path, status, len(document.chunks))
        self.drain_writes()

    def finish_queue(self) -> None:
        while self.num_queued_chunks:
            self.embed_batch()
        self.drain_writes()
        assert not self.queue, "every queued document was committed"

    def abort(self) -> None:
        """Roll back a half-written document (an exception or Ctrl-C); the index stays consistent."""
        for item in self.queue:
            if isinstance(item, _QueuedDocument) and item.writer is not None:
                item.writer.rollback()
        self.queue.clear()


def run_ingest(
    roots: Sequence[Path | str],
    store: IndexStore,
    make_embedder: EmbedderFactory,
    config: IngestConfig | None = None,
    progress: ProgressSink | None = None,
    *,
    db_path: str = "",
) -> IngestReport:
    """Bring the index up to date with `roots` (folders or files); see the module docstring."""
    config = config or IngestConfig()
    progress = progress or NullProgress()
    started = time.perf_counter()
    scan = scan_roots(roots, include_hidden=config.include_hidden)
    report = IngestReport(db_path=db_path, roots=scan.roots)
    report.num_files = len(scan.files)
    report.skipped_by_suffix = scan.skipped_by_suffix
    report.failures.extend(scan.failures)
    run = _Run(store, make_embedder, config, progress, report)
    if config.reembed:
        _ = run.embedder  # empties the index now, before anything is compared with it
    run.stored = store.documents_under(scan.roots)

    if config.prune:
        present = {source.path for source in scan.files}
        present.update(failure.path for failure in scan.failures)
        kept = [d.rstrip("/") + "/" for d in scan.unreadable_dirs]
        gone = [
            path
            for path in run.stored
            if path not in present and not any(path.startswith(prefix) for prefix in kept)
        ]
        report.removed = store.remove_documents(gone)

    progress.start(len(scan.files))
    try:
        for source in scan.files:
            run.process(source)
        run.finish_queue()
    except KeyboardInterrupt:
        run.abort()
        report.interrupted = True
    except BaseException:
        run.abort()
        raise
    finally:
        progress.finish()
        report.seconds = time.perf_counter() - started
    return report
