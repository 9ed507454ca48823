"""`rag`: the appliance's command line. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from inference.paths import MODEL_DIR_ENV

from rag import ask, doctor, models_cli, mtp_cli, serve, tune_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rag",
        description="Local RAG appliance on MLX: ingest documents, then ask, serve and inspect.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    parser.add_argument(
        "--model-dir",
        metavar="DIR",
        help=f"a folder of your own model folders or .gguf files (default: ${MODEL_DIR_ENV})",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (ask, doctor, models_cli, mtp_cli, serve, tune_cli):
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model_dir:
        # Model resolution reads the setting from the environment, like every other process.
        os.environ[MODEL_DIR_ENV] = str(Path(args.model_dir).expanduser().resolve())
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
