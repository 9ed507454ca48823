"""SSD tier and model fingerprints: files that survive a restart, and bad files that are never served."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from pathlib import Path

import inference  # noqa: F401  (loads the BLAS before mlx)
from inference.kv_blocks import block_keys
from inference.kv_ssd import HostTensor, SSDTier, decode_block, encode_block
from inference.model_fingerprint import fingerprint_model_dir

import mlx.core as mx
import numpy as np
import pytest

from tests.fixtures.tiny_llama import write_tiny_llama

FP = "f" * 32


def tensors(seed: int, dtype: str = "F32") -> dict[str, HostTensor]:
    rng = np.random.default_rng(seed)
    if dtype == "BF16":
        make = lambda: rng.integers(0, 2**16, (2, 2, 4, 8), dtype=np.uint16)  # noqa: E731
    else:
        make = lambda: rng.standard_normal((2, 2, 4, 8), dtype=np.float32)  # noqa: E731
    return {"keys": HostTensor(dtype, make()), "values": HostTensor(dtype, make())}


def same(a: dict[str, HostTensor], b: dict[str, HostTensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k].array, b[k].array) for k in a
    )


def chain_keys(n: int, offset: int = 0) -> list[str]:
    return block_keys([offset + i for i in range(4 * n)], 4, FP)


def fill(tier: SSDTier, keys: list[str], seed: int = 0) -> None:
    parent = None
    for i, key in enumerate(keys):
        assert tier.write(key, parent, tensors(seed + i), 4)
        parent = key
    tier.flush()


# -- fingerprints --------------------------------------------------------------------------------


def test_fingerprint_follows_contents_not_paths(tmp_path: Path) -> None:
    a = write_tiny_llama(tmp_path / "a")
    copy = tmp_path / "elsewhere" / "a-copy"
    shutil.copytree(a, copy)
    assert fingerprint_model_dir(a, "float32") == fingerprint_model_dir(copy, "float32")
    assert fingerprint_model_dir(a, "float32") != fingerprint_model_dir(a, "bfloat16")
    # Same shapes and header, other weights: the data samples tell them apart.
    b = write_tiny_llama(tmp_path / "b", seed=1)
    assert fingerprint_model_dir(a, "float32") != fingerprint_model_dir(b, "float32")
    tok = copy / "tokenizer_config.json"
    tok.write_text(tok.read_text().replace("<|im_end|>", "<|endoftext|>", 1))
    assert fingerprint_model_dir(a, "float32") != fingerprint_model_dir(copy, "float32")
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        fingerprint_model_dir(tmp_path, "float32")


# -- the file format -----------------------------------------------------------------------------


def test_block_files_are_plain_safetensors(tmp_path: Path) -> None:
    block = tensors(1)
    path = tmp_path / "block.safetensors"
    path.write_bytes(b"".join(encode_block({"key": "k", "fingerprint": FP}, block)))
    loaded, metadata = mx.load(str(path), return_metadata=True)
    assert metadata["key"] == "k" and len(metadata["checksum"]) == 32
    assert np.array_equal(np.array(loaded["keys"]), block["keys"].array)
    # bfloat16 travels as its bits and comes back bit for bit.
    bf16 = tensors(2, "BF16")
    raw = b"".join(encode_block({"key": "k"}, bf16))
    assert same(decode_block(raw, {"key": "k"}), bf16)


@pytest.mark.parametrize(
    "damage",
    ["truncate", "flip_data", "flip_header", "empty", "other_key", "other_fingerprint"],
)
def test_decode_rejects_damaged_or_foreign_files(damage: str) -> None:
    raw = bytearray(b"".join(encode_block({"key": "k", "fingerprint": FP}, tensors(3))))
    expected = {"key": "k", "fingerprint": FP}
    if damage == "truncate":
        raw = raw[: len(raw) - 100]
    elif damage == "flip_data":
        raw[-5] ^= 0x01
    elif damage == "flip_header":
        raw[raw.index(b'"shape":[2') + 9] ^= 0x02  # [2 -> [0: the checksum covers the header
    elif damage == "empty":
        raw = bytearray()
    elif damage == "other_key":
        expected["key"] = "other"
    else:
        expected["fingerprint"] = "0" * 32
    with pytest.raises((ValueError, KeyError, TypeError)):
        decode_block(bytes(raw), expected)


# -- the tier ------------------------------------------------------------------------------------


def test_blocks_survive_a_restart(tmp_path: Path) -> None:
    keys = chain_keys(3)
    tier = SSDTier.open(tmp_path, 1 << 20, FP)
    assert tier is not None
    fill(tier, keys)
    assert all(key in tier for key in keys) and tier.stats().num_writes == 3
    assert SSDTier.open(tmp_path, 1 << 20, FP) is None  # one engine per folder
    tier.close()

    reopened = SSDTier.open(tmp_path, 1 << 20, FP)
    assert reopened is not None
    assert [key in reopened for key in keys] == [True] * 3
    for i, key in enumerate(keys):
        got = reopened.read(key)
        assert got is not None and same(got, tensors(i))
    reopened.close()


def test_budget_evicts_lru_leaves_and_their_files(tmp_path: Path) -> None:
    block_bytes = 2 * 2 * 2 * 4 * 8 * 4
    tier = SSDTier.open(tmp_path, 4 * block_bytes, FP)
    assert tier is not None
    old, new = chain_keys(3), chain_keys(2, offset=1000)
    fill(tier, old)
    fill(tier, new, seed=10)  # 5 blocks > 4: the leaf of the older chain goes
    assert [key in tier for key in old] == [True, True, False]
    assert tier.stats().num_evictions == 1 and tier.stats().num_bytes == 4 * block_bytes
    tier.close()
    files = {p.stem for p in (tmp_path / "blocks").rglob("*.safetensors")}
    assert files == {*old[:2], *new}


def test_corrupt_or_truncated_files_are_misses_and_go_with_their_tails(tmp_path: Path) -> None:
    keys = chain_keys(3)
    tier = SSDTier.open(tmp_path, 1 << 20, FP)
    assert tier is not None
    fill(tier, keys)
    path = next((tmp_path / "blocks").rglob(f"{keys[1]}.safetensors"))
    path.write_bytes(path.read_bytes()[:-7])  # truncated
    assert tier.read(keys[1]) is None
    assert [key in tier for key in keys] == [True, False, False]  # its child is unreachable
    assert tier.stats().num_corrupt == 1
    tier.flush()
    assert not path.exists()
    # Rewritten correctly, it is served again.
    assert tier.write(keys[1], keys[0], tensors(1), 4)
    tier.flush()
    got = tier.read(keys[1])
    assert got is not None and same(got, tensors(1))
    tier.close()


def test_a_crash_leaves_nothing_that_is_served(tmp_path: Path) -> None:
    keys = chain_keys(3)
    tier = SSDTier.open(tmp_path, 1 << 20, FP)
    assert tier is not None
    fill(tier, keys)
    tier.close()
    blocks = tmp_path / "blocks"
    # What a kill -9 can leave: a temp file, a file renamed but without its row ...
    (blocks / "ab").mkdir(exist_ok=True)
    tmp_file = blocks / "ab" / "abcd.safetensors.123.tmp"
    tmp_file.write_bytes(b"partial")
    stray = blocks / "cd" / "cd00.safetensors"
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"no row")
    # ... and (a damaged index) a row whose parent is gone.
    db = sqlite3.connect(tmp_path / "index.sqlite")
    with db:
        db.execute("DELETE FROM blocks WHERE key = ?", (keys[0],))
    db.close()

    tier = SSDTier.open(tmp_path, 1 << 20, FP)
    assert tier is not None
    assert not any(key in tier for key in keys)  # the chain lost its root: all of it goes
    tier.flush()
    assert not tmp_file.exists() and not stray.exists()
    assert list(blocks.rglob("*.safetensors")) == []
    tier.close()


def test_a_block_without_its_chain_on_disk_is_not_spilled(tmp_path: Path) -> None:
    tier = SSDTier.open(tmp_path, 1 << 20, FP, max_pending_bytes=1500)
    assert tier is not None
    keys = chain_keys(2)
    assert not tier.write(keys[1], keys[0], tensors(0), 4)  # parent not on SSD
    assert tier.write(keys[0], None, tensors(0), 4)  # 1 KB pending
    assert not tier.write(keys[1], keys[0], tensors(1), 4)  # the writer is behind: dropped
    assert tier.stats().num_dropped == 2
    tier.close()


def test_index_opens_in_milliseconds(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "index.sqlite")
    db.execute(
        "CREATE TABLE blocks (key TEXT PRIMARY KEY, parent TEXT, num_bytes INTEGER NOT NULL, "
        "last_used INTEGER NOT NULL)"
    )
    db.execute("PRAGMA user_version=1")
    keys = chain_keys(5000)
    rows = [(k, keys[i - 1] if i else None, 1000, i) for i, k in enumerate(keys)]
    with db:
        db.executemany("INSERT INTO blocks VALUES (?, ?, ?, ?)", rows)
    db.close()
    started = time.perf_counter()
    tier = SSDTier.open(tmp_path, 1 << 30, FP)
    elapsed = time.perf_counter() - started
    assert tier is not None and keys[-1] in tier and tier.stats().num_blocks == 5000
    tier.close()  # (the rows have no files: reads would be misses)
    assert elapsed < 0.5, f"opening an index of 5000 blocks took {elapsed:.3f} s"


def test_files_written_before_crc32_checksums_still_decode() -> None:
    import hashlib
    import json
    import struct

    block = tensors(4)
    data = [np.ascontiguousarray(block[name].array).tobytes() for name in sorted(block)]
    header: dict = {"__metadata__": {"key": "k"}}
    offset = 0
    for name, raw in zip(sorted(block), data, strict=True):
        shape = list(block[name].array.shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    # The first format: blake2b of the canonical header and of the data bytes themselves.
    digest = hashlib.blake2b(json.dumps(header, sort_keys=True).encode(), digest_size=16)
    for raw in data:
        digest.update(raw)
    header["__metadata__"]["checksum"] = digest.hexdigest()
    text = json.dumps(header).encode()
    raw_file = struct.pack("<Q", len(text)) + text + b"".join(data)
    assert same(decode_block(raw_file, {"key": "k"}), block)
    damaged = bytearray(raw_file)
    damaged[-3] ^= 0x10
    with pytest.raises(ValueError, match="checksum"):
        decode_block(bytes(damaged), {"key": "k"})


def test_the_reader_thread_checks_converts_and_reports_in_order(tmp_path: Path) -> None:
    keys = chain_keys(3)
    converted: list[str] = []

    def convert(block: dict[str, HostTensor]) -> dict[str, HostTensor]:
        converted.append("x")
        return block

    tier = SSDTier.open(tmp_path, 1 << 20, FP, convert=convert)
    assert tier is not None
    fill(tier, keys)
    woken = threading.Event()
    tier.on_read = woken.set
    path = next((tmp_path / "blocks").rglob(f"{keys[2]}.safetensors"))
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    assert tier.request_reads(keys) == keys
    assert tier.request_reads(keys[:1]) == []  # already queued
    assert tier.is_reading(keys[0])
    assert woken.wait(10)
    results = tier.take_reads()
    assert [r.key for r in results] == keys and not tier.is_reading(keys[0])
    assert same(results[0].data, tensors(0)) and same(results[1].data, tensors(1))  # type: ignore[arg-type]
    assert results[2].data is None and "checksum" in (results[2].error or "")
    assert len(converted) == 2  # a bad file never reaches the conversion
    assert [key in tier for key in keys] == [True, True, False]
    assert tier.stats().num_corrupt == 1
    tier.close()


def test_token_ids_are_kept_for_partial_matches(tmp_path: Path) -> None:
    keys = chain_keys(2)
    tier = SSDTier.open(tmp_path, 1 << 20, FP)
    assert tier is not None
    assert tier.write(keys[0], None, tensors(0), 4, [0, 1, 2, 3])
    assert tier.write(keys[1], keys[0], tensors(1), 4, [4, 5, 6, 7])
    assert tier.write("tail", keys[0], tensors(2), 2, [4, 5])
    assert tier.write("unknown", keys[0], tensors(3), 4)  # no token ids: found by key only
    tier.flush()
    tier.close()
    reopened = SSDTier.open(tmp_path, 1 << 20, FP)
    assert reopened is not None
    assert reopened.children(None) == [(keys[0], (0, 1, 2, 3))]
    assert sorted(reopened.children(keys[0])) == [(keys[1], (4, 5, 6, 7)), ("tail", (4, 5))]
    reopened.close()
