"""The CPU-fast elementwise functions against exact float64 references."""

from __future__ import annotations

import math

import inference  # noqa: F401  (loads the BLAS before mlx)
from inference import fast_math

import mlx.core as mx
import numpy as np


def test_gelu_erf_matches_exact() -> None:
    x = np.linspace(-12, 12, 20001, dtype=np.float32)
    exact_gelu = x * 0.5 * (1 + np.vectorize(math.erf)(x.astype(np.float64) / math.sqrt(2)))
    assert np.abs(np.array(fast_math.gelu_erf(mx.array(x))) - exact_gelu).max() < 2e-6


def test_exp_nonpositive_matches_exact() -> None:
    d = np.linspace(-19.9, 0, 20001, dtype=np.float32)
    ratio = np.array(fast_math._exp_nonpositive(mx.array(d))) / np.exp(d.astype(np.float64))
    assert np.abs(ratio - 1).max() < 1e-5
    assert np.array(fast_math._exp_nonpositive(mx.array([-20.5, -np.inf]))).tolist() == [0.0, 0.0]


def test_swiglu_matches_exact() -> None:
    gate = np.linspace(-40, 40, 40001, dtype=np.float32)
    up = np.cos(gate).astype(np.float32) * 3  # both signs, varied magnitudes
    g64 = gate.astype(np.float64)
    exact = g64 / (1 + np.exp(-g64)) * up
    ours = np.array(fast_math.swiglu(mx.array(gate), mx.array(up)))
    # Float32-level: relative where silu is large, absolute where it underflows (g < -16).
    assert np.all(np.abs(ours - exact) <= 1e-6 * np.abs(exact) + 2e-5)
    for shape in [(3, 1, 7), (2, 5, 64)]:  # batched shapes agree with the flat answer
        g = mx.random.normal(shape) * 6
        u = mx.random.normal(shape)
        flat = fast_math.swiglu(g.flatten(), u.flatten()).reshape(shape)
        assert mx.array_equal(fast_math.swiglu(g, u), flat)
