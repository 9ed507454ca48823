"""Settings measured for one model on this machine (`rag tune`), kept in the data dir.

    $RAG_DATA_DIR/model-settings/<fingerprint>.json   {"mtp_depth": 0..3, "measured": {...}}

Keyed by the model folder's fingerprint (model_fingerprint.py), so a changed or re-converted model
is measured afresh and a read-only model folder (a package) still gets its settings.

Ignores: how the settings are measured (rag/tune_cli.py) and applied (Engine.from_path).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from inference.paths import data_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSettings:
    """What `rag tune` chose: the MTP draft depth (0: plain decoding is fastest here)."""

    mtp_depth: int
    measured: dict[str, Any] = field(default_factory=dict)  # tok/s per mode, sampling, device

    def __post_init__(self) -> None:
        if self.mtp_depth not in (0, 1, 2, 3):
            raise ValueError(f"mtp_depth must be 0..3, got {self.mtp_depth!r}")


def model_key(model_dir: Path, model: Any) -> str:
    """The fingerprint a loaded model's settings are kept under (its folder, in its dtype)."""
    from inference.model_fingerprint import fingerprint_model_dir, parameters_dtype

    from mlx.utils import tree_flatten

    dtype = parameters_dtype(v for _, v in tree_flatten(model.parameters()))
    return fingerprint_model_dir(model_dir, dtype)


def settings_path(fingerprint: str) -> Path:
    return data_dir() / "model-settings" / f"{fingerprint}.json"


def read_model_settings(fingerprint: str) -> ModelSettings | None:
    """The tuned settings of this model, or None (never tuned, or an unreadable file: logged)."""
    path = settings_path(fingerprint)
    try:
        raw = json.loads(path.read_text())
        return ModelSettings(int(raw["mtp_depth"]), dict(raw.get("measured", {})))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable model settings %s: %s", path, exc)
        return None


def write_model_settings(fingerprint: str, settings: ModelSettings) -> Path:
    """Write atomically (a killed tune leaves the old file or the new one, never half)."""
    path = settings_path(fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(asdict(settings), indent=2) + "\n")
    os.replace(partial, path)
    return path
