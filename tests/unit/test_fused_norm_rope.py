"""RMSNorm and RoPE in fused operations: the fallback's outputs to the bit, same parameters."""

from __future__ import annotations

from pathlib import Path

import inference  # noqa: F401  (loads the BLAS before mlx)
from inference.fused_norm import FusedRMSNorm, fuse_rms_norms
from inference.fused_rope import FusedRoPE, fuse_rope

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("offset", [0, 5, 4093])
def test_rope_equals_the_fallback(dtype, offset) -> None:
    rope = nn.RoPE(64, traditional=False, base=100000.0)
    fused = FusedRoPE(rope)
    for length in (1, 3, 17):
        x = (mx.random.normal((2, 9, length, 64), key=mx.random.key(length)) * 3).astype(dtype)
        assert mx.array_equal(fused(x, offset=offset), rope(x, offset=offset)).item()


def test_rope_with_an_offset_per_row_and_partial_dims() -> None:
    rope = nn.RoPE(16, traditional=False, base=10000.0, scale=0.5)  # 16 of 24 dims rotate
    fused = FusedRoPE(rope)
    x = mx.random.normal((3, 4, 2, 24), key=mx.random.key(1))
    offsets = mx.array([0, 9, 700])
    assert mx.array_equal(fused(x, offset=offsets), rope(x, offset=offsets)).item()
    # The pass's angles are shared by its layers: a new offset must not reuse the old ones.
    again = mx.array([1, 2, 3])
    assert mx.array_equal(fused(x, offset=again), rope(x, offset=again)).item()


def test_traditional_rope_keeps_mlx_own() -> None:
    rope = nn.RoPE(32, traditional=True)
    x = mx.random.normal((1, 2, 3, 32), key=mx.random.key(2))
    assert mx.array_equal(FusedRoPE(rope)(x, offset=4), rope(x, offset=4)).item()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_rms_norm_equals_the_fallback(dtype) -> None:
    norm = nn.RMSNorm(48, eps=1e-5)
    norm.weight = mx.random.normal((48,), key=mx.random.key(3)).astype(dtype)
    fused = FusedRMSNorm(norm)
    for shape in ((1, 1, 48), (4, 3, 48), (1, 70, 48)):
        x = (mx.random.normal(shape, key=mx.random.key(4)) * 5).astype(dtype)
        assert mx.array_equal(fused(x), norm(x)).item()


def test_swapped_llama_keeps_weights_and_logits(tiny_llama_path: Path) -> None:
    model, _ = load(str(tiny_llama_path))
    before = dict(tree_flatten(model.parameters()))
    prompt, step = mx.array([[3, 17, 42, 9, 100, 7]]), mx.array([[11]])
    cache = make_prompt_cache(model)
    want = [model(prompt, cache=cache), model(step, cache=cache)]
    num_layers = len(model.model.layers)
    assert fuse_rms_norms(model) == 2 * num_layers + 1
    assert fuse_rope(model) == num_layers
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    cache = make_prompt_cache(model)
    got = [model(prompt, cache=cache), model(step, cache=cache)]
    assert all(mx.array_equal(g, w).item() for g, w in zip(got, want, strict=True))
    assert fuse_rms_norms(model) == fuse_rope(model) == 0  # idempotent
