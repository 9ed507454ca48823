"""kill -9 an `ingest` process mid-document and at random moments, check the index after each
kill, then let a re-run finish and compare with an ingest that was never interrupted.

The subprocess runs the real CLI (`ingest.cli.main`) with the fake embedder slowed down, so a
run takes a few seconds. The embedder appends the big document it is embedding to a marker
file, which lets the test kill while a document's transaction has already written rows.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from ingest import sqlite
from ingest.store import SqliteVecStore

REPO = Path(__file__).resolve().parents[2]
_SCRIPT = """
import re, sys
sys.path.insert(0, {repo!r})
from ingest.cli import main
from tests.fixtures.ingest_fakes import HashingEmbedder

class Marking(HashingEmbedder):
    def embed(self, texts, *, truncate=True):
        bigs = sorted(set(re.findall(r"of big file (\\d+)", " ".join(texts))))
        with open({marker!r}, "a") as f:
            f.write(" ".join(bigs) + "\\n")
        return super().embed(texts, truncate=truncate)

sys.exit(main(sys.argv[1:], embedder_loader=lambda model: Marking(delay_s={delay})))
"""
NUM_SMALL, NUM_BIG = 120, 4


def make_corpus(root: Path) -> None:
    rng = random.Random(7)
    words = [
        "ferry",
        "tide",
        "harbour",
        "pier",
        "ticket",
        "dawn",
        "storm",
        "lantern",
        "dome",
        "comet",
        "orbit",
    ]
    for i in range(NUM_SMALL):
        sub = root / f"part{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 80)))
        suffix = ".md" if i % 3 else ".txt"
        (sub / f"doc{i:03d}{suffix}").write_text(f"# Doc {i}\n\n{text}.\n")
    for i in range(NUM_BIG):  # ~100 chunks each: many batches, so kills land inside them
        sentences = " ".join(
            f"Sentence {j} of big file {i} mentions {words[j % len(words)]}." for j in range(600)
        )
        (root / f"big{i}.txt").write_text(sentences)


def start(db: Path, folder: Path, marker: Path, delay: float) -> subprocess.Popen[bytes]:
    script = _SCRIPT.format(repo=str(REPO), marker=str(marker), delay=delay)
    argv = [
        sys.executable,
        "-c",
        script,
        str(folder),
        "--db",
        str(db),
        "--json",
        "--batch-size",
        "8",
    ]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def committed_documents(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        conn = sqlite.connect(db)
        try:
            query = "SELECT count(*) FROM documents WHERE num_chunks > 0"
            return int(conn.execute(query).fetchone()[0])
        finally:
            conn.close()
    except sqlite.OperationalError:  # the schema is not there yet
        return 0


def marker_lines(marker: Path) -> list[str]:
    return marker.read_text().splitlines() if marker.exists() else []


def snapshot(db: Path) -> dict[str, list[str]]:
    """Every document's chunk texts, after asserting the index is consistent."""
    with SqliteVecStore.open(db) as store:
        report = store.check_integrity()
        assert report.ok, report
        assert report.num_chunks == report.num_vectors
        paths = [row[0] for row in store._conn.execute("SELECT path FROM documents")]
        return {Path(p).name: [h.text for h in store.chunks_for_document(p)] for p in paths}


def kill(process: subprocess.Popen[bytes]) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def test_kill_9_mid_document_and_at_random_then_rerun_completes(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    make_corpus(folder)
    db, marker = tmp_path / "index.sqlite3", tmp_path / "marker.txt"
    rng = random.Random(1)
    num_killed_mid_document = 0

    # 1. Kill while a big document has had at least two batches embedded (so rows written).
    for _ in range(2):
        marker.unlink(missing_ok=True)
        process = start(db, folder, marker, delay=0.01)
        deadline = time.monotonic() + 60
        while process.poll() is None:
            lines = marker_lines(marker)
            if len(lines) >= 2 and lines[-1] and lines[-1] == lines[-2]:
                break
            assert time.monotonic() < deadline, "never saw a big document being embedded"
            time.sleep(0.005)
        if process.poll() is not None:
            continue
        kill(process)
        in_flight = marker_lines(marker)[-1].split()[-1]
        documents = snapshot(db)
        if f"big{in_flight}.txt" not in documents:
            num_killed_mid_document += 1  # written rows of an open transaction: all gone
    assert num_killed_mid_document >= 1

    # 2. Kill at random moments once some progress was committed.
    for _ in range(3):
        before = committed_documents(db)
        process = start(db, folder, marker, delay=0.01)
        deadline = time.monotonic() + 60
        while committed_documents(db) <= before and process.poll() is None:
            assert time.monotonic() < deadline, "ingest made no progress"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.2))
        if process.poll() is not None:
            break
        kill(process)
        snapshot(db)

    # 3. A re-run finishes the work; the result equals an uninterrupted ingest.
    finished = start(db, folder, marker, delay=0.0)
    _, err = finished.communicate(timeout=120)
    assert finished.returncode == 0, err.decode()
    resumed = snapshot(db)
    clean_db = tmp_path / "clean.sqlite3"
    clean = start(clean_db, folder, marker, delay=0.0)
    _, err = clean.communicate(timeout=120)
    assert clean.returncode == 0, err.decode()
    assert resumed == snapshot(clean_db)
    assert len(resumed) == NUM_SMALL + NUM_BIG
    assert all(re.fullmatch(r"(big\d|doc\d{3})\.(txt|md)", name) for name in resumed)
