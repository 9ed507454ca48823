"""`ingest` with a real (tiny, random) BERT embedder: the MLX model, its WordPiece tokenizer and
`inference.embedder` exactly as the CLI loads them, with no test hook anywhere.

The tiny model takes 24 tokens, so chunks are small and words get cut into pieces: the chunk
limit is checked with the model's own tokenizer. Then `python -m ingest` is killed with -9
twice and re-run, and the result must equal an uninterrupted ingest.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ingest import sqlite
from ingest.cli import EXIT_OK, main
from ingest.store import SqliteVecStore

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "docs"
NUM_DOCS = 100  # with --batch-size 1, a few seconds of embedding calls to kill


def test_examples_with_the_tiny_bert_cli_path(
    tmp_path: Path, tiny_bert_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from inference.embedder import Embedder

    db = tmp_path / "index.sqlite3"
    code = main([str(EXAMPLES), "--db", str(db), "--model", str(tiny_bert_path), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == EXIT_OK, report
    assert (report["added"], report["failed"], report["num_truncated"]) == (5, 0, 0)
    embedder = Embedder.load(tiny_bert_path)
    with SqliteVecStore.open(db) as store:
        assert store.check_integrity().ok
        assert store.embedder_identity() == (embedder.name, embedder.dim)
        rows = store._conn.execute("SELECT text, num_tokens FROM chunks").fetchall()
        assert len(rows) > 100  # 22 content tokens per chunk at most
        counts = embedder.count_tokens([text for text, _ in rows])
        assert max(counts) <= embedder.max_tokens == 24
        assert all(n - 2 == stored for n, (_, stored) in zip(counts, rows, strict=True))
        text = rows[len(rows) // 2][0]
        hit = store.search_vectors(embedder.embed([text]).vectors[0], k=1)[0]
        assert hit.text == text and hit.score == pytest.approx(1.0, abs=1e-4)


def _corpus(root: Path) -> None:
    rng = random.Random(3)
    words = [
        "the",
        "capital",
        "of",
        "france",
        "is",
        "paris",
        "and",
        "the",
        "index",
        "of",
        "documents",
        "is",
        "local",
    ]
    for i in range(NUM_DOCS):
        paragraphs = [" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(4)]
        (root / f"doc{i:02d}.md").parent.mkdir(parents=True, exist_ok=True)
        (root / f"doc{i:02d}.md").write_text(f"# Doc {i}\n\n" + "\n\n".join(paragraphs))


def _start(folder: Path, db: Path, model: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "ingest", str(folder), "--db", str(db), "--model", str(model)]
    argv += ["--json", "--batch-size", "1"]  # many small embedding calls: time to be killed
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _committed(db: Path) -> int:
    try:
        conn = sqlite.connect(db)
        try:
            return int(conn.execute("SELECT count(*) FROM documents").fetchone()[0])
        finally:
            conn.close()
    except (sqlite.OperationalError, sqlite.DatabaseError):
        return 0


def _snapshot(db: Path) -> dict[str, list[str]]:
    with SqliteVecStore.open(db) as store:
        assert store.check_integrity().ok
        paths = [row[0] for row in store._conn.execute("SELECT path FROM documents")]
        return {Path(p).name: [h.text for h in store.chunks_for_document(p)] for p in paths}


def test_kill_9_with_the_real_cli_and_model(tmp_path: Path, tiny_bert_path: Path) -> None:
    folder, db = tmp_path / "docs", tmp_path / "index.sqlite3"
    _corpus(folder)
    rng = random.Random(5)
    num_kills = 0
    for _ in range(3):
        before = _committed(db) if db.exists() else 0
        process = _start(folder, db, tiny_bert_path)
        deadline = time.monotonic() + 120
        while process.poll() is None and _committed(db) <= before:
            assert time.monotonic() < deadline, "ingest made no progress"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.1))
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            num_kills += 1
            _snapshot(db)
    assert num_kills >= 1
    final = _start(folder, db, tiny_bert_path)
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err.decode()
    clean_db = tmp_path / "clean.sqlite3"
    clean = _start(folder, clean_db, tiny_bert_path)
    _, err = clean.communicate(timeout=300)
    assert clean.returncode == 0, err.decode()
    resumed = _snapshot(db)
    assert resumed == _snapshot(clean_db) and len(resumed) == NUM_DOCS
