"""Shared test set-up: every test runs against its own data dir, never the user's home."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture(scope="session", autouse=True)
def session_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Module- and session-scoped fixtures (servers, engines) are built before the per-test
    fixture below runs; this keeps whatever they write (e.g. the KV cache) out of the home dir."""
    root = tmp_path_factory.mktemp("session-data")
    saved = {name: os.environ.get(name) for name in ("RAG_DATA_DIR", "RAG_MODEL_DIR")}
    os.environ["RAG_DATA_DIR"] = str(root)
    os.environ.pop("RAG_MODEL_DIR", None)
    yield root
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def isolated_data_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Point the appliance's data and model dirs at a temp folder for every test."""
    root = tmp_path_factory.mktemp("data")
    monkeypatch.setenv("RAG_DATA_DIR", str(root))
    monkeypatch.delenv("RAG_MODEL_DIR", raising=False)
    return root
