"""Upload handling without a server: safe file names, type checks, duplicate names, job JSON."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from rag.server.ingest_jobs import IngestJobs, safe_filename


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("notes.md", "notes.md"),
        ("../../etc/passwd.txt", "passwd.txt"),
        ("C:\\Users\\me\\report.pdf", "report.pdf"),
        (".hidden.md", "hidden.md"),
        ("..", "upload"),
        ("", "upload"),
        ("a\x00b\nc.txt", "a_b_c.txt"),
        ('what?<>|"*.md', "what______.md"),
        ("  spaced name .txt ", "spaced name .txt"),
        ("e\u0301te\u0301.md", "\u00e9t\u00e9.md"),  # NFC: one form per name
    ],
)
def test_safe_filename(name: str, safe: str) -> None:
    assert safe_filename(name) == safe


def test_long_names_keep_their_suffix() -> None:
    name = safe_filename("x" * 400 + ".markdown")
    assert name.endswith(".markdown") and len(name.encode()) <= 200


def test_accept_rejects_unsupported_types_and_renames_duplicates(tmp_path: Path) -> None:
    jobs = IngestJobs(services=None, uploads_dir=tmp_path)  # type: ignore[arg-type]
    reports = jobs.accept(["a.md", "A.md", "tool.exe", "README", "../a.md"])
    assert [r.status for r in reports] == ["queued", "queued", "rejected", "rejected", "queued"]
    assert [r.saved_as for r in reports] == ["a.md", "A-2.md", None, None, "a-3.md"]
    assert reports[2].error is not None and reports[2].error["status"] == 400
    assert "unsupported file type .exe" in reports[2].error["message"]
    assert "(no suffix)" in reports[3].error["message"]  # type: ignore[index]
    assert reports[0].path == str(tmp_path.resolve() / "a.md")


def test_save_is_atomic_and_stays_in_the_uploads_dir(tmp_path: Path) -> None:
    jobs = IngestJobs(services=None, uploads_dir=tmp_path / "uploads")  # type: ignore[arg-type]
    [report] = jobs.accept(["../notes.md"])
    jobs.save(report, io.BytesIO(b"# Notes\n"))
    assert [p.name for p in (tmp_path / "uploads").iterdir()] == ["notes.md"]
    assert jobs.is_upload(str(report.path))
    assert not jobs.is_upload(str(tmp_path / "notes.md"))


def test_a_job_with_nothing_accepted_is_done_at_once(tmp_path: Path) -> None:
    jobs = IngestJobs(services=None, uploads_dir=tmp_path)  # type: ignore[arg-type]
    job = jobs.submit(jobs.accept(["x.exe"]))
    snapshot = jobs.snapshot(job.id)
    assert snapshot is not None
    assert snapshot["status"] == "done" and snapshot["num_files"] == 0
    assert snapshot["num_failed"] == 1 and snapshot["files"][0]["status"] == "rejected"
    assert jobs.snapshot("nope") is None
