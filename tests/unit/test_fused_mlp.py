"""Fused SwiGLU MLPs: same parameters, same outputs, only known SwiGLU classes swapped."""

from __future__ import annotations

import logging
from pathlib import Path

import inference  # noqa: F401  (loads the BLAS before mlx)
from inference import fused_mlp
from inference.fused_mlp import FusedSwiGLU, fuse_swiglu_mlps

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.models import llama, qwen3


def test_fused_llama_keeps_weights_and_outputs(tiny_llama_path: Path) -> None:
    model, _ = load(str(tiny_llama_path))
    before = dict(tree_flatten(model.parameters()))
    tokens = mx.array([[3, 17, 42, 9, 100, 7]])
    want = model(tokens)
    assert fuse_swiglu_mlps(model) == len(model.model.layers)
    assert all(isinstance(layer.mlp, FusedSwiGLU) for layer in model.model.layers)
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == before.keys()  # same names: loading, sharding, quantizing see no change
    assert all(after[k] is before[k] for k in before)  # the same arrays, not copies
    got = model(tokens)
    assert mx.allclose(got, want, rtol=1e-4, atol=1e-4)
    assert mx.array_equal(got.argmax(-1), want.argmax(-1))
    assert fuse_swiglu_mlps(model) == 0  # idempotent


def test_fused_qwen3_mlp_matches() -> None:
    mlp = qwen3.MLP(32, 96)
    x = mx.random.normal((2, 5, 32))
    assert mx.allclose(FusedSwiGLU(mlp)(x), mlp(x), rtol=1e-4, atol=1e-5)


def test_half_precision_mlp_is_computed_in_float32() -> None:
    mlp = llama.MLP(llama.ModelArgs.from_dict(_LLAMA_ARGS))
    mlp.set_dtype(mx.bfloat16)
    x = mx.random.normal((1, 3, 32)).astype(mx.bfloat16)
    got = FusedSwiGLU(mlp)(x)
    assert got.dtype == mx.bfloat16
    assert mx.allclose(got.astype(mx.float32), mlp(x).astype(mx.float32), rtol=2e-2, atol=2e-2)


class _GeluMLP(nn.Module):
    """Same attribute names as a SwiGLU MLP, another activation: must never be fused."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(16, 32, bias=False)
        self.up_proj = nn.Linear(16, 32, bias=False)
        self.down_proj = nn.Linear(32, 16, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu(self.gate_proj(x)) * self.up_proj(x))


class _Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = [_GeluMLP(), _GeluMLP()]


def test_unknown_classes_are_left_alone() -> None:
    holder = _Holder()
    assert fuse_swiglu_mlps(holder) == 0
    assert all(isinstance(block, _GeluMLP) for block in holder.blocks)


def test_probe_refuses_a_class_whose_output_differs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Pretend the gelu MLP were on the list: the probe must catch that it is not SwiGLU.
    known = {*fused_mlp._SWIGLU_CLASSES, (_GeluMLP.__module__, _GeluMLP.__name__)}
    monkeypatch.setattr(fused_mlp, "_SWIGLU_CLASSES", known)
    holder = _Holder()
    with caplog.at_level(logging.WARNING, logger="inference.module_swap"):
        assert fuse_swiglu_mlps(holder) == 0
    assert "differs from the fused SwiGLU" in caplog.text
    assert all(isinstance(block, _GeluMLP) for block in holder.blocks)


_LLAMA_ARGS = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 50,
}
