"""Incremental ingest end to end on a folder, with the fake embedder: add, skip, change, delete,
bad files, batching across documents, and failures in the middle of a document."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ingest.config import IngestConfig
from ingest.errors import EmbedderMismatchError
from ingest.pipeline import run_ingest
from ingest.report import IngestReport
from ingest.store import SqliteVecStore
from tests.fixtures.ingest_fakes import HashingEmbedder
from tests.fixtures.ingest_files import SAMPLE_HTML, write_docx, write_pdf


class CountingFactory:
    """Makes the embedder on demand and remembers whether it was asked to."""

    def __init__(self, embedder: HashingEmbedder | None = None) -> None:
        self.embedder = embedder or HashingEmbedder()
        self.num_loads = 0

    def __call__(self) -> HashingEmbedder:
        self.num_loads += 1
        return self.embedder


def ingest(
    roots: list[Path] | Path, db: Path, factory: CountingFactory | None = None, **config: object
) -> IngestReport:
    roots = roots if isinstance(roots, list) else [roots]
    with SqliteVecStore.open(db) as store:
        report = run_ingest(roots, store, factory or CountingFactory(), IngestConfig(**config))  # type: ignore[arg-type]
        assert store.check_integrity().ok
    return report


def stored_texts(db: Path, path: Path) -> list[str]:
    with SqliteVecStore.open(db) as store:
        return [hit.text for hit in store.chunks_for_document(str(path.resolve()))]


def make_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "notes.txt").write_text("Pears ripen in September.\n\nApples keep all winter.")
    (root / "guide.md").write_text(
        "# Guide\n\nFerries leave at dawn.\n\n## Tickets\n\nSold on board."
    )
    (root / "page.html").write_text(SAMPLE_HTML)
    write_pdf(root / "sub" / "report.pdf", [["Page one text."], ["Page two text."]], title="Report")
    write_docx(root / "sub" / "handbook.docx", [("Heading1", "Roles"), ("", "Guides greet.")])
    return root


def test_first_run_adds_second_run_reads_nothing(tmp_path: Path, ingest_db: Path) -> None:
    folder = make_folder(tmp_path / "docs")
    (folder / "logo.png").write_bytes(b"\x89PNG")
    first = ingest(folder, ingest_db)
    assert (first.added, first.unchanged, first.failed, first.skipped) == (5, 0, 0, 1)
    assert first.num_chunks >= 7 and first.ok
    factory = CountingFactory()
    second = ingest(folder, ingest_db, factory)
    assert (second.added, second.updated, second.unchanged, second.removed) == (0, 0, 5, 0)
    assert factory.num_loads == 0 and second.embedder is None  # the model was never loaded
    with SqliteVecStore.open(ingest_db) as store:
        hit = store.search_keywords("ferries dawn")[0]
        assert hit.path == str((folder / "guide.md").resolve())
        assert hit.heading_path == ("Guide",) and hit.title == "Guide"
        pdf_hits = store.search_keywords("page two")
        assert {h.page for h in pdf_hits} == {1, 2} and pdf_hits[0].page == 2


def test_changed_file_replaces_its_chunks(tmp_path: Path, ingest_db: Path) -> None:
    folder = make_folder(tmp_path / "docs")
    ingest(folder, ingest_db)
    (folder / "notes.txt").write_text("Plums are the best fruit of all.")
    report = ingest(folder, ingest_db)
    assert (report.added, report.updated, report.unchanged) == (0, 1, 4)
    assert stored_texts(ingest_db, folder / "notes.txt") == ["Plums are the best fruit of all."]
    with SqliteVecStore.open(ingest_db) as store:
        assert store.search_keywords("pears") == []


def test_touched_file_is_hashed_not_embedded(tmp_path: Path, ingest_db: Path) -> None:
    folder = make_folder(tmp_path / "docs")
    ingest(folder, ingest_db)
    os.utime(folder / "notes.txt", ns=(1_000_000_000, 1_000_000_000))
    factory = CountingFactory()
    report = ingest(folder, ingest_db, factory)
    assert (report.unchanged, factory.num_loads) == (5, 0)
    with SqliteVecStore.open(ingest_db) as store:
        stored = store.documents_under([str(folder.resolve())])
    assert stored[str((folder / "notes.txt").resolve())].mtime_ns == 1_000_000_000


def test_same_size_and_mtime_edit_needs_check_hashes(tmp_path: Path, ingest_db: Path) -> None:
    folder = make_folder(tmp_path / "docs")
    ingest(folder, ingest_db)
    path = folder / "notes.txt"
    stat = path.stat()
    path.write_text(path.read_text().replace("Pears", "Peach"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert ingest(folder, ingest_db).unchanged == 5  # fast path trusts size + mtime
    report = ingest(folder, ingest_db, check_hashes=True)
    assert (report.updated, report.unchanged) == (1, 4)
    assert "Peach ripen" in stored_texts(ingest_db, path)[0]


def test_deleted_files_are_pruned_unless_no_prune(tmp_path: Path, ingest_db: Path) -> None:
    folder = make_folder(tmp_path / "docs")
    ingest(folder, ingest_db)
    (folder / "notes.txt").unlink()
    (folder / "sub" / "report.pdf").unlink()
    kept = ingest(folder, ingest_db, prune=False)
    assert (kept.removed, kept.unchanged) == (0, 3)
    assert stored_texts(ingest_db, folder / "notes.txt")
    pruned = ingest(folder, ingest_db)
    assert (pruned.removed, pruned.unchanged) == (2, 3)
    assert stored_texts(ingest_db, folder / "notes.txt") == []


def test_prune_never_touches_other_folders(tmp_path: Path, ingest_db: Path) -> None:
    first = make_folder(tmp_path / "a")
    second = tmp_path / "a2"  # a sibling whose name extends the first: not "under" it
    second.mkdir()
    (second / "x.txt").write_text("second folder text")
    ingest([first, second], ingest_db)
    (second / "x.txt").unlink()
    assert ingest(first, ingest_db).removed == 0  # a2 was not named: left alone
    assert stored_texts(ingest_db, second / "x.txt") == ["second folder text"]
    assert ingest(second, ingest_db).removed == 1


def test_bad_files_are_reported_and_the_rest_ingests(tmp_path: Path, ingest_db: Path) -> None:
    folder = make_folder(tmp_path / "docs")
    good_pdf = (folder / "sub" / "report.pdf").read_bytes()
    (folder / "truncated.pdf").write_bytes(good_pdf[:200])
    write_pdf(folder / "locked.pdf", [["secret"]], password="pw")
    (folder / "empty.md").write_text("")
    (folder / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    (folder / "binary.txt").write_bytes(bytes(range(256)))
    (folder / "fake.docx").write_text("not a zip")
    (folder / "big.txt").write_text("word " * 300_000)
    (folder / "image.jpg").write_bytes(b"\xff\xd8")
    report = ingest(folder, ingest_db, max_file_mb=1)
    reasons = {Path(f.path).name: f.reason for f in report.failures}
    assert set(reasons) == {
        "truncated.pdf", "locked.pdf", "empty.md", "latin1.txt", "binary.txt", "fake.docx", "big.txt"
    }  # fmt: skip
    assert "password" in reasons["locked.pdf"]
    assert "empty" in reasons["empty.md"]
    assert "not UTF-8" in reasons["latin1.txt"]
    assert "too large" in reasons["big.txt"]
    assert (report.added, report.skipped, report.ok) == (5, 1, False)
    again = ingest(folder, ingest_db, max_file_mb=1)
    assert (again.failed, again.unchanged) == (7, 5)  # failures are reported on every run


def test_a_file_that_turns_bad_loses_its_old_version(tmp_path: Path, ingest_db: Path) -> None:
    folder = make_folder(tmp_path / "docs")
    ingest(folder, ingest_db)
    (folder / "notes.txt").write_bytes(b"\xfa\xfb broken")
    report = ingest(folder, ingest_db)
    assert report.failed == 1 and report.unchanged == 4
    assert stored_texts(ingest_db, folder / "notes.txt") == []


def test_settings_change_rechunks(tmp_path: Path, ingest_db: Path) -> None:
    folder = make_folder(tmp_path / "docs")
    ingest(folder, ingest_db)
    report = ingest(folder, ingest_db, chunk_tokens=32, chunk_overlap=4)
    assert report.updated == 5


def test_hidden_files_need_include_hidden(tmp_path: Path, ingest_db: Path) -> None:
    folder = make_folder(tmp_path / "docs")
    (folder / ".secret.txt").write_text("hidden words")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.md").write_text("cached words")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD.txt").write_text("git words")
    assert ingest(folder, ingest_db).added == 5
    assert ingest(folder, ingest_db, include_hidden=True).added == 2  # never .git


class RecordingEmbedder(HashingEmbedder):
    def __init__(
        self, fail_on_call: int | None = None, error: type[BaseException] = RuntimeError
    ) -> None:
        super().__init__(max_tokens=34)
        self.batch_sizes: list[int] = []
        self.fail_on_call = fail_on_call
        self.error = error

    def embed(self, texts: list[str], *, truncate: bool = True):  # type: ignore[override]
        if self.fail_on_call is not None and len(self.batch_sizes) + 1 == self.fail_on_call:
            raise self.error("embedder died")
        self.batch_sizes.append(len(texts))
        return super().embed(texts, truncate=truncate)


def long_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    for i in range(6):
        (root / f"small{i}.txt").write_text(f"Small file number {i}.")
    (root / "big.txt").write_text(" ".join(f"Sentence {i} about topic {i}." for i in range(300)))
    return root


def test_batches_span_documents_and_never_exceed_batch_size(
    tmp_path: Path, ingest_db: Path
) -> None:
    folder = long_folder(tmp_path / "docs")
    embedder = RecordingEmbedder()
    report = ingest(folder, ingest_db, CountingFactory(embedder), batch_size=4, chunk_overlap=4)
    assert report.added == 7 and report.num_truncated == 0
    assert max(embedder.batch_sizes) == 4 and sum(embedder.batch_sizes) == report.num_chunks
    assert len(stored_texts(ingest_db, folder / "big.txt")) > 20
    with SqliteVecStore.open(ingest_db) as store:
        assert all(
            len(embedder.token_spans(h.text)) <= 32
            for h in store.chunks_for_document(str((folder / "big.txt").resolve()))
        )


def test_deferred_writes_while_a_document_is_open(tmp_path: Path, ingest_db: Path) -> None:
    folder = long_folder(tmp_path / "docs")
    ingest(folder, ingest_db)
    (folder / "big.txt").write_text((folder / "big.txt").read_text() + " One more sentence.")
    os.utime(
        folder / "small0.txt", ns=(5, 5)
    )  # "small0" sorts after "big": touched while big is open
    (folder / "small1.txt").write_bytes(b"\xff bad")  # its removal too
    report = ingest(folder, ingest_db, CountingFactory(RecordingEmbedder()), batch_size=3)
    assert (report.updated, report.unchanged, report.failed) == (1, 5, 1)
    assert stored_texts(ingest_db, folder / "small1.txt") == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_mid_document_rolls_back_and_rerun_completes(
    tmp_path: Path, ingest_db: Path, error: type[BaseException]
) -> None:
    folder = long_folder(tmp_path / "docs")
    dying = CountingFactory(RecordingEmbedder(fail_on_call=5, error=error))
    if error is KeyboardInterrupt:
        report = ingest(folder, ingest_db, dying, batch_size=4)
        assert report.interrupted and not report.ok
    else:
        with pytest.raises(RuntimeError, match="embedder died"):
            ingest(folder, ingest_db, dying, batch_size=4)
    assert stored_texts(ingest_db, folder / "big.txt") == []  # not half of it
    with SqliteVecStore.open(ingest_db) as store:
        assert store.check_integrity().ok
    report = ingest(folder, ingest_db, batch_size=4)
    assert report.added + report.unchanged == 7
    assert len(stored_texts(ingest_db, folder / "big.txt")) > 20


def test_another_model_is_refused_then_reembedded(tmp_path: Path, ingest_db: Path) -> None:
    folder = make_folder(tmp_path / "docs")
    ingest(folder, ingest_db)
    (folder / "notes.txt").write_text("changed, so the model is needed")
    other = CountingFactory(HashingEmbedder(dim=32, name="other-model"))
    with pytest.raises(EmbedderMismatchError):
        ingest(folder, ingest_db, other)
    report = ingest(folder, ingest_db, other, reembed=True)
    assert (report.added, report.embedder) == (5, "other-model")
    with SqliteVecStore.open(ingest_db) as store:
        assert store.embedder_identity() == ("other-model", 32)


def test_single_files_as_roots(tmp_path: Path, ingest_db: Path) -> None:
    folder = make_folder(tmp_path / "docs")
    report = ingest([folder / "notes.txt", folder / "guide.md", folder / "notes.txt"], ingest_db)
    assert (report.num_files, report.added) == (2, 2)
