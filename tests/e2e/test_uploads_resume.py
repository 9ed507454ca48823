"""A server killed mid-ingest leaves uploads saved but not indexed; the next start ingests them."""

from __future__ import annotations

import time
from pathlib import Path

from inference.embedder import Embedder

from ingest.config import IngestConfig
from ingest.pipeline import run_ingest
from ingest.store import SqliteVecStore
from rag.server.app import create_app
from rag.server.routes_documents import UPLOADS_DIRNAME, jobs_for, resume_uploads
from rag.server.services import Services, StaticModelRegistry
from tests.fixtures.live_server import TINY_MODEL


class NoChat:
    model_name = TINY_MODEL
    max_model_len = 64

    def close(self) -> None:
        pass


def wait_done(snapshot: callable, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while (job := snapshot())["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def test_start_up_ingests_saved_uploads_the_index_lacks(
    tiny_bert_path: Path, isolated_data_dir: Path, tmp_path: Path
) -> None:
    uploads = isolated_data_dir / UPLOADS_DIRNAME
    uploads.mkdir()
    (uploads / "indexed.md").write_text("# Done\n\nThis one made it into the index.\n")
    (uploads / "pending.md").write_text("# Pending\n\nThe server died before this one.\n")
    (uploads / ".upload-partial").write_bytes(b"half a fi")  # a write cut short
    index = tmp_path / "index.sqlite3"
    embedder = Embedder.load(tiny_bert_path)
    with SqliteVecStore.open(index) as store:
        run_ingest([uploads / "indexed.md"], store, lambda: embedder, IngestConfig(prune=False))

    services = Services(models=StaticModelRegistry([NoChat()]), embedder=embedder, index_path=index)
    app = create_app(services)
    try:
        started = resume_uploads(app)
        assert started is not None
        jobs = jobs_for(app)
        job = wait_done(lambda: jobs.snapshot(started.id))
        assert job["status"] == "done"
        assert [f["saved_as"] for f in job["files"]] == ["pending.md"]  # the indexed one is skipped
        assert job["files"][0]["status"] == "added"
        assert not (uploads / ".upload-partial").exists()
        with SqliteVecStore.open(index) as store:
            assert {Path(p).name for p in store.documents_under([str(uploads)])} == {
                "indexed.md",
                "pending.md",
            }
        assert jobs.resume_pending() is None  # nothing left to do on the next start
    finally:
        services.close()
