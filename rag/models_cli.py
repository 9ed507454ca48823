"""`rag models`: list the chat and embedding models, and prepare (convert) the default one."""

from __future__ import annotations

import argparse
import json

from inference.chat_model import ModelNotFoundError, default_chat_model, list_chat_models
from inference.embedder import EmbedderNotInstalledError, default_embedder_path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models", help="list models; `rag models prepare` converts the default chat model"
    )
    parser.add_argument(
        "action",
        nargs="?",
        choices=["list", "prepare"],
        default="list",
        help="list (default): what can be loaded; prepare: convert the default chat model once",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run)


def _rows() -> list[dict[str, object]]:
    rows: list[dict[str, object]] = [
        {"kind": "chat", "name": e.name, "path": str(e.path), "ready": e.ready, "source": e.source}
        for e in list_chat_models()
    ]
    try:
        path = default_embedder_path()
        rows.append({"kind": "embedding", "name": path.name, "path": str(path), "ready": True})
    except EmbedderNotInstalledError as exc:
        rows.append(
            {"kind": "embedding", "name": "all-MiniLM-L6-v2", "ready": False, "error": str(exc)}
        )
    return rows


def run(args: argparse.Namespace) -> int:
    if args.action == "prepare":
        try:
            path = default_chat_model()
        except ModelNotFoundError as exc:
            print(f"error: {exc}")
            return 1
        print(f"default chat model ready: {path}")
        return 0
    rows = _rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        state = "ready" if row["ready"] else "not prepared (rag models prepare)"
        where = row.get("path") or row.get("error")
        print(f"{row['kind']:<10} {row['name']:<28} {state:<10} {where}")
    return 0
