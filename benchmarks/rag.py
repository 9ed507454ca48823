"""End-to-end RAG timing: retrieve, rerank, prefill and decode of a question, p50 and p99.

Three conditions on the default models, side by side in one run, each question asked in turn:

    no-cache     the engine's prefix cache off: every prompt is prefilled in full (the baseline)
    first        cache on, each question asked for the first time (only the system prompt and
                 instructions can repeat from earlier questions; the passages differ)
    follow-up    the same questions again: the prompt's whole prefix (system, instructions,
                 passages) is in the cache, so only the last block and the new tokens prefill

Fixed, published sampling: temperature 0, at most --max-tokens answer tokens, seed 0. One warm-up
question per condition is not counted. Prints one JSON line per condition.

    .venv/bin/python benchmarks/rag.py                 # examples/docs and its labelled questions
    .venv/bin/python benchmarks/rag.py --corpus DIR --questions FILE.jsonl --top-k 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from inference.chat_model import resolve_chat_model  # noqa: E402
from inference.engine import Engine, EngineConfig  # noqa: E402

from retrieval import DEFAULT_CORPUS, DEFAULT_QUESTIONS, index_for, load_questions  # noqa: E402

from ingest.cli import load_embedder  # noqa: E402
from rag.answer import AnswerConfig, AnswerDone, RagPipeline, StageTimings  # noqa: E402
from rag.retrieval import RetrievalConfig, Retriever  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ask_all(pipeline: RagPipeline, questions: list[str]) -> list[StageTimings]:
    timings = []
    for question in questions:
        done = next(e for e in pipeline.ask(question) if isinstance(e, AnswerDone))
        timings.append(done.timings)
    return timings


def summary(condition: str, timings: list[StageTimings], common: dict) -> dict:
    result: dict = {**common, "condition": condition, "questions": len(timings)}
    for stage in ("retrieve_s", "rerank_s", "prefill_s", "decode_s"):
        values = [getattr(t, stage) * 1000 for t in timings]
        name = stage.removesuffix("_s")
        result[f"{name}_p50_ms"] = round(statistics.median(values), 1)
        result[f"{name}_p99_ms"] = round(percentile(values, 0.99), 1)
    totals = [(t.retrieve_s + t.rerank_s + t.prefill_s + t.decode_s) * 1000 for t in timings]
    result["total_p50_ms"] = round(statistics.median(totals), 1)
    result["total_p99_ms"] = round(percentile(totals, 0.99), 1)
    result["prompt_tokens_mean"] = round(statistics.fmean(t.num_prompt_tokens for t in timings))
    result["cached_tokens_mean"] = round(statistics.fmean(t.num_cached_tokens for t in timings))
    result["completion_tokens_mean"] = round(
        statistics.fmean(t.num_completion_tokens for t in timings)
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    parser.add_argument("--model", help="chat model (default: the packaged SmolLM2)")
    parser.add_argument("--top-k", type=int, default=RetrievalConfig().top_k)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    questions = [q.text for q in load_questions(args.questions)]
    embedder = load_embedder(None)
    store, index = index_for(args.corpus, embedder, None)
    retriever = Retriever(
        store, embedder, RetrievalConfig(top_k=args.top_k, num_candidates=max(20, args.top_k))
    )
    answer = AnswerConfig(max_answer_tokens=args.max_tokens, temperature=0.0, seed=0)
    model_path = resolve_chat_model(args.model)
    common = {
        "bench": "rag",
        "model": model_path.name,
        "embedder": embedder.name,
        "corpus": str(args.corpus),
        "chunks": index["chunks"],
        "top_k": args.top_k,
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
    }
    warmup = "What is this collection of documents about?"
    with tempfile.TemporaryDirectory() as cache_dir:
        off = EngineConfig(max_num_seqs=1, prefix_cache_ram_bytes=0, prefix_cache_ssd_bytes=0)
        with Engine.from_path(model_path, config=off) as engine:
            pipeline = RagPipeline(retriever, engine, answer)
            ask_all(pipeline, [warmup])
            print(json.dumps(summary("no-cache", ask_all(pipeline, questions), common)), flush=True)
        on = EngineConfig(max_num_seqs=1, prefix_cache_dir=Path(cache_dir))
        with Engine.from_path(model_path, config=on) as engine:
            pipeline = RagPipeline(retriever, engine, answer)
            ask_all(pipeline, [warmup])
            first = ask_all(pipeline, questions)
            follow_up = ask_all(pipeline, questions)
            print(json.dumps(summary("first", first, common)), flush=True)
            print(json.dumps(summary("follow-up", follow_up, common)), flush=True)
            stats = getattr(engine, "prefix_cache_stats", None)
            if callable(stats):
                print(json.dumps({**common, "prefix_cache": _jsonable(asdict(stats()))}))
    store.close()
    return 0


def _jsonable(value: object) -> object:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


if __name__ == "__main__":
    sys.exit(main())
