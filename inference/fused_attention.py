"""Attention layers with a CPU-fast softmax, swapped into an mlx-lm model on a CPU device.

On MLX's CPU backend `mx.fast.scaled_dot_product_attention` is matmul, softmax, matmul, and the
softmax's exp runs one element at a time (~40 Melem/s here, `fast_math`): for a 256-token
prefill chunk over 2k keys it is 94% of the layer's attention (110 of 117 ms). `FusedAttention`
keeps the layer's projections, norms and RoPE under the same names and computes

    scores = (q * scale) k^T, masked keys at -1e4
    weights = exp(scores - rowmax) in one SIMD loop (`fast_math.exp_shifted`), exactly 0 for
              masked keys and keys more than 30 below the row's best (weight < 1e-13)
    out = (weights v) / sum(weights)

with grouped-query heads as extra query rows of their key-value head (no repeated K/V).
A prefill chunk (>= NUMPY_MIN_QUERIES queries) attends in NumPy instead (`numpy_attention`).
The swap replaces submodules, as `nn.quantize` does; mlx-lm's code is untouched. Each class is
swapped only after a probe shows both give the same output. Half-precision layers keep MLX's
kernel.
"""

from __future__ import annotations

from typing import Any

from inference.fast_math import exp_shifted
from inference.module_swap import outputs_match, probe_input, swap_modules
from inference.numpy_attention import numpy_attention

import mlx.core as mx
import mlx.nn as nn

# Attention classes whose __call__ is: project, reshape to heads, (q/k norm), RoPE at the
# cache offset, cache update, SDPA, merge heads, o_proj.
_ATTENTION_CLASSES = {("mlx_lm.models.llama", "Attention"), ("mlx_lm.models.qwen2", "Attention"),
                      ("mlx_lm.models.qwen3", "Attention")}  # fmt: skip
_MASKED = -1e4  # a masked score: far below any real one, small enough for exp_shifted's clip
# Chunks of at least this many queries (prefill) attend in NumPy: 4x faster, at the price of
# evaluating q, k and v mid-graph; decode and verify rows stay lazy in MLX.
NUMPY_MIN_QUERIES = 32


class FusedAttention(nn.Module):
    """An mlx-lm attention layer's own modules, with `cpu_attention` as its core."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "rope"):
            if name in attention:
                setattr(self, name, attention[name])
        self.n_heads: int = attention.n_heads
        self.n_kv_heads: int = attention.n_kv_heads
        self.scale: float = attention.scale

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        batch, length, _ = x.shape
        queries = self.q_proj(x).reshape(batch, length, self.n_heads, -1)
        keys = self.k_proj(x).reshape(batch, length, self.n_kv_heads, -1)
        values = self.v_proj(x).reshape(batch, length, self.n_kv_heads, -1)
        if "q_norm" in self:
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        queries = queries.transpose(0, 2, 1, 3)
        keys = keys.transpose(0, 2, 1, 3)
        values = values.transpose(0, 2, 1, 3)
        if cache is not None:
            queries = self.rope(queries, offset=cache.offset)
            keys = self.rope(keys, offset=cache.offset)
            keys, values = cache.update_and_fetch(keys, values)
        else:
            queries, keys = self.rope(queries), self.rope(keys)
        if queries.dtype == mx.float32 and queries.shape[2] >= NUMPY_MIN_QUERIES:
            output = numpy_attention(queries, keys, values, self.scale, mask)
        elif queries.dtype == mx.float32:
            output = cpu_attention(queries, keys, values, self.scale, mask)
        else:
            output = mx.fast.scaled_dot_product_attention(
                queries, keys, values, scale=self.scale, mask=mask
            )
        return self.o_proj(output.transpose(0, 2, 1, 3).reshape(batch, length, -1))


def cpu_attention(
    queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: Any
) -> mx.array:
    """softmax(q k^T * scale + mask) v for q (B, Hq, L, D), k and v (B, Hkv, T, D).

    mask: None, "causal" (the L queries are the last L of the T positions), or an array
    broadcastable to (B, Hq, L, T): bool (True attends) or additive.
    """
    batch, num_heads, length, head_dim = queries.shape
    num_kv_heads, num_keys = keys.shape[1], keys.shape[2]
    group = num_heads // num_kv_heads
    # A key-value head's query heads become extra rows: (B, Hkv, group * L, D).
    q = (queries * scale).reshape(batch, num_kv_heads, group * length, head_dim)
    scores = q @ keys.swapaxes(-1, -2)
    if mask is not None:
        scores = scores.reshape(batch, num_kv_heads, group, length, num_keys)
        scores = _apply_mask(scores, _mask_array(mask, length, num_keys))
        scores = scores.reshape(batch, num_kv_heads, group * length, num_keys)
    weights = exp_shifted(scores - scores.max(axis=-1, keepdims=True))
    out = (weights @ values) / weights.sum(axis=-1, keepdims=True)
    return out.reshape(batch, num_heads, length, head_dim)


def _mask_array(mask: Any, length: int, num_keys: int) -> mx.array:
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown attention mask {mask!r}")
        positions = mx.arange(num_keys - length, num_keys)
        return mx.arange(num_keys)[None] <= positions[:, None]  # (L, T)
    return mask


def _apply_mask(scores: mx.array, mask: mx.array) -> mx.array:
    """scores (B, Hkv, group, L, T); mask broadcastable to (B, Hq, L, T) -> masked at _MASKED."""
    if mask.ndim == 4:  # (B, 1 or Hq, L, T): heads split as the scores' are
        mask = mask.reshape(mask.shape[0], -1, 1 if mask.shape[1] == 1 else scores.shape[2],
                            *mask.shape[2:])  # fmt: skip
    if mask.dtype == mx.bool_:
        return mx.where(mask, scores, _MASKED)
    return mx.maximum(scores + mask, _MASKED)  # additive (-inf for masked keys)


def fuse_attention_layers(model: nn.Module) -> int:
    """On a CPU device, replace every known attention layer in `model` by a FusedAttention.

    Returns how many were replaced (0 on other devices, where MLX's own kernel is fast).
    Idempotent: a fused model is left as it is.
    """
    return swap_modules(model, _ATTENTION_CLASSES, FusedAttention, _same_output, "fused attention")


def _same_output(attention: nn.Module, fused: nn.Module) -> bool:
    x = probe_input(attention.q_proj, 5)
    return outputs_match(attention(x, mask="causal"), fused(x, mask="causal"))
