"""The SSD tier's block file: a plain safetensors file that checks itself.

    [u64 header length][JSON header, space-padded to 8 bytes][keys bytes][values bytes]
    header.__metadata__: format_version, fingerprint, key, parent, num_tokens,
                         data_checksum ("crc32"), checksum
    header.keys/values:  dtype (F32, F16, BF16), shape (layers, kv_heads, num_tokens,
                         head_dim), data_offsets

`checksum` is a blake2b of the canonical JSON header (all but itself) and of a crc32 of each
tensor's bytes: the crc32 runs at memory speed (~3 GB/s here against blake2b's ~0.7 GB/s), so a
read checks 94 MB of blocks in ~30 ms, and it catches the damage a disk or a crash does
(truncation, flipped bits, torn writes); the key and fingerprint must match exactly. Files
written before `data_checksum` existed hash the data bytes themselves, and still read.

mx.load reads these files too (bfloat16 travels as its uint16 bits, so numpy can hold it).

Ignores: where files live and when they are read or written (kv_ssd.py), and MLX arrays.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMAT_VERSION = "1"
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # bf16 travels as raw bits


@dataclass(frozen=True)
class HostTensor:
    """A tensor on the host: the safetensors dtype code and a numpy array of its bits."""

    dtype: str  # "F32", "F16" or "BF16" (then `array` holds the raw bits as uint16)
    array: np.ndarray


def encode_block(
    metadata: Mapping[str, str], tensors: Mapping[str, HostTensor]
) -> list[bytes | memoryview]:
    """A safetensors file as byte strings: header length, JSON header, data (checksummed)."""
    header: dict[str, Any] = {"__metadata__": {**metadata, "data_checksum": _CRC32}}
    data: list[memoryview] = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name]
        raw = memoryview(np.ascontiguousarray(tensor.array)).cast("B")  # no copy
        header[name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.array.shape),
            "data_offsets": [offset, offset + raw.nbytes],
        }
        data.append(raw)
        offset += raw.nbytes
    header["__metadata__"]["checksum"] = _checksum(header, data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    return [struct.pack("<Q", len(text)), text, *data]


def decode_block(raw: bytes | memoryview, expected: Mapping[str, str]) -> dict[str, HostTensor]:
    """Parse and check a block file; ValueError says what does not match."""
    raw = memoryview(raw)
    if len(raw) < 8:
        raise ValueError(f"file of {len(raw)} bytes has no header")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > len(raw) - 8:
        raise ValueError(f"header of {header_len} bytes in a {len(raw)}-byte file")
    header = json.loads(bytes(raw[8 : 8 + header_len]))
    metadata = header["__metadata__"]
    for name, value in expected.items():
        if metadata.get(name) != value:
            raise ValueError(f"metadata {name}: got {metadata.get(name)!r}, wanted {value!r}")
    data = raw[8 + header_len :]
    tensors: dict[str, HostTensor] = {}
    views: list[memoryview] = []  # in the order of their offsets, as the checksum reads them
    for name in sorted(k for k in header if k != "__metadata__"):
        info = header[name]
        start, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        if not 0 <= start <= end <= len(data) or end - start != dtype.itemsize * int(
            np.prod(shape)
        ):
            raise ValueError(f"tensor {name}: offsets {start}..{end} do not fit {shape}")
        views.append(data[start:end])
        array = np.frombuffer(data[start:end], dtype=dtype).reshape(shape)
        tensors[name] = HostTensor(info["dtype"], array)
    # Files written before data_checksum existed hash the data itself (the whole data area).
    parts = views if metadata.get("data_checksum") == _CRC32 else [data]
    if _checksum(header, parts) != metadata.get("checksum"):
        raise ValueError("checksum mismatch")
    return tensors


_CRC32 = "crc32"  # data_checksum: the checksum hashes a crc32 of each tensor, not its bytes


def _checksum(header: Mapping[str, Any], data: Sequence[bytes | memoryview]) -> str:
    """blake2b of the header (all but the checksum itself, canonical JSON) and of the data: of
    each tensor's crc32 when data_checksum says so, else of the bytes themselves."""
    described = {k: v for k, v in header.items() if k != "__metadata__"}
    described["__metadata__"] = {k: v for k, v in header["__metadata__"].items() if k != "checksum"}
    digest = hashlib.blake2b(json.dumps(described, sort_keys=True).encode(), digest_size=16)
    crc = header["__metadata__"].get("data_checksum") == _CRC32
    for part in data:
        digest.update(struct.pack("<I", zlib.crc32(part)) if crc else part)
    return digest.hexdigest()
