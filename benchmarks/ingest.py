"""Ingest benchmark: a generated corpus of mixed files, a first run, an unchanged re-run, an edit.

Prints one JSON line per result: files/s, chunks/s, tokens/s and peak RSS of the first run;
the unchanged re-run in-process and as a fresh `python -m ingest` process, with its ratio to the
first run (the target is under 5%); and a run after editing 1% of the files.

    .venv/bin/python benchmarks/ingest.py                 # 2,000 files, the default embedder
    .venv/bin/python benchmarks/ingest.py --files 500 --model PATH
    .venv/bin/python benchmarks/ingest.py --fake          # no model: the hashing embedder

Uses the real default embedder (all-MiniLM-L6-v2) when it is installed; otherwise, or with
--fake, the deterministic hashing embedder of the tests, and says so in every line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ingest.config import IngestConfig  # noqa: E402
from ingest.pipeline import run_ingest  # noqa: E402
from ingest.protocols import TextEmbedder  # noqa: E402
from ingest.store import SqliteVecStore  # noqa: E402
from tests.fixtures.ingest_files import write_docx, write_pdf  # noqa: E402

_WORDS = [
    "harbour",
    "ferry",
    "tide",
    "lantern",
    "observatory",
    "comet",
    "telescope",
    "mirror",
    "dome",
    "volunteer",
    "ticket",
    "winter",
    "storm",
    "pier",
    "schedule",
    "orbit",
    "planet",
    "nebula",
    "refractor",
    "eyepiece",
    "visitor",
    "solar",
    "budget",
    "committee",
    "library",
    "archive",
    "index",
    "query",
    "model",
    "token",
    "vector",
    "search",
    "document",
    "chunk",
    "memory",
    "engine",
    "cache",
]
_KINDS = ("md", "md", "md", "md", "txt", "txt", "txt", "html", "html", "html", "pdf", "docx")


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 16))]
    return " ".join(words).capitalize() + "."


def _paragraph(rng: random.Random, num_sentences: int) -> str:
    return " ".join(_sentence(rng) for _ in range(num_sentences))


def make_corpus(root: Path, num_files: int, seed: int = 0) -> dict[str, int]:
    """num_files files of mixed types in nested folders; most small, 2% large. Returns counts."""
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    for i in range(num_files):
        kind = _KINDS[i % len(_KINDS)]
        folder = root / f"area{i % 10}" / f"topic{i % 37}"
        folder.mkdir(parents=True, exist_ok=True)
        large = rng.random() < 0.02
        paragraphs = [
            _paragraph(rng, rng.randint(2, 5))
            for _ in range(rng.randint(8, 16) if large else rng.randint(1, 3))
        ]
        title = f"Document {i} about {rng.choice(_WORDS)}"
        path = folder / f"doc{i:05d}.{kind}"
        if kind == "md":
            body = "\n\n".join(
                f"## Part {j}\n\n{p}" if j % 3 == 0 else p for j, p in enumerate(paragraphs)
            )
            path.write_text(f"# {title}\n\n{body}\n")
        elif kind == "txt":
            path.write_text(title + "\n\n" + "\n\n".join(paragraphs) + "\n")
        elif kind == "html":
            body = "".join(f"<h2>Part {j}</h2><p>{p}</p>" for j, p in enumerate(paragraphs))
            path.write_text(
                f"<html><head><title>{title}</title><script>var x = 1;</script></head><body>"
                f"<nav class='menu'><a href='/'>Home</a></nav><h1>{title}</h1>{body}</body></html>"
            )
        elif kind == "pdf":
            pages = [[title], *[[p[k : k + 90] for k in range(0, len(p), 90)] for p in paragraphs]]
            write_pdf(path, pages, title=title)
        else:
            write_docx(path, [("Title", title), *[("", p) for p in paragraphs]], title=title)
        counts[kind] = counts.get(kind, 0) + 1
    for i in range(num_files // 100):  # unsupported files are skipped and counted
        (root / f"area{i % 10}" / f"image{i}.png").write_bytes(b"\x89PNG\r\n")
    return counts


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / 1024 if sys.platform != "darwin" else peak / 2**20, 1)


def _make_embedder(args: argparse.Namespace) -> tuple[Callable[[], TextEmbedder], str]:
    if not args.fake:
        try:
            from inference.embedder import Embedder, default_embedder_path

            path = args.model or default_embedder_path()
            embedder = Embedder.load(path)
            return (lambda: embedder), f"{embedder.name} ({path})"
        except (ImportError, OSError, ValueError) as exc:
            print(
                json.dumps(
                    {
                        "bench": "ingest",
                        "note": f"default embedder unavailable: {exc}; using the fake hashing embedder",
                    }
                )
            )
    from tests.fixtures.ingest_fakes import HashingEmbedder

    fake = HashingEmbedder(dim=384, max_tokens=256)
    return (lambda: fake), "FAKE hashing embedder (not a model: timings exclude real embedding)"


def _run(
    corpus: Path, db: Path, make: Callable[[], TextEmbedder], config: IngestConfig
) -> tuple[float, object]:
    with SqliteVecStore.open(db) as store:
        started = time.perf_counter()
        report = run_ingest([corpus], store, make, config, db_path=str(db))
        seconds = time.perf_counter() - started
        assert store.check_integrity().ok
    return seconds, report


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--model", type=Path, default=None, help="embedding model folder")
    parser.add_argument("--fake", action="store_true", help="use the hashing embedder, no model")
    parser.add_argument("--batch-size", type=int, default=IngestConfig().batch_size)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the corpus and index here")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    corpus, db = workdir / "corpus", workdir / "index.sqlite3"
    shutil.rmtree(corpus, ignore_errors=True)
    db.unlink(missing_ok=True)
    started = time.perf_counter()
    counts = make_corpus(corpus, args.files)
    num_bytes = sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file())
    print(json.dumps({"bench": "ingest", "result": "corpus", "files": args.files, "by_type": counts,
                      "mb": round(num_bytes / 2**20, 2), "seconds": round(time.perf_counter() - started, 2)}))  # fmt: skip

    make, embedder_label = _make_embedder(args)
    config = IngestConfig(batch_size=args.batch_size)
    rss_before = _peak_rss_mb()

    first_s, first = _run(corpus, db, make, config)
    assert first.failed == 0, first.failures[:5]
    print(json.dumps({
        "bench": "ingest", "result": "first_run", "embedder": embedder_label,
        "files": first.added, "chunks": first.num_chunks, "tokens": first.num_tokens,
        "skipped": first.skipped, "seconds": round(first_s, 2),
        "files_per_s": round(first.added / first_s, 1), "chunks_per_s": round(first.num_chunks / first_s, 1),
        "tokens_per_s": round(first.num_tokens / first_s), "peak_rss_mb": _peak_rss_mb(),
        "peak_rss_mb_before_run": rss_before, "batch_size": args.batch_size,
    }))  # fmt: skip

    second_s, second = _run(corpus, db, make, config)
    assert second.unchanged == first.added and second.num_chunks == 0
    print(json.dumps({
        "bench": "ingest", "result": "unchanged_rerun_in_process", "seconds": round(second_s, 3),
        "ratio_to_first": round(second_s / first_s, 4), "under_5_percent": second_s < 0.05 * first_s,
    }))  # fmt: skip

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # No file changed, so the CLI never loads a model: --model is irrelevant here.
    cli = [sys.executable, "-m", "ingest", str(corpus), "--db", str(db), "--json"]
    started = time.perf_counter()
    done = subprocess.run(cli, capture_output=True, text=True, env=env, check=False)
    cli_s = time.perf_counter() - started
    cli_report = json.loads(done.stdout)
    assert cli_report["unchanged"] == first.added, done.stderr
    print(json.dumps({
        "bench": "ingest", "result": "unchanged_rerun_cli_process", "seconds": round(cli_s, 3),
        "ratio_to_first": round(cli_s / first_s, 4), "under_5_percent": cli_s < 0.05 * first_s,
        "note": "fresh `python -m ingest` process: interpreter start and imports included",
    }))  # fmt: skip

    rng = random.Random(1)
    edited = rng.sample(
        sorted(p for p in corpus.rglob("*") if p.suffix in (".md", ".txt")),
        max(1, args.files // 100),
    )
    for path in edited:
        path.write_text(path.read_text() + "\n\nAn edited paragraph about the comet.\n")
    third_s, third = _run(corpus, db, make, config)
    assert third.updated == len(edited)
    print(json.dumps({
        "bench": "ingest", "result": "rerun_after_editing_1_percent", "updated": third.updated,
        "chunks": third.num_chunks, "seconds": round(third_s, 2),
        "ratio_to_first": round(third_s / first_s, 4), "peak_rss_mb": _peak_rss_mb(),
    }))  # fmt: skip
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
