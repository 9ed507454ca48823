"""`ingest` on the command line: help that documents every setting, JSON output, exit codes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ingest.cli import EXIT_ERROR, EXIT_FILES_FAILED, EXIT_OK, build_parser, main
from ingest.config import IngestConfig, default_db_path
from ingest.store import SqliteVecStore
from tests.fixtures.ingest_fakes import HashingEmbedder


def fake_loader(model: Path | None) -> HashingEmbedder:
    return HashingEmbedder()


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv, embedder_loader=fake_loader)
    out, err = capsys.readouterr()
    return code, out, err


def test_every_config_field_has_a_documented_flag() -> None:
    help_text = build_parser().format_help()
    for field in dataclasses.fields(IngestConfig):
        flag = "--" + field.name.replace("_", "-")
        assert flag in help_text, f"{field.name} has no {flag} flag in ingest --help"
    for topic in ("--no-prune", "--db", "--model", "--json", "exit status", "RAG_DATA_DIR", ".pdf",
                  "kill -9", "--reembed"):  # fmt: skip
        assert topic in help_text, topic


def test_json_report_and_default_db_under_data_dir(
    tmp_path: Path, isolated_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.md").write_text("# A\n\nSome text about ferries.")
    (tmp_path / "b.bin").write_bytes(b"\0")
    code, out, _err = run([str(tmp_path), "--json"], capsys)
    report = json.loads(out)
    assert code == EXIT_OK
    assert (report["added"], report["skipped"], report["ok"]) == (1, 1, True)
    assert report["db_path"] == str(isolated_data_dir / "index.sqlite3") == str(default_db_path())
    assert report["skipped_by_suffix"] == {".bin": 1}
    with SqliteVecStore.open(default_db_path()) as store:
        assert store.counts()["documents"] == 1


def test_failed_files_give_exit_status_1_and_reasons(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.txt").write_text("fine")
    (docs / "bad.txt").write_bytes(b"\xe9t\xe9")
    db = tmp_path / "x.sqlite3"
    code, out, _ = run([str(docs), "--db", str(db)], capsys)
    assert code == EXIT_FILES_FAILED
    assert "1 added" in out and "1 failed" in out
    assert "bad.txt: not UTF-8" in out
    code, out, _ = run([str(docs), "--db", str(db), "--json", "-q"], capsys)
    failures = json.loads(out)["failures"]
    assert code == EXIT_FILES_FAILED and failures[0]["path"].endswith("bad.txt")


def test_errors_give_exit_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run([str(tmp_path / "missing"), "--db", str(tmp_path / "x.sqlite3")], capsys)
    assert code == EXIT_ERROR and "no such file or folder" in err
    (tmp_path / "a.txt").write_text("text")
    not_a_db = tmp_path / "not.sqlite3"
    not_a_db.write_bytes(b"garbage" * 1000)
    code, out, _ = run([str(tmp_path), "--db", str(not_a_db), "--json"], capsys)
    assert code == EXIT_ERROR and json.loads(out)["ok"] is False
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path), "--chunk-tokens", "64", "--chunk-overlap", "40"])
    assert exc.value.code == 2


def test_missing_model_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.txt").write_text("text")
    code = main(
        [str(tmp_path), "--db", str(tmp_path / "i.sqlite3"), "--model", str(tmp_path / "nope")]
    )
    err = capsys.readouterr().err
    assert code == EXIT_ERROR and "cannot load the embedding model" in err


def test_progress_bar_shows_files_chunks_rate_and_eta(tmp_path: Path) -> None:
    from io import StringIO

    from rich.console import Console

    from ingest.pipeline import run_ingest
    from ingest.progress import RichProgress

    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"file {i} text")
    console = Console(file=StringIO(), force_terminal=True, width=140)
    with SqliteVecStore.open(tmp_path / "db" / "i.sqlite3") as store:
        run_ingest([tmp_path], store, HashingEmbedder, progress=RichProgress(console))
    shown = console.file.getvalue()
    for part in ("3/3", "files", "3 chunks", "chunks/s", "ETA"):
        assert part in shown, (part, shown)
