"""RMSNorm as fused operations, swapped into an mlx-lm model on a CPU device.

MLX's CPU backend has no kernel for `mx.fast.rms_norm`: its fallback graph is 11 small
operations a call, and a decode step of a 30-layer model makes 61 calls. `FusedRMSNorm`
computes the fallback's own formula (float32, x * rsqrt(mean(x^2) + eps), cast, times the
weight) as one compiled function: a reduction and a fused elementwise kernel or two.

Ignores: other devices (MLX's kernel is fast there), norms with a bias (LayerNorm).
"""

from __future__ import annotations

from functools import partial

from inference.module_swap import outputs_match, swap_modules

import mlx.core as mx
import mlx.nn as nn

_RMS_NORM_CLASSES = {("mlx.nn.layers.normalization", "RMSNorm")}


@partial(mx.compile, shapeless=True)
def _rms_norm(x: mx.array, weight: mx.array, eps: mx.array) -> mx.array:
    x32 = x.astype(mx.float32)
    normed = x32 * mx.rsqrt(mx.mean(mx.square(x32), axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * weight


class FusedRMSNorm(nn.Module):
    """nn.RMSNorm over the same weight (its name and quantization untouched)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.eps
        self._eps = mx.array(norm.eps, dtype=mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        return _rms_norm(x, self.weight, self._eps)


def fuse_rms_norms(model: nn.Module) -> int:
    """On a CPU device, replace every nn.RMSNorm in `model` by a FusedRMSNorm; how many."""
    return swap_modules(model, _RMS_NORM_CLASSES, FusedRMSNorm, _same_output, "fused RMSNorm")


def _same_output(norm: nn.Module, fused: nn.Module) -> bool:
    x = mx.random.normal((2, 5, norm.weight.shape[-1]), key=mx.random.key(0)) * 3
    return outputs_match(norm(x.astype(norm.weight.dtype)), fused(x.astype(norm.weight.dtype)))
