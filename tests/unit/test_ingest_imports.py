"""Import rules of the ingest package that import-linter does not express per module."""

from __future__ import annotations

import re
from pathlib import Path

INGEST = Path(__file__).resolve().parents[2] / "ingest"
_IMPORT = re.compile(r"^\s*(?:from|import)\s+([\w.]+)", re.MULTILINE)


def imports_of(path: Path) -> set[str]:
    return {name.split(".")[0] for name in _IMPORT.findall(path.read_text())}


def test_sqlite_vec_only_in_the_store_and_no_mlx_or_rag() -> None:
    for path in sorted(INGEST.rglob("*.py")):
        names = imports_of(path)
        relative = path.relative_to(INGEST.parent).as_posix()
        if relative != "ingest/store.py":
            assert "sqlite_vec" not in names, relative
        assert not names & {"mlx", "mlx_lm", "rag"}, relative


def test_importing_the_cli_loads_no_mlx() -> None:
    import subprocess
    import sys

    code = "import sys, ingest.cli; print('mlx' in sys.modules or 'mlx.core' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=INGEST.parent
    )
    assert out.stdout.strip() == "False"  # the model code loads only when a file needs it
