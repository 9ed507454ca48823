"""Retrieval-quality harness: recall@k and MRR of vector, BM25, hybrid and hybrid+rerank retrieval.

Ingests a corpus folder (resumable: a re-run only embeds what changed), then asks every question of
a JSONL file and prints one JSON line per retrieval mode, side by side:

    {"question": "...", "relevant": ["wal.html"], "answer_contains": "optional substring"}

A retrieved chunk is relevant when its file's path ends with one of `relevant` (alternatives: any
one of them answers the question) and, if `answer_contains` is given, its text contains that
string (case-insensitive). recall@k is the share of questions with a relevant chunk in the top k;
MRR is the mean of 1 / rank of the first relevant chunk (0 when none is in the candidates).

    .venv/bin/python benchmarks/retrieval.py                        # examples/docs, shipped set
    .venv/bin/python benchmarks/retrieval.py --corpus /usr/share/doc/sqlite3 \\
        --questions benchmarks/data/sqlite_doc_questions.jsonl     # Debian's sqlite3-doc
    .venv/bin/python benchmarks/retrieval.py --reranker PATH        # a cross-encoder folder

Uses the real default embedder; the default reranker is what `rag serve` would pick.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inference.paths import data_dir  # noqa: E402

from ingest.cli import load_embedder  # noqa: E402
from ingest.config import IngestConfig  # noqa: E402
from ingest.pipeline import run_ingest  # noqa: E402
from ingest.protocols import TextEmbedder  # noqa: E402
from ingest.store import SqliteVecStore  # noqa: E402
from rag.reranking import Reranker  # noqa: E402
from rag.retrieval import RetrievalConfig, RetrievedChunk, Retriever  # noqa: E402
from rag.server.reranker_choice import choose_reranker  # noqa: E402

DEFAULT_CORPUS = REPO / "examples" / "docs"
DEFAULT_QUESTIONS = REPO / "benchmarks" / "data" / "examples_questions.jsonl"


@dataclass(frozen=True)
class Question:
    text: str
    relevant: tuple[str, ...]
    answer_contains: str | None = None

    def is_relevant(self, chunk: RetrievedChunk) -> bool:
        path = chunk.hit.path.replace("\\", "/")
        if not any(path == r or path.endswith("/" + r) for r in self.relevant):
            return False
        return (
            self.answer_contains is None or self.answer_contains.lower() in chunk.hit.text.lower()
        )


def load_questions(path: Path) -> list[Question]:
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not row.get("question") or not row.get("relevant"):
            raise SystemExit(f"{path}:{number}: each line needs 'question' and 'relevant'")
        questions.append(
            Question(row["question"], tuple(row["relevant"]), row.get("answer_contains"))
        )
    return questions


def index_for(corpus: Path, embedder: TextEmbedder, db: Path | None) -> tuple[SqliteVecStore, dict]:
    if db is None:
        key = hashlib.sha256(f"{corpus.resolve()}|{embedder.name}".encode()).hexdigest()[:12]
        db = data_dir() / "bench" / f"retrieval-{key}.sqlite3"
    store = SqliteVecStore.open(db)
    report = run_ingest([corpus], store, lambda: embedder, IngestConfig(), db_path=str(db))
    counts = store.counts()
    return store, {
        "db": str(db),
        "documents": counts["documents"],
        "chunks": counts["chunks"],
        "ingest_s": round(report.seconds, 1),
        "ingest_failed": report.failed,
    }


def rerank(reranker: Reranker, question: str, chunks: list[RetrievedChunk]) -> list[RetrievedChunk]:
    if not chunks:
        return chunks
    scores = reranker.score(question, [c.hit.text for c in chunks]).scores
    order = sorted(range(len(chunks)), key=lambda i: (-scores[i], i))
    return [chunks[i] for i in order]


def evaluate(
    name: str,
    questions: list[Question],
    run: callable,
    ks: list[int],
) -> dict:
    hits_at = {k: 0 for k in ks}
    reciprocal_ranks: list[float] = []
    latencies: list[float] = []
    misses: list[str] = []
    for question in questions:
        started = time.perf_counter()
        ranked = run(question.text)
        latencies.append(time.perf_counter() - started)
        first = next((i for i, c in enumerate(ranked, 1) if question.is_relevant(c)), None)
        reciprocal_ranks.append(1 / first if first else 0.0)
        for k in ks:
            hits_at[k] += first is not None and first <= k
        if first is None or first > max(ks[:2] or ks):
            misses.append(question.text)
    n = len(questions)
    latencies.sort()
    return {
        "mode": name,
        "questions": n,
        **{f"recall@{k}": round(hits_at[k] / n, 3) for k in ks},
        "mrr": round(statistics.fmean(reciprocal_ranks), 3),
        "p50_ms": round(latencies[n // 2] * 1000, 1),
        "p99_ms": round(latencies[min(n - 1, int(n * 0.99))] * 1000, 1),
        "missed_at_3": misses[:10],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    parser.add_argument(
        "--db", type=Path, help="index to build or reuse (default: a cached one per corpus)"
    )
    parser.add_argument("--embedder", type=Path, help="embedding model folder (default: packaged)")
    parser.add_argument(
        "--reranker", type=Path, help="cross-encoder folder (default: the server's pick)"
    )
    parser.add_argument(
        "--candidates", type=int, default=20, help="chunks fused and reranked per question"
    )
    parser.add_argument("--k", type=int, nargs="+", default=[1, 3, 5, 10])
    args = parser.parse_args()

    questions = load_questions(args.questions)
    embedder = load_embedder(args.embedder)
    store, index = index_for(args.corpus, embedder, args.db)
    reranker = choose_reranker(args.reranker, embedder)
    depth = max(max(args.k), args.candidates)
    common = {
        "bench": "retrieval",
        "corpus": str(args.corpus),
        "questions_file": args.questions.name,
        "embedder": embedder.name,
        **index,
    }

    def retriever(mode: str) -> Retriever:
        config = RetrievalConfig(top_k=depth, num_candidates=depth, mode=mode)
        return Retriever(store, embedder, config)

    modes = {name: retriever(name).retrieve for name in ("vector", "keyword", "hybrid")}
    if reranker is not None:
        hybrid = retriever("hybrid")
        modes["hybrid+rerank"] = lambda q: rerank(
            reranker, q, hybrid.retrieve(q)[: args.candidates]
        )
    for name, run in modes.items():
        run(questions[0].text)  # warm-up: compiled kernels and sqlite pages
        result = evaluate(name, questions, run, sorted(args.k))
        extra = {"reranker": f"{reranker.name} ({reranker.kind})"} if "rerank" in name else {}
        print(json.dumps({**common, **result, **extra}), flush=True)
    if reranker is None:
        print(json.dumps({**common, "mode": "hybrid+rerank", "skipped": "no reranker available"}))
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
