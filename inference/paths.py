"""Where the appliance keeps its files: the data dir and the user's model dir."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "RAG_DATA_DIR"
MODEL_DIR_ENV = "RAG_MODEL_DIR"


def data_dir() -> Path:
    """$RAG_DATA_DIR, else $XDG_DATA_HOME/rag-appliance, else ~/.local/share/rag-appliance."""
    explicit = os.environ.get(DATA_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "rag-appliance"


def model_dir() -> Path | None:
    """The user's folder of model folders ($RAG_MODEL_DIR or --model-dir), if set."""
    explicit = os.environ.get(MODEL_DIR_ENV)
    return Path(explicit).expanduser() if explicit else None


def converted_models_dir() -> Path:
    """Cache of models converted once from packaged formats (GGUF) into mlx-lm folders."""
    return data_dir() / "models"
