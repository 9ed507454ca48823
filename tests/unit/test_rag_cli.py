"""`rag` command line: --model-dir reaches model resolution; models lists what it finds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rag.cli import main


def test_model_dir_flag_lists_user_models(
    tmp_path: Path,
    tiny_llama_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAG_MODEL_DIR", "")  # main() sets it; monkeypatch restores it after
    user_models = tmp_path / "models"
    user_models.mkdir()
    (user_models / "tiny").symlink_to(tiny_llama_path, target_is_directory=True)
    assert main(["--model-dir", str(user_models), "models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    mine = [r for r in rows if r.get("source") == "model dir"]
    assert [(r["name"], r["ready"]) for r in mine] == [("tiny", True)]


def test_unknown_subcommand_exits_with_usage() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fly"])
    assert exit_info.value.code == 2
