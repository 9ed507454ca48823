"""Document uploads: save files under $RAG_DATA_DIR/uploads, ingest them in the background.

    upload (route) -> safe name, type check -> saved file -> IngestJob, queued
    worker thread: run_ingest(saved files) on the index; progress -> the job; the page polls it

One worker thread runs the jobs in order, so the index has one writer. The embedder's `embed`
calls go through the encoder thread (one MLX user at a time, and queries interleave with a long
ingest batch by batch); tokenizing for the chunker stays on the worker. A file of a type ingest
cannot read is rejected at upload; a file that fails to load is reported, its saved copy
deleted, and the others are ingested. Uploading a name again replaces that document.
Ignores: HTTP (routes_documents.py), reading the index (library.py).
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import unicodedata
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ingest.config import IngestConfig
from ingest.errors import IngestError
from ingest.loaders import SUPPORTED_SUFFIXES, loader_for
from ingest.pipeline import run_ingest
from ingest.protocols import EmbeddingResult, TextEmbedder
from ingest.store import SqliteVecStore
from rag.server.errors import APIError
from rag.server.library import check_embedder
from rag.server.services import EncoderWorker, Services

log = logging.getLogger(__name__)

MAX_JOBS_KEPT = 100  # finished jobs are forgotten oldest first beyond this
_MAX_NAME_BYTES = 200  # well under every file system's 255
_UNSAFE = re.compile(r'[\x00-\x1f\x7f<>:"|?*]')  # control characters, and what Windows forbids


def safe_filename(name: str) -> str:
    """A plain file name from a client's: no folders, no hidden files, no control characters."""
    base = unicodedata.normalize("NFC", name).replace("\\", "/").rsplit("/", 1)[-1]
    base = _UNSAFE.sub("_", base).strip().lstrip(".").strip()
    stem, suffix = os.path.splitext(base)
    while len((stem + suffix).encode()) > _MAX_NAME_BYTES and stem:
        stem = stem[:-1]
    return (stem + suffix) or "upload"


@dataclass
class FileReport:
    name: str  # as the client sent it
    saved_as: str | None  # the safe name under uploads/; None when rejected
    path: str | None  # absolute path as stored in the index
    status: str  # rejected | queued | added | updated | unchanged | failed
    num_chunks: int = 0
    error: dict | None = None  # {"status": 400 or 422, "message": ...}

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "saved_as": self.saved_as,
            "path": self.path,
            "status": self.status,
            "num_chunks": self.num_chunks,
            "error": self.error,
        }


@dataclass
class IngestJob:
    id: str
    files: list[FileReport]
    status: str = "queued"  # queued | running | done | failed
    num_files_done: int = 0  # files the pipeline finished (any outcome), rejected ones excluded
    num_chunks: int = 0  # chunks embedded so far
    error: str | None = None  # why the whole job failed
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    @property
    def num_accepted(self) -> int:
        return sum(f.status != "rejected" for f in self.files)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "object": "ingest.job",
            "status": self.status,
            "num_files": self.num_accepted,
            "num_files_done": self.num_files_done,
            "num_chunks": self.num_chunks,
            "num_failed": sum(f.status in ("failed", "rejected") for f in self.files),
            "error": self.error,
            "created_at": round(self.created_at, 3),
            "finished_at": None if self.finished_at is None else round(self.finished_at, 3),
            "files": [f.to_json() for f in self.files],
        }


class EncoderEmbedder:
    """The server's embedder with `embed` run on the encoder thread; the rest is read directly."""

    def __init__(self, embedder: TextEmbedder, encoder: EncoderWorker) -> None:
        self._embedder = embedder
        self._encoder = encoder

    @property
    def name(self) -> str:
        return self._embedder.name

    @property
    def dim(self) -> int:
        return self._embedder.dim

    @property
    def max_tokens(self) -> int:
        return self._embedder.max_tokens

    @property
    def num_special_tokens(self) -> int:
        return self._embedder.num_special_tokens

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return self._embedder.token_spans(text)  # the tokenizer is thread-safe; no MLX here

    def embed(self, texts: list[str], *, truncate: bool = True) -> EmbeddingResult:
        return self._encoder.call(functools.partial(self._embedder.embed, texts, truncate=truncate))


class _JobProgress:
    """The pipeline's ProgressSink, writing into one job under the registry's lock."""

    def __init__(self, jobs: IngestJobs, job: IngestJob) -> None:
        self._jobs = jobs
        self._job = job
        self._by_path = {f.path: f for f in job.files if f.path is not None}

    def start(self, num_files: int) -> None:
        pass

    def file_done(self, path: str, status: str, num_chunks: int) -> None:
        with self._jobs.lock:
            self._job.num_files_done += 1
            report = self._by_path.get(path)
            if report is not None:
                report.status = status
                report.num_chunks = num_chunks

    def chunks_embedded(self, num_chunks: int) -> None:
        with self._jobs.lock:
            self._job.num_chunks += num_chunks

    def finish(self) -> None:
        pass


