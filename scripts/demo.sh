#!/usr/bin/env bash
# The main job on the embedded defaults: set up (idempotent), index examples/docs/, answer a
# question about it with citations. Pass your own question as the first argument.
#   bash scripts/demo.sh ["question"]
set -euo pipefail
cd "$(dirname "$0")/.."
question=${1:-"When are the public observing nights held?"}
bash scripts/setup.sh
printf '\033[1m== indexing examples/docs\033[0m\n'
.venv/bin/ingest examples/docs
printf '\033[1m== rag ask "%s"\033[0m\n' "$question"
.venv/bin/rag ask "$question"
