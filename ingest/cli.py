"""`ingest FOLDER...`: the command line over `ingest.pipeline.run_ingest`.

Parses flags (one per `IngestConfig` field, plus --db, --model, --json, --quiet), opens the
store, runs, prints a summary or JSON, and maps the outcome to an exit status. The console
script `ingest = "ingest.cli:main"` and `python -m ingest` both land in `main`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from ingest.config import IngestConfig, default_db_path
from ingest.errors import IngestError
from ingest.loaders import LOADERS
from ingest.pipeline import run_ingest
from ingest.progress import NullProgress, ProgressSink, RichProgress
from ingest.protocols import TextEmbedder
from ingest.report import IngestReport
from ingest.store import SqliteVecStore

EXIT_OK = 0
EXIT_FILES_FAILED = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
_MAX_FAILURES_SHOWN = 50

EmbedderLoader = Callable[[Path | None], TextEmbedder]

_DESCRIPTION = """\
Index documents for retrieval: read every supported file under FOLDER (or the FILEs given),
split it into chunks measured in the embedding model's tokens, embed the chunks, and store
text, vectors (sqlite-vec, cosine) and keywords (SQLite FTS5, BM25) in one SQLite file.
Run it again after editing the folder: only what changed is re-embedded."""


def _epilog() -> str:
    formats = "\n".join(f"  {loader.name:<9} {' '.join(loader.suffixes)}" for loader in LOADERS)
    return f"""\
file types:
{formats}
  Other files are skipped and counted (not an error). Hidden files and folders are skipped
  unless --include-hidden; .git, .hg and .svn are never read.

incremental runs:
  A file whose size and modification time are unchanged is skipped without being read
  (--check-hashes reads and hashes it anyway). A file with new content replaces its old
  chunks in one transaction. A change of --chunk-tokens / --chunk-overlap (or of a loader)
  re-chunks the files it applies to.

deleted files (--prune, the default):
  Documents stored under the given FOLDERs whose files no longer exist are removed from the
  index. Documents under other folders are never touched; --no-prune keeps everything. A
  folder that cannot be listed keeps its documents.

failures:
  A file that cannot be read (corrupt, encrypted, empty, not UTF-8, too large) is reported
  with the reason and skipped; the other files are ingested. If an older version of it was
  indexed, that version is removed, so the index matches what is readable now.

crash safety:
  Each document is written in one SQLite transaction (WAL mode). After a crash, kill -9 or
  Ctrl-C the index is consistent (every document wholly old or wholly new); run the same
  command again to finish the work.

embedding model:
  The model's identity is recorded in the index on first use. A different model is refused
  unless --reembed, which empties the index and embeds the given FOLDERs again (documents
  from other folders must be ingested again too). The model is loaded only when some file
  needs embedding, so a run where nothing changed does not check --model against the index.
  Chunks never exceed the model's maximum input length.

exit status:
  0 all files ingested or unchanged; 1 some files failed (the rest was ingested);
  2 the run could not start or stopped on an error; 130 interrupted (Ctrl-C).

environment:
  RAG_DATA_DIR  where the default index lives ({default_db_path()})

examples:
  ingest ./docs
  ingest ./docs ./notes/todo.md --db /tmp/test.sqlite3 --json
  ingest ./docs --model ~/models/all-MiniLM-L6-v2 --reembed