class IngestJobs:
    """Saved uploads and their ingest jobs for one server; jobs run on one daemon thread."""

    def __init__(self, services: Services, uploads_dir: Path, config: IngestConfig | None = None):
        self.services = services
        self.uploads_dir = uploads_dir.expanduser().resolve()
        # prune off: the roots are single files, and a failed file's old version goes anyway.
        self.config = config or IngestConfig(prune=False)
        self.lock = threading.Lock()
        self._jobs: OrderedDict[str, IngestJob] = OrderedDict()
        self._queue: queue.Queue[IngestJob] = queue.Queue()
        self._worker: threading.Thread | None = None

    # -- the route's side (event loop; file writes in a thread) -------------------------------

    def accept(self, names: list[str]) -> list[FileReport]:
        """A report per uploaded name: a unique safe name to save as, or rejected with why."""
        reports: list[FileReport] = []
        taken: set[str] = set()
        for name in names:
            safe = safe_filename(name)
            if loader_for(safe) is None:
                suffix = Path(safe).suffix or "(no suffix)"
                supported = " ".join(sorted(SUPPORTED_SUFFIXES))
                message = f"unsupported file type {suffix}: supported are {supported}"
                reports.append(FileReport(name, None, None, "rejected", 0, _error(400, message)))
                continue
            stem, suffix = os.path.splitext(safe)
            n = 2
            while safe.lower() in taken:  # the same name twice in one upload: keep both
                safe, n = f"{stem}-{n}{suffix}", n + 1
            taken.add(safe.lower())
            path = str(self.uploads_dir / safe)
            reports.append(FileReport(name, safe, path, "queued"))
        return reports

    def save(self, report: FileReport, data: BinaryIO) -> None:
        """Write one upload atomically (a reader never sees half a file); blocking."""
        assert report.path is not None
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.uploads_dir, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(data, out, 1 << 20)
            os.replace(tmp, report.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def submit(self, files: list[FileReport]) -> IngestJob:
        job = IngestJob(uuid.uuid4().hex, files)
        with self.lock:
            self._jobs[job.id] = job
            while len(self._jobs) > MAX_JOBS_KEPT:
                oldest = next(iter(self._jobs.values()))
                if oldest.status not in ("done", "failed"):
                    break
                self._jobs.popitem(last=False)
            if job.num_accepted == 0:
                job.status, job.finished_at = "done", time.time()
                return job
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="ingest", daemon=True)
                self._worker.start()
        self._queue.put(job)
        return job

    def resume_pending(self) -> IngestJob | None:
        """Queue the saved uploads the index lacks or holds an older version of.

        A server killed mid-ingest leaves its uploads saved but not (all) indexed; at the next
        start they are ingested again, so nothing a user uploaded is lost. Runs at start-up.
        """
        if not self.uploads_dir.is_dir() or self.services.index_path is None:
            return None
        saved = sorted(
            p
            for p in self.uploads_dir.iterdir()
            if p.is_file() and not p.name.startswith(".") and loader_for(p.name) is not None
        )
        for leftover in self.uploads_dir.glob(".upload-*"):  # a write cut short: never complete
            leftover.unlink(missing_ok=True)
        if not saved:
            return None
        stored = {}
        if self.services.index_path.exists():
            with SqliteVecStore.open(self.services.index_path) as store:
                stored = store.documents_under([str(self.uploads_dir)])
        pending = []
        for path in saved:
            doc, stat = stored.get(str(path)), path.stat()
            if doc is None or doc.size != stat.st_size or doc.mtime_ns != stat.st_mtime_ns:
                pending.append(FileReport(path.name, path.name, str(path), "queued"))
        if not pending:
            return None
        log.info("ingesting %d saved uploads the index does not hold yet", len(pending))
        return self.submit(pending)

    def snapshot(self, job_id: str) -> dict | None:
        with self.lock:
            job = self._jobs.get(job_id)
            return None if job is None else job.to_json()

    def is_upload(self, path: str) -> bool:
        return Path(path).parent == self.uploads_dir

    # -- the worker thread ----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                self._run(job)
            except Exception:  # one job's bug must not stop the worker
                log.exception("ingest job %s failed", job.id)
                self._finish(job, "failed", "internal error while ingesting")

    def _run(self, job: IngestJob) -> None:
        with self.lock:
            job.status = "running"
        services = self.services
        embedder = services.embedder
        if embedder is None or services.index_path is None:
            self._finish(job, "failed", "this server has no embedding model or no index")
            return
        paths = [f.path for f in job.files if f.status == "queued" and f.path is not None]
        try:
            with SqliteVecStore.open(services.index_path) as store:
                check_embedder(services, store)
                report = run_ingest(
                    paths,
                    store,
                    lambda: EncoderEmbedder(embedder, services.encoder),
                    self.config,
                    _JobProgress(self, job),
                    db_path=str(services.index_path),
                )
        except (IngestError, APIError) as exc:
            self._finish(job, "failed", str(exc))
            return
        reasons = {failure.path: failure.reason for failure in report.failures}
        with self.lock:
            for f in job.files:
                if f.path in reasons:
                    f.status, f.error = "failed", _error(422, reasons[f.path])
        for path in reasons:
            if self.is_upload(path):
                Path(path).unlink(missing_ok=True)  # nothing to keep of a file we cannot read
        self._finish(job, "done", None)

    def _finish(self, job: IngestJob, status: str, error: str | None) -> None:
        unread: list[str] = []
        with self.lock:
            for f in job.files:
                if error is not None and f.status == "queued" and f.path is not None:
                    f.status, f.error = "failed", _error(409, error)
                    unread.append(f.path)
            job.status, job.error, job.finished_at = status, error, time.time()
        for path in unread:
            Path(path).unlink(missing_ok=True)  # never indexed: do not leave it in uploads/


def _error(status: int, message: str) -> dict:
    return {"status": status, "message": message}
