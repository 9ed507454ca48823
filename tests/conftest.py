"""Shared test set-up: every test runs against its own data dir, never the user's home."""

from __future__ import annotations

from pathlib import Path

import inference  # noqa: F401  (loads the optimized BLAS before any test imports mlx)

import pytest

# Fixture modules: each builds one kind of tiny random model or test asset, with no download.
pytest_plugins = [
    "tests.fixtures.tiny_llama",
    "tests.fixtures.tiny_bert",
    "tests.fixtures.ingest_fakes",
    "tests.fixtures.live_server",
]


@pytest.fixture(autouse=True)
def isolated_data_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Point the appliance's data and model dirs at a temp folder for every test."""
    root = tmp_path_factory.mktemp("data")
    monkeypatch.setenv("RAG_DATA_DIR", str(root))
    monkeypatch.delenv("RAG_MODEL_DIR", raising=False)
    return root
