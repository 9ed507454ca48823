"""Memory stays bounded: ingesting ten times more data does not raise the peak RSS much.

Runs the real CLI in fresh processes with the fake embedder, on 2 and on 20 files of 2 MB of
text each, and compares the processes' peak RSS. Slow (about a minute on 2 cores).
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
_SCRIPT = """
import resource, sys
sys.path.insert(0, {repo!r})
from ingest.cli import main
from tests.fixtures.ingest_fakes import HashingEmbedder
code = main(sys.argv[1:], embedder_loader=lambda model: HashingEmbedder(dim=384, max_tokens=256))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def make_files(folder: Path, num_files: int) -> None:
    folder.mkdir()
    rng = random.Random(0)
    words = ["harbour", "ferry", "tide", "lantern", "comet", "mirror", "dome", "pier", "storm"]
    for i in range(num_files):
        paragraphs = (
            " ".join(rng.choice(words) for _ in range(120)) + "." for _ in range(2_600)
        )  # ~2 MB of text
        (folder / f"big{i:02d}.txt").write_text("\n\n".join(paragraphs))


def peak_rss_mb(folder: Path, db: Path) -> float:
    script = _SCRIPT.format(repo=str(REPO))
    argv = [sys.executable, "-c", script, str(folder), "--db", str(db), "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stderr
    return int(done.stderr.strip().splitlines()[-1]) / 1024


def test_peak_memory_does_not_grow_with_the_folder(tmp_path: Path) -> None:
    make_files(tmp_path / "small", 2)
    make_files(tmp_path / "large", 20)
    small = peak_rss_mb(tmp_path / "small", tmp_path / "small.sqlite3")
    large = peak_rss_mb(tmp_path / "large", tmp_path / "large.sqlite3")
    assert large < small + 25, (small, large)  # 10x the data (40 MB of text), a few MB more