"""


def build_parser() -> argparse.ArgumentParser:
    defaults = IngestConfig()
    parser = argparse.ArgumentParser(
        prog="ingest",
        description=_DESCRIPTION,
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="FOLDER|FILE", type=Path, help="what to index")
    parser.add_argument(
        "--db",
        type=Path,
        default=None,
        metavar="PATH",
        help="index file (default: $RAG_DATA_DIR/index.sqlite3)",
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="FOLDER",
        help="sentence-transformers model folder (default: the packaged all-MiniLM-L6-v2)",
    )
    parser.add_argument(
        "--chunk-tokens",
        type=int,
        metavar="N",
        default=defaults.chunk_tokens,
        help="content tokens per chunk, capped at the model's maximum (default: %(default)s)",
    )
    parser.add_argument(
        "--chunk-overlap",
        type=int,
        metavar="N",
        default=defaults.chunk_overlap,
        help="tokens shared by consecutive chunks of a section, at most a quarter of the chunk "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--prune",
        action=argparse.BooleanOptionalAction,
        default=defaults.prune,
        help="remove documents whose files are gone from the given folders (default: on)",
    )
    parser.add_argument(
        "--reembed",
        action="store_true",
        help="the index was built with another model: empty it and embed with this one",
    )
    parser.add_argument(
        "--check-hashes",
        action="store_true",
        help="read and hash every file even when its size and mtime are unchanged",
    )
    parser.add_argument(
        "--include-hidden", action="store_true", help="also read dot-files and dot-folders"
    )
    parser.add_argument(
        "--max-file-mb",
        type=float,
        metavar="MB",
        default=defaults.max_file_mb,
        help="larger files are reported as failed, not read (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        default=defaults.batch_size,
        help="chunks per call to the embedding model (default: %(default)s)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the report as one JSON object on stdout"
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return parser


def load_embedder(model: Path | None) -> TextEmbedder:
    """The appliance's MLX embedder from `inference` (imported only when a file needs it)."""
    from inference.embedder import Embedder, default_embedder_path

    try:
        path = (model or default_embedder_path()).expanduser()
        return Embedder.load(path)
    except (OSError, ValueError) as exc:  # not installed, not a model folder, bad config
        raise IngestError(f"cannot load the embedding model: {exc} (see --model)") from exc


def _print_report(console: Console, report: IngestReport) -> None:
    style = "green" if report.ok else "yellow"
    console.print(f"[{style}]{escape(report.summary_line())}[/]")
    console.print(f"index: {escape(report.db_path)}")
    if report.skipped_by_suffix:
        kinds = ", ".join(f"{suffix} {n}" for suffix, n in report.skipped_by_suffix.most_common(8))
        console.print(f"skipped types: {escape(kinds)}")
    if report.num_truncated:
        console.print(f"[yellow]{report.num_truncated} chunks were truncated by the model[/]")
    for failure in report.failures[:_MAX_FAILURES_SHOWN]:
        console.print(f"[red]failed[/] {escape(failure.path)}: {escape(failure.reason)}")
    if report.failed > _MAX_FAILURES_SHOWN:
        console.print(f"... and {report.failed - _MAX_FAILURES_SHOWN} more (--json lists all)")
    if report.interrupted:
        console.print("[yellow]interrupted: run the same command again to finish[/]")


def main(
    argv: Sequence[str] | None = None, *, embedder_loader: EmbedderLoader | None = None
) -> int:
    """Run `ingest`; `embedder_loader` replaces how the model is loaded (another embedder)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    stdout = Console(highlight=False, soft_wrap=True)
    stderr = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        config = IngestConfig(
            chunk_tokens=args.chunk_tokens,
            chunk_overlap=args.chunk_overlap,
            prune=args.prune,
            reembed=args.reembed,
            check_hashes=args.check_hashes,
            include_hidden=args.include_hidden,
            max_file_mb=args.max_file_mb,
            batch_size=args.batch_size,
        )
    except ValueError as exc:
        parser.error(str(exc))
    db_path = (args.db or default_db_path()).expanduser().resolve()
    loader = embedder_loader or load_embedder
    progress: ProgressSink = NullProgress()
    if not (args.json or args.quiet) and stderr.is_terminal:
        progress = RichProgress(stderr)
    try:
        with SqliteVecStore.open(db_path) as store:
            report = run_ingest(
                args.paths,
                store,
                lambda: loader(args.model),
                config,
                progress,
                db_path=str(db_path),
            )
    except IngestError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        else:
            stderr.print(f"[red]error:[/] {escape(str(exc))}")
        return EXIT_ERROR
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        _print_report(stdout, report)
    if report.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if report.ok else EXIT_FILES_FAILED
