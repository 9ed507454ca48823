#!/usr/bin/env bash
# Sets up (idempotently, with test tools) and runs the whole check: lint, layering, tests.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k embedder
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports
.venv/bin/python -m pytest -m "not slow" "$@"
