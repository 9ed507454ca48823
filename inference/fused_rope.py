"""Rotary position embeddings as a few fused operations, swapped into an mlx-lm model on a CPU.

MLX's CPU backend has no kernel for `mx.fast.rope`: it builds its fallback graph, 29 small
operations per call (arange, exp, cos, sin, broadcasts, slices, products, a concatenation), and
a decode step pays ~6 us of dispatch per operation: 60 calls, ~11 ms of a 135M model's ~45 ms
step. `FusedRoPE` computes the same thing, with the fallback's own formula, as two compiled
functions (angles, rotation), so the graph holds a handful of fused operations instead.

Only `nn.RoPE` (the default rope of llama / qwen) is swapped; scaled variants (llama3, yarn,
su) keep their own code. Offsets may be an int or one per batch row (the runner's passes).
Ignores: other devices (MLX's kernels are fast there).
"""

from __future__ import annotations

import math
import threading
from functools import partial

from inference.module_swap import outputs_match, swap_modules

import mlx.core as mx
import mlx.nn as nn

_ROPE_CLASSES = {("mlx.nn.layers.positional_encoding", "RoPE")}


@partial(mx.compile, shapeless=True)
def _angles(positions: mx.array, inv_freqs: mx.array) -> tuple[mx.array, mx.array]:
    """(..., L) positions (already scaled) x (half,) frequencies -> cos and sin (..., L, half)."""
    theta = positions[..., None] * inv_freqs
    return mx.cos(theta), mx.sin(theta)


@mx.compile
def _rotate(x1: mx.array, x2: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """The halves of the rotated dimensions, as the fallback computes them."""
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class _SharedAngles:
    """cos and sin of the last positions asked for: every layer of a pass (queries and keys)
    rotates by the same positions, so they are built once a pass. One per model; an entry
    serves only the thread that built it (an engine's arrays stay on its own stream)."""

    def __init__(self) -> None:
        self._key: tuple = ()
        self._value: tuple[mx.array, mx.array] | None = None
        self._inv_freqs: dict[tuple[int, float], mx.array] = {}

    def get(self, offset: int | mx.array, length: int, dims: int, base: float, scale: float):
        # An array offset is the pass's own object, shared by its layers; holding it in the
        # key keeps its id from being reused while the entry lives.
        key = (offset if isinstance(offset, int) else id(offset), length, dims, base, scale,
               threading.get_ident(), offset)  # fmt: skip
        if self._value is not None and key[:6] == self._key[:6]:
            return self._value
        inv_freqs = self._inv_freqs.get((dims, base))
        if inv_freqs is None:
            half = dims // 2
            # The fallback's frequencies: exp(-j * log(base) / half), j = 0 .. half - 1.
            inv_freqs = mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * (math.log(base) / half))
            mx.eval(inv_freqs)  # a constant: data, not a graph of this thread
            self._inv_freqs[(dims, base)] = inv_freqs
        steps = mx.arange(length, dtype=mx.float32)
        if isinstance(offset, mx.array) and offset.ndim == 1:  # one offset per batch row
            positions = (steps + offset.astype(mx.float32)[:, None]) * scale  # (B, L)
            cos, sin = _angles(positions, inv_freqs)
            value = (cos[:, None], sin[:, None])  # (B, 1, L, half): over the heads
        else:
            value = _angles((steps + offset) * scale, inv_freqs)  # (L, half)
        self._key, self._value = key, value
        return value


class FusedRoPE(nn.Module):
    """nn.RoPE (traditional=False) over (B, H, L, D) inputs, in fused operations."""

    def __init__(self, rope: nn.Module, angles: _SharedAngles | None = None):
        super().__init__()
        self.dims = rope.dims
        self.traditional = rope.traditional
        self.base = rope.base
        self.scale = rope.scale
        self._angles = angles or _SharedAngles()

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if self.traditional or x.ndim != 4:
            return mx.fast.rope(x, self.dims, traditional=self.traditional, base=self.base,
                                scale=self.scale, offset=offset)  # fmt: skip
        cos, sin = self._angles.get(offset, x.shape[2], self.dims, self.base, self.scale)
        dtype = x.dtype
        half = self.dims // 2
        rotated = _rotate(x[..., :half], x[..., half : self.dims], cos.astype(dtype),
                          sin.astype(dtype))  # fmt: skip
        if self.dims < x.shape[-1]:
            rotated = mx.concatenate([rotated, x[..., self.dims :]], axis=-1)
        return rotated


def fuse_rope(model: nn.Module) -> int:
    """On a CPU device, replace every nn.RoPE in `model` by a FusedRoPE; returns how many.
    Its layers share one `_SharedAngles`: call it for the model the engine thread runs."""
    angles = _SharedAngles()
    return swap_modules(
        model, _ROPE_CLASSES, lambda rope: FusedRoPE(rope, angles), _same_output, "fused RoPE"
    )


def _same_output(rope: nn.Module, fused: nn.Module) -> bool:
    x = mx.random.normal((2, 3, 5, rope.dims + 4), key=mx.random.key(0))
    batched = mx.array([7, 300])
    return all(
        outputs_match(rope(x, offset=offset), fused(x, offset=offset))
        for offset in (0, 4093, batched)
    )
