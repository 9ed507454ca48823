"""The head prefix store's SSD tier: prompts' head context survives a restart, checked on read."""

from __future__ import annotations

import os
from pathlib import Path

import inference  # noqa: F401  (loads the BLAS before mlx)
from inference.head_prefix_ssd import HeadPrefixSSD, prompt_key
from inference.head_prefix_store import HeadPrefixStore
from inference.kv_ssd_format import HostTensor

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache

from tests.unit.test_head_prefix_store import filled_caches, hiddens

HEAD = "head-fingerprint-1"


def tensors(num_tokens: int, seed: int) -> tuple[HostTensor, list[tuple[HostTensor, HostTensor]]]:
    rng = np.random.default_rng(seed)
    h = HostTensor("F32", rng.standard_normal((1, num_tokens, 4)).astype(np.float32))
    kv = rng.standard_normal((1, 2, num_tokens - 1, 3)).astype(np.float32)
    return h, [(HostTensor("F32", kv), HostTensor("F32", kv * 2))]


def written(folder: Path, prompts: list[list[int]], max_bytes: int = 1 << 20) -> HeadPrefixSSD:
    ssd = HeadPrefixSSD(folder, HEAD, max_bytes)
    for seed, tokens in enumerate(prompts):
        ssd.write(np.array(tokens), *tensors(len(tokens), seed))
        ssd.flush()
    return ssd


def test_a_prompt_is_found_by_its_start_after_a_restart(tmp_path: Path) -> None:
    written(tmp_path, [list(range(10, 30))]).close()
    ssd = HeadPrefixSSD(tmp_path, HEAD, 1 << 20)  # a new process: start-up reads headers
    assert len(ssd) == 1
    found = ssd.find(np.arange(10, 18))
    assert found is not None
    tokens, got = found
    want_h, [(_, want_v)] = tensors(20, seed=0)
    assert tokens.tolist() == list(range(10, 30))
    np.testing.assert_array_equal(got["hiddens"].array, want_h.array)
    np.testing.assert_array_equal(got["values.0"].array, want_v.array)
    assert ssd.find(np.array([10, 11, 99])) is None
    ssd.close()


def test_a_longer_prompt_replaces_the_one_it_extends(tmp_path: Path) -> None:
    ssd = written(tmp_path, [list(range(10, 20)), list(range(10, 30)), list(range(50, 60))])
    assert (
        len(ssd) == 2 and not (tmp_path / f"{prompt_key(np.arange(10, 20))}.safetensors").exists()
    )
    ssd.close()


def test_least_recently_used_prompts_go_past_the_budget_across_restarts(tmp_path: Path) -> None:
    prompts = [[k] * 3 + list(range(40)) for k in (1, 2, 3)]
    ssd = written(tmp_path, prompts[:2])
    size = ssd.num_bytes // 2
    os.utime(tmp_path / f"{prompt_key(np.array(prompts[0]))}.safetensors", (1, 1))  # oldest
    os.utime(tmp_path / f"{prompt_key(np.array(prompts[1]))}.safetensors", (2, 2))
    ssd.close()
    ssd = HeadPrefixSSD(tmp_path, HEAD, int(2.5 * size))
    assert ssd.find(np.array(prompts[0][:5])) is not None  # used: now the newest
    ssd.flush()
    ssd.write(np.array(prompts[2]), *tensors(len(prompts[2]), seed=2))
    ssd.flush()
    assert ssd.find(np.array(prompts[1][:5])) is None  # the least recently used went
    assert ssd.find(np.array(prompts[0][:5])) is not None
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    ssd.close()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_file_is_a_miss_and_is_deleted(tmp_path: Path, damage: str) -> None:
    written(tmp_path, [list(range(10, 30))]).close()
    (path,) = tmp_path.glob("*.safetensors")
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-5] ^= 0xFF  # a bit in the data: the header still reads, the checksum catches it
    else:
        raw = raw[:6]  # not even a header: start-up drops it
    path.write_bytes(bytes(raw))
    ssd = HeadPrefixSSD(tmp_path, HEAD, 1 << 20)
    assert ssd.find(np.arange(10, 15)) is None
    ssd.flush()
    assert not path.exists()
    ssd.close()


def test_start_up_removes_unfinished_writes_and_other_heads_files(tmp_path: Path) -> None:
    written(tmp_path, [list(range(10, 30))]).close()
    (tmp_path / "abc.safetensors.tmp").write_bytes(b"half a file")
    ssd = HeadPrefixSSD(tmp_path, "another-head", 1 << 20)
    assert len(ssd) == 0 and list(tmp_path.iterdir()) == []
    ssd.close()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_the_store_restores_from_ssd_after_a_restart(tmp_path: Path, dtype) -> None:
    prompt = list(range(10, 20))
    caches = filled_caches(11, seed=0)
    for cache in caches:
        cache.keys, cache.values = cache.keys.astype(dtype), cache.values.astype(dtype)
    h = hiddens(11, seed=0).astype(dtype)
    first = HeadPrefixStore()
    first.ssd = HeadPrefixSSD(tmp_path, HEAD, 1 << 20)
    first.store(prompt, caches, h)
    first.close()

    second = HeadPrefixStore()  # a restart: empty RAM, the same folder
    second.ssd = HeadPrefixSSD(tmp_path, HEAD, 1 << 20)
    fresh = [KVCache(), KVCache()]
    restored = second.restore([*prompt[:6], 77, 78], 6, fresh)
    assert restored is not None and restored.dtype == dtype
    assert mx.array_equal(restored, h[:, :6]).item()
    for cache, original in zip(fresh, caches, strict=True):
        assert cache.offset == 5
        assert mx.array_equal(cache.keys[..., :5, :], original.keys[..., :5, :]).item()
    assert len(second) == 1  # now in RAM too
    second.close()
