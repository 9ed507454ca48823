"""`rag ask "question"`: answer one question from the index on the command line, streaming.

Prints the answer as it is generated, then the numbered sources it may cite and the time each
stage took (or one JSON object with --json).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from inference.chat_model import ModelNotFoundError, resolve_chat_model
from inference.engine import Engine, EngineConfig

from ingest.cli import load_embedder
from ingest.config import default_db_path
from ingest.errors import IngestError
from ingest.store import SqliteVecStore
from rag.answer import AnswerConfig, AnswerDone, AnswerError, AnswerText, RagPipeline, Sources
from rag.retrieval import RetrievalConfig, Retriever

_DEFAULTS = AnswerConfig()
_RETRIEVAL = RetrievalConfig()


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ask",
        help="answer a question from the indexed documents, with citations",
        description="Retrieve the passages most relevant to QUESTION from the index (hybrid "
        "vector + keyword search), then stream a grounded answer that cites them as [n].",
    )
    parser.add_argument("question", help="what to ask")
    parser.add_argument("--db", type=Path, help="index file (default: $RAG_DATA_DIR/index.sqlite3)")
    parser.add_argument(
        "--model", help="chat model: a folder, a .gguf, or a name in $RAG_MODEL_DIR"
    )
    parser.add_argument(
        "--embedder", type=Path, help="embedding model folder the index was built with"
    )
    parser.add_argument(
        "--source", action="append", metavar="PATH", help="only documents under PATH (repeatable)"
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=_RETRIEVAL.top_k,
        help="passages in the prompt (default: %(default)s)",
    )
    parser.add_argument(
        "--mode",
        choices=["hybrid", "vector", "keyword"],
        default=_RETRIEVAL.mode,
        help="retrieval (default: %(default)s)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=_DEFAULTS.max_answer_tokens,
        help="answer length cap (default: %(default)s)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=_DEFAULTS.temperature,
        help="0 is greedy (default: %(default)s)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of streaming text"
    )
    parser.set_defaults(run=run)


def _print_sources(event: Sources) -> None:
    if not event.citations:
        return
    print("\nSources:")
    for c in event.citations:
        where = c.source + (f", page {c.page}" if c.page is not None else "")
        heading = f" - {c.heading}" if c.heading else ""
        print(f"  [{c.number}] {where}{heading}")


def run(args: argparse.Namespace) -> int:
    db_path = (args.db or default_db_path()).expanduser()
    if not db_path.exists():
        print(f"error: no index at {db_path}: run `ingest ./your-docs` first", file=sys.stderr)
        return 2
    try:
        retrieval = RetrievalConfig(
            top_k=args.top_k, num_candidates=max(20, args.top_k), mode=args.mode
        )
        answer_config = AnswerConfig(
            max_answer_tokens=args.max_tokens, temperature=args.temperature
        )
        store = SqliteVecStore.open(db_path)
        if store.counts()["chunks"] == 0:
            print(
                f"error: the index at {db_path} is empty: run `ingest ./your-docs` first",
                file=sys.stderr,
            )
            return 2
        embedder = load_embedder(args.embedder)
        identity = store.embedder_identity()
        if identity is not None and identity != (embedder.name, embedder.dim):
            print(
                f"error: the index was built with {identity[0]} ({identity[1]} dims), not {embedder.name}; "
                "pass --embedder with that model",
                file=sys.stderr,
            )
            return 2
        model_path = resolve_chat_model(args.model)
    except (ValueError, IngestError, ModelNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine = Engine.from_path(model_path, config=EngineConfig(max_num_seqs=1))
    try:
        pipeline = RagPipeline(Retriever(store, embedder, retrieval), engine, answer_config)
        return _stream(pipeline, args)
    except AnswerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.close()
        store.close()


def _stream(pipeline: RagPipeline, args: argparse.Namespace) -> int:
    sources: Sources | None = None
    # Stored paths are absolute: a relative --source means a folder under the working directory.
    filters = [str(Path(s).expanduser().resolve()) for s in args.source or []]
    for event in pipeline.ask(args.question, sources=filters or None):
        if isinstance(event, Sources):
            sources = event
        elif isinstance(event, AnswerText) and not args.json:
            print(event.text, end="", flush=True)
        elif isinstance(event, AnswerDone):
            if args.json:
                payload = {
                    "answer": event.answer,
                    "finish_reason": event.finish_reason,
                    "citations": [asdict(c) for c in sources.citations] if sources else [],
                    "timings": asdict(event.timings),
                }
                print(json.dumps(payload, indent=2))
                continue
            print()
            if sources:
                _print_sources(sources)
            t = event.timings
            print(
                f"\nretrieve {t.retrieve_s * 1000:.0f} ms, prefill {t.prefill_s * 1000:.0f} ms "
                f"({t.num_prompt_tokens} tokens), decode {t.decode_s * 1000:.0f} ms "
                f"({t.num_completion_tokens} tokens)"
            )
    return 0
