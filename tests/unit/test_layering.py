"""The dependency direction rag -> ingest -> inference holds (import-linter contracts)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_hold() -> None:
    lint_imports = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(lint_imports).exists():
        pytest.fail("import-linter is not installed: run `bash scripts/setup.sh --dev`")
    result = subprocess.run([lint_imports], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_inference_imports_nothing_of_ours() -> None:
    offenders = []
    for path in (ROOT / "inference").rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ingest", "from ingest", "import rag", "from rag")):
                offenders.append(f"{path.relative_to(ROOT)}: {stripped}")
    assert offenders == []
