"""`rag doctor`: check the install and say what the appliance runs on.

Prints versions, device, BLAS (and its measured speed), model paths, data dir and the SQLite
driver; exits non-zero when something the appliance needs is broken. A slow BLAS is a warning:
everything works, only slower.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from inference.chat_model import ModelNotFoundError, default_chat_model_entry
from inference.diagnostics import runtime_report
from inference.embedder import Embedder, EmbedderNotInstalledError, default_embedder_path
from inference.mtp_head import describe_head
from inference.paths import data_dir, model_dir

from ingest import sqlite
from ingest.store import SqliteVecStore

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok / warn / fail
    detail: str


def _check_runtime() -> list[Check]:
    report = runtime_report()
    blas = report.blas
    where = f"{blas.path}, {blas.detail}" if blas.path else blas.detail
    blas_detail = f"{blas.name} ({where}), fp32 matmul {report.matmul_gflops:.1f} GFLOP/s"
    return [
        Check("python", OK, report.python),
        Check("mlx", OK, f"{report.mlx} (mlx-lm {report.mlx_lm})"),
        Check("device", OK, report.device),
        Check("blas", OK if blas.optimized else WARN, blas_detail),
    ]


def _check_data_dir() -> list[Check]:
    root = data_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root):
            pass
    except OSError as exc:
        return [Check("data dir", FAIL, f"{root}: not writable ({exc}); set RAG_DATA_DIR")]
    user_models = model_dir()
    checks = [Check("data dir", OK, str(root))]
    if user_models is not None:
        exists = user_models.is_dir()
        checks.append(
            Check(
                "model dir",
                OK if exists else FAIL,
                f"{user_models}" + ("" if exists else " (missing)"),
            )
        )
    return checks


def _check_embedder() -> list[Check]:
    try:
        path = default_embedder_path()
        embedder = Embedder.load(path)
        vectors = embedder.embed(["doctor check"]).vectors
    except (EmbedderNotInstalledError, OSError, ValueError) as exc:
        return [Check("embedder", FAIL, f"{exc}")]
    return [Check("embedder", OK, f"{embedder.name}, dim {vectors.shape[1]}, {path}")]


def _check_chat_model() -> list[Check]:
    try:
        entry = default_chat_model_entry()
    except ModelNotFoundError as exc:
        return [Check("chat model", FAIL, str(exc))]
    if not entry.ready:
        return [
            Check("chat model", FAIL, f"{entry.name} not converted yet: run `rag models prepare`")
        ]
    checks = [Check("chat model", OK, f"{entry.name}, {entry.path}")]
    head = describe_head(entry.path)
    if head is None:
        detail = "none: plain decoding only (`rag mtp fit` fits one)"
        checks.append(Check("mtp head", WARN, detail))
    else:
        checks.append(Check("mtp head", OK, f"{head}; `rag tune` picks its depth here"))
    return checks


def _check_sqlite() -> list[Check]:
    driver = f"{sqlite.driver.__name__} (SQLite {sqlite.sqlite_version()})"
    try:
        with tempfile.TemporaryDirectory() as tmp, SqliteVecStore.open(Path(tmp) / "check.db"):
            pass
    except Exception as exc:  # whatever the cause, no index can be built
        return [Check("sqlite", FAIL, f"{driver}: cannot open an index with sqlite-vec: {exc}")]
    return [Check("sqlite", OK, f"{driver}, sqlite-vec {metadata.version('sqlite-vec')}")]


CHECKS: list[Callable[[], list[Check]]] = [
    _check_runtime,
    _check_data_dir,
    _check_sqlite,
    _check_embedder,
    _check_chat_model,
]


def run_checks() -> list[Check]:
    return [check for run in CHECKS for check in run()]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("doctor", help="check the install; non-zero exit when broken")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    checks = run_checks()
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        marks = {OK: "ok  ", WARN: "WARN", FAIL: "FAIL"}
        for check in checks:
            print(f"[{marks[check.status]}] {check.name:<11} {check.detail}")
    failed = [c.name for c in checks if c.status == FAIL]
    if failed and not args.json:
        print(f"\nbroken: {', '.join(failed)}. Run `bash scripts/setup.sh` from the project root.")
    return 1 if failed else 0
