"""Fused attention: same outputs as MLX's kernel for every mask form, same parameters."""

from __future__ import annotations

import logging
from pathlib import Path

import inference  # noqa: F401  (loads the BLAS before mlx)
from inference import fast_math, fused_attention
from inference.fused_attention import FusedAttention, cpu_attention, fuse_attention_layers
from inference.numpy_attention import numpy_attention

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.models import qwen3
from mlx_lm.models.cache import make_prompt_cache


def _qkv(batch: int, length: int, keys: int, heads: int = 6, kv_heads: int = 2):
    q = mx.random.normal((batch, heads, length, 16)) * 2
    k = mx.random.normal((batch, kv_heads, keys, 16)) * 2
    v = mx.random.normal((batch, kv_heads, keys, 16))
    return q, k, v


def _batched_mask(lengths: list[int], length: int, keys: int) -> mx.array:
    """(rows, 1, L, T) bool: row r's L queries are its last L positions."""
    positions = mx.array(lengths)[:, None] - length + mx.arange(length)[None]
    return (mx.arange(keys)[None, None, :] <= positions[:, :, None])[:, None]


@pytest.mark.parametrize(
    ("batch", "length", "keys", "mask"),
    [
        (1, 1, 40, None),
        (1, 7, 40, "causal"),
        (3, 1, 33, "rows"),
        (3, 4, 50, "rows"),
        (2, 5, 20, "additive"),
    ],
)
def test_cpu_attention_matches_mlx(batch: int, length: int, keys: int, mask: str | None) -> None:
    q, k, v = _qkv(batch, length, keys)
    lengths = [keys - 3 * row for row in range(batch)]
    mask_arg: object = mask
    if mask in ("rows", "additive"):
        mask_arg = _batched_mask(lengths, length, keys)
        if mask == "additive":
            mask_arg = mx.where(mask_arg, 0.0, -mx.inf)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask_arg)
    got = cpu_attention(q, k, v, 0.25, mask_arg)
    assert got.shape == want.shape
    assert mx.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_masked_keys_get_exactly_zero_weight() -> None:
    # Garbage past a row's length (a slot's stale keys) must not leak in, however large.
    q, k, v = _qkv(2, 1, 30)
    mask = _batched_mask([20, 30], 1, 30)
    poisoned = mx.concatenate([v[:, :, :20], mx.full(v[:, :, 20:].shape, 1e30)], axis=2)
    clean = cpu_attention(q, k, v, 0.25, mask)
    got = cpu_attention(
        q, k, mx.where(mx.arange(30)[None, None, :, None] < 20, poisoned, v), 0.25, mask
    )
    assert mx.array_equal(got[0], clean[0])


def test_exp_shifted_matches_exact() -> None:
    d = np.linspace(-29.9, 0, 20001, dtype=np.float32)
    ratio = np.array(fast_math.exp_shifted(mx.array(d))) / np.exp(d.astype(np.float64))
    assert np.abs(ratio - 1).max() < 2e-5
    assert np.array(fast_math.exp_shifted(mx.array([-30.5, -1e4, -1e6]))).tolist() == [0, 0, 0]


def test_fused_llama_matches_with_a_cache(tiny_llama_path: Path) -> None:
    model, _ = load(str(tiny_llama_path))
    before = dict(tree_flatten(model.parameters()))
    prompt, step = mx.array([[3, 17, 42, 9, 100, 7, 8, 11]]), mx.array([[5]])
    stock_cache = make_prompt_cache(model)
    want = [model(prompt, cache=stock_cache), model(step, cache=stock_cache)]
    assert fuse_attention_layers(model) == len(model.model.layers)
    assert all(isinstance(layer.self_attn, FusedAttention) for layer in model.model.layers)
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    fused_cache = make_prompt_cache(model)
    got = [model(prompt, cache=fused_cache), model(step, cache=fused_cache)]
    for g, w in zip(got, want, strict=True):
        assert mx.allclose(g, w, rtol=1e-4, atol=1e-4)
        assert mx.array_equal(g.argmax(-1), w.argmax(-1))
    assert fuse_attention_layers(model) == 0  # idempotent


def test_fused_qwen3_attention_with_norms_matches() -> None:
    args = qwen3.ModelArgs.from_dict(
        {
            "model_type": "qwen3",
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6,
            "vocab_size": 50,
            "head_dim": 8,
            "rope_theta": 10000.0,
            "max_position_embeddings": 128,
            "tie_word_embeddings": True,
        }
    )
    attention = qwen3.Attention(args)
    x = mx.random.normal((2, 6, 32))
    assert mx.allclose(FusedAttention(attention)(x, mask="causal"), attention(x, mask="causal"),
                       rtol=1e-4, atol=1e-5)  # fmt: skip


class _OtherAttention(nn.Module):
    """Looks like an attention layer, computes something else: must never be swapped."""

    def __init__(self) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.scale = 2, 2, 0.5
        self.q_proj = nn.Linear(8, 8, bias=False)
        self.k_proj = nn.Linear(8, 8, bias=False)
        self.v_proj = nn.Linear(8, 8, bias=False)
        self.o_proj = nn.Linear(8, 8, bias=False)
        self.rope = nn.RoPE(4)

    def __call__(self, x: mx.array, mask: object = None, cache: object = None) -> mx.array:
        return self.o_proj(self.v_proj(x))


def test_probe_refuses_a_class_whose_output_differs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    known = {*fused_attention._ATTENTION_CLASSES, (_OtherAttention.__module__, "_OtherAttention")}
    monkeypatch.setattr(fused_attention, "_ATTENTION_CLASSES", known)
    holder = nn.Module()
    holder.layers = [_OtherAttention()]
    with caplog.at_level(logging.WARNING, logger="inference.module_swap"):
        assert fuse_attention_layers(holder) == 0
    assert "differs from the fused attention" in caplog.text
    assert isinstance(holder.layers[0], _OtherAttention)


@pytest.mark.parametrize(
    ("batch", "length", "keys", "mask"),
    [
        (1, 40, 40, "causal"),
        (1, 33, 90, "causal"),
        (3, 36, 70, "rows"),
        (2, 40, 64, "additive"),
        (1, 32, 50, None),
    ],
)
def test_numpy_attention_matches_mlx(batch: int, length: int, keys: int, mask: str | None) -> None:
    q, k, v = _qkv(batch, length, keys)
    mask_arg: object = mask
    if mask in ("rows", "additive"):
        mask_arg = _batched_mask([keys - 5 * row for row in range(batch)], length, keys)
        if mask == "additive":
            mask_arg = mx.where(mask_arg, 0.0, -mx.inf)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask_arg)
    got = numpy_attention(q, k, v, 0.25, mask_arg)
    assert mx.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_long_chunks_take_the_numpy_path(
    tiny_llama_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = load(str(tiny_llama_path))
    prompt = mx.array([list(range(3, 3 + fused_attention.NUMPY_MIN_QUERIES + 8))])
    want = model(prompt, cache=make_prompt_cache(model))
    fuse_attention_layers(model)
    calls: list[int] = []
    real = fused_attention.numpy_attention

    def counting(*args: object) -> mx.array:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(fused_attention, "numpy_attention", counting)
    got = model(prompt, cache=make_prompt_cache(model))
    assert len(calls) == len(model.model.layers)
    assert mx.allclose(got, want, rtol=1e-4, atol=1e-4)
