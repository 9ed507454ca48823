"""Swap known mlx-lm submodules for faster equivalents on a CPU device, each class probed first.

The swap replaces submodules of a loaded model (`update_modules`, as `nn.quantize` does);
mlx-lm's code is untouched. A class is swapped only if the replacement gives its output on a
random input, so a later mlx-lm whose class computes something else is left alone (warned).
`fused_mlp.py`, `fused_attention.py`, `fused_norm.py` and `fused_rope.py` use it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

log = logging.getLogger(__name__)

PROBE_TOLERANCE = 1e-4  # relative to the output's scale; float32 reassociation is ~1e-6


def swap_modules(
    model: nn.Module,
    classes: set[tuple[str, str]],
    replace: Callable[[nn.Module], nn.Module],
    probe: Callable[[nn.Module, nn.Module], bool],
    what: str,
) -> int:
    """On a CPU device, replace every module of `classes` ((module, class name) pairs) by
    replace(module), for classes where probe(module, replacement) holds. Returns how many were
    replaced: 0 on other devices (MLX's own kernels are fast there) and on a swapped model."""
    if mx.default_device() != mx.cpu:
        return 0
    verdicts: dict[type, bool] = {}
    swaps: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        cls = type(module)
        if (cls.__module__, cls.__name__) not in classes:
            continue
        replacement = replace(module)
        if cls not in verdicts:
            verdicts[cls] = probe(module, replacement)
            if not verdicts[cls]:
                log.warning("%s.%s differs from the %s; left as is", cls.__module__, cls.__name__,
                            what)  # fmt: skip
        if verdicts[cls]:
            swaps.append((path, replacement))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)


def probe_input(projection: nn.Module, length: int) -> mx.array:
    """A fixed random (2, length, in_features) input for a module whose first layer is this
    (possibly quantized) Linear, in its dtype."""
    bits = getattr(projection, "bits", None)  # a QuantizedLinear packs 32 // bits inputs per word
    width = projection.weight.shape[-1] * 32 // bits if bits else projection.weight.shape[-1]
    dtype = projection.scales.dtype if bits else projection.weight.dtype
    return mx.random.normal((2, length, width), key=mx.random.key(0)).astype(dtype)


def outputs_match(want: mx.array, got: mx.array) -> bool:
    """Equal up to PROBE_TOLERANCE of the output's scale (4 ulps for half precision)."""
    tolerance = max(PROBE_TOLERANCE, 4 * mx.finfo(want.dtype).eps)
    want, got = want.astype(mx.float32), got.astype(mx.float32)
    scale = mx.max(mx.abs(want)).item() or 1.0
    return mx.max(mx.abs(got - want)).item() <= tolerance * scale
