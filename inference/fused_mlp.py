"""SwiGLU MLPs with the CPU-fast activation, swapped into an mlx-lm model on a CPU device.

mlx-lm's llama / qwen2 / qwen3 MLP is `down(silu(gate(x)) * up(x))`; on MLX's CPU backend the
silu costs more than the three matrix products at batch 16 (sigmoid runs one element at a
time, see `fast_math`). `FusedSwiGLU` keeps the same three projections under the same names
(weights, quantization and mlx-lm's `shard` see no difference) and computes the activation
with `fast_math.swiglu`. The swap (`module_swap.py`) replaces submodules, as `nn.quantize` does,
after a probe shows both give the same output; mlx-lm's code is untouched.
"""

from __future__ import annotations

from inference.fast_math import swiglu
from inference.module_swap import outputs_match, probe_input, swap_modules

import mlx.core as mx
import mlx.nn as nn

# MLP classes known to compute down(silu(gate) * up); others (gelu MLPs, MoE) are left alone.
_SWIGLU_CLASSES = {("mlx_lm.models.llama", "MLP"), ("mlx_lm.models.qwen2", "MLP"),
                   ("mlx_lm.models.qwen3", "MLP")}  # fmt: skip


class FusedSwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) over an existing MLP's own projection modules."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj = mlp.gate_proj
        self.up_proj = mlp.up_proj
        self.down_proj = mlp.down_proj

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if gate.dtype == mx.float32:
            return self.down_proj(swiglu(gate, up))
        # Half precision: the rational function in float32, rounded once.
        return self.down_proj(
            swiglu(gate.astype(mx.float32), up.astype(mx.float32)).astype(gate.dtype)
        )


def fuse_swiglu_mlps(model: nn.Module) -> int:
    """On a CPU device, replace every known SwiGLU MLP in `model` by a FusedSwiGLU.

    Returns how many were replaced (0 on other devices, where MLX's own kernels are fast).
    Idempotent: a fused model is left as it is.
    """
    return swap_modules(model, _SWIGLU_CLASSES, FusedSwiGLU, _same_output, "fused SwiGLU")


def _same_output(mlp: nn.Module, fused: nn.Module) -> bool:
    x = probe_input(mlp.gate_proj, 3)
    return outputs_match(mlp(x), fused(x))
