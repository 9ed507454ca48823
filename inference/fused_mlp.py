"""SwiGLU MLPs with the CPU-fast activation, swapped into an mlx-lm model on a CPU device.

mlx-lm's llama / qwen2 / qwen3 MLP is `down(silu(gate(x)) * up(x))`; on MLX's CPU backend the
silu costs more than the three matrix products at batch 16 (sigmoid runs one element at a
time, see `fast_math`). `FusedSwiGLU` keeps the same three projections under the same names
(weights, quantization and mlx-lm's `shard` see no difference) and computes the activation
with `fast_math.swiglu`. The swap replaces submodules, as `nn.quantize` does; mlx-lm's code is
untouched. Each MLP class is swapped only after a probe shows both give the same output.
"""

from __future__ import annotations

import logging

from inference.fast_math import swiglu

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

log = logging.getLogger(__name__)

# MLP classes known to compute down(silu(gate) * up); others (gelu MLPs, MoE) are left alone.
_SWIGLU_CLASSES = {("mlx_lm.models.llama", "MLP"), ("mlx_lm.models.qwen2", "MLP"),
                   ("mlx_lm.models.qwen3", "MLP")}  # fmt: skip
_PROBE_TOLERANCE = 1e-4  # relative to the output's scale; float32 reassociation is ~1e-6


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
    if mx.default_device() != mx.cpu:
        return 0
    verdicts: dict[type, bool] = {}
    swaps: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        cls = type(module)
        if isinstance(module, FusedSwiGLU) or (cls.__module__, cls.__name__) not in _SWIGLU_CLASSES:
            continue
        if cls not in verdicts:
            verdicts[cls] = _same_output(module)
            if not verdicts[cls]:
                log.warning("%s.%s differs from the fused SwiGLU; left as is", cls.__module__,
                            cls.__name__)  # fmt: skip
        if verdicts[cls]:
            swaps.append((path, FusedSwiGLU(module)))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)


def _same_output(mlp: nn.Module) -> bool:
    """Whether the fused form gives this MLP's output on a random input (a cheap guard)."""
    proj = mlp.gate_proj
    bits = getattr(proj, "bits", None)  # a QuantizedLinear packs 32 // bits inputs per word
    width = proj.weight.shape[-1] * 32 // bits if bits else proj.weight.shape[-1]
    dtype = proj.scales.dtype if bits else proj.weight.dtype
    x = mx.random.normal((2, 3, width), key=mx.random.key(0)).astype(dtype)
    want = mlp(x).astype(mx.float32)
    got = FusedSwiGLU(mlp)(x).astype(mx.float32)
    tolerance = max(_PROBE_TOLERANCE, 4 * mx.finfo(dtype).eps)
    scale = mx.max(mx.abs(want)).item() or 1.0
    return mx.max(mx.abs(got - want)).item() <= tolerance * scale
