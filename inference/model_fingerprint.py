"""A model's identity for its KV cache: weights, config, tokenizer and dtype, never its path.

Two folders with the same files give the same fingerprint (a copy, a move, another machine);
a change that alters what the KV cache holds gives another one:

    weights     each *.safetensors: name, size, its JSON header (names, dtypes, shapes) and
                three 64 KiB samples of its data (start, middle, end)
    config      config.json, generation of the KV: heads, RoPE, norm eps ...
    tokenizer   tokenizer.json, tokenizer_config.json, tokenizer.model, vocab/merges ...
    dtype       what the loaded parameters are (a loader may cast)

Reading a few windows instead of whole files keeps it cheap (milliseconds for gigabytes); a
fine-tune changes every weight, so the samples tell two models of one shape apart.

Ignores: files mlx-lm does not load (READMEs, GGUF sources), and which MLX version computed the
KV (versions agree to rounding).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from pathlib import Path

FINGERPRINT_VERSION = 1  # bump when what goes into the fingerprint changes
_SAMPLE_BYTES = 64 * 1024
_TOKENIZER_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)


def fingerprint_model_dir(path: str | Path, dtype: str) -> str:
    """A 32-hex-digit fingerprint of the model folder as loaded with parameters of dtype."""
    folder = Path(path)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ValueError(f"{folder}: no *.safetensors weights to fingerprint")
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"model-fingerprint-v{FINGERPRINT_VERSION}\0dtype={dtype}\0".encode())
    for file in weights:
        _update(digest, file.name, _safetensors_summary(file))
    for name in _TOKENIZER_FILES:
        file = folder / name
        if file.is_file():
            _update(digest, name, [file.read_bytes()])
    return digest.hexdigest()


def parameters_dtype(parameters: Iterable[object]) -> str:
    """The sorted set of dtypes of a model's arrays, e.g. 'float32' or 'float16,uint32'."""
    names = {str(getattr(p, "dtype", type(p).__name__)) for p in parameters}
    return ",".join(sorted(n.removeprefix("mlx.core.") for n in names))


def _update(digest: hashlib._Hash, name: str, parts: list[bytes]) -> None:
    """Length-prefix everything, so no two different inputs hash the same byte stream."""
    digest.update(struct.pack("<Q", len(name)) + name.encode())
    for part in parts:
        digest.update(struct.pack("<Q", len(part)) + part)


def _safetensors_summary(file: Path) -> list[bytes]:
    """Size, header and three data samples of a safetensors file."""
    size = file.stat().st_size
    with file.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise ValueError(f"{file}: header of {header_len} bytes in a {size}-byte file")
        header = f.read(header_len)
        data_start = 8 + header_len
        data_len = size - data_start
        parts = [struct.pack("<Q", size), header]
        for offset in (0, data_len // 2, data_len - _SAMPLE_BYTES):
            f.seek(data_start + max(0, offset))
            parts.append(f.read(_SAMPLE_BYTES))
    return parts
