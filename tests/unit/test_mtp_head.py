"""MTP heads: native `mtp.*` tensors of a tiny random Qwen3.5-style checkpoint (hybrid trunk with
recurrent layers) and generic heads stored as sidecar files; loading, norm gains, errors, and the
speculative lane on the hybrid trunk (greedy equality, caches after every cycle)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import inference  # noqa: F401  (BLAS before mlx)
from inference.mtp_decode import MTPDecoder, Trunk, decode_plain
from inference.mtp_head import (
    SIDECAR_NAME,
    HeadConfig,
    HeadLoadError,
    MTPHead,
    load_head,
    load_native_head,
    load_sidecar_head,
    make_generic_head,
    native_head_from_weights,
    read_native_weights,
    save_head,
    sidecar_path,
    to_mlx_layout,
)
from inference.sampling import SamplingParams

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import qwen3_5
from mlx_lm.models.cache import ArraysCache, make_prompt_cache
from mlx_lm.utils import load_model

from tests.unit.test_mtp_decode import (
    PROMPT,
    assert_verify_pass_equals_step_by_step,
    check_cycles_against_plain,
    make_echo,
)

GREEDY = SamplingParams(temperature=0.0, seed=3)
GAIN_NOISE = 0.1  # the head's norm gains are 1 + this * N(0, 1), so a missing +1 shows
QWEN_CONFIG = {
    "model_type": "qwen3_5",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 320,
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "full_attention_interval": 2,  # layer 0 gated-delta (recurrent), 1 attention
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {
        "type": "default",
        "mrope_section": [2, 2, 2],
        "rope_theta": 10000,
        "partial_rotary_factor": 0.25,
    },
    "mtp_num_hidden_layers": 1,
}
# Hugging Face stores these RMSNorm gains zero-centred; mlx-lm's sanitize adds 1 back.
TRUNK_ZERO_CENTRED = (
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    "model.language_model.norm.weight",
    ".q_norm.weight",
    ".k_norm.weight",
)


def write_tiny_qwen3_5(folder: Path, *, shards: int = 1, seed: int = 0) -> dict[str, mx.array]:
    """Write a random Qwen3.5-style checkpoint as Hugging Face lays it out, with `mtp.*` tensors;
    returns the head's parameters as they should load (gains not zero-centred)."""
    folder.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    model = qwen3_5.Model(qwen3_5.ModelArgs.from_dict(QWEN_CONFIG))
    raw: dict[str, mx.array] = {}
    for key, value in tree_flatten(model.parameters()):
        key = key.replace("language_model.model.", "model.language_model.")
        key = key.replace("language_model.lm_head.", "lm_head.")
        if key.endswith("embed_tokens.weight"):
            value = value * 4  # as the tiny llama: the embedding dominates the residual stream
        if key.endswith("conv1d.weight"):
            value = value.moveaxis(1, 2)  # HF keeps (channels, 1, kernel)
        if key.endswith(TRUNK_ZERO_CENTRED):
            value = value - 1.0
        raw[key] = value
    text = model.language_model
    head = MTPHead(
        64, 1e-6, [qwen3_5.DecoderLayer(text.args, 1)], HeadConfig("native", "post_norm")
    )
    make_echo(head, hidden_scale=0.1)
    want = {}
    for key, value in tree_flatten(head.parameters()):
        if key.endswith("norm.weight"):
            value = 1.0 + GAIN_NOISE * mx.random.normal(value.shape)
            raw[f"mtp.{key}"] = value - 1.0
        else:
            raw[f"mtp.{key}"] = value
        want[key] = value
    mx.eval(raw)
    keys = sorted(raw)
    if shards == 1:
        mx.save_safetensors(str(folder / "model.safetensors"), raw)
    else:  # the head in the last shard only, as a sharded HF checkpoint may place it
        trunk_keys = [k for k in keys if not k.startswith("mtp.")]
        parts = [trunk_keys[i :: shards - 1] for i in range(shards - 1)]
        parts.append([k for k in keys if k.startswith("mtp.")])
        weight_map = {}
        for i, part in enumerate(parts):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            mx.save_safetensors(str(folder / name), {k: raw[k] for k in part})
            weight_map.update(dict.fromkeys(part, name))
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(QWEN_CONFIG))
    return want


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, mx.array]]:
    folder = tmp_path_factory.mktemp("qwen") / "tiny-qwen3_5"
    return folder, write_tiny_qwen3_5(folder)


@pytest.fixture(scope="module")
def qwen_trunk(qwen) -> Trunk:
    model, _ = load_model(qwen[0])  # mlx-lm drops mtp.* and shifts the trunk's gains
    return Trunk(model)


def test_native_head_loads_with_norm_gains_shifted(qwen, qwen_trunk: Trunk):
    folder, want = qwen
    head = load_native_head(folder, qwen_trunk.model)
    assert head is not None and head.config.kind == "native"
    got = dict(tree_flatten(head.parameters()))
    assert got.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_allclose(np.array(got[key]), np.array(value), atol=1e-6, err_msg=key)


def test_unshifted_gains_lose_the_acceptance(qwen, qwen_trunk: Trunk):
    folder, _ = qwen
    accepted = {}
    for shift in (True, False):
        head = load_native_head(folder, qwen_trunk.model, shift_norms=shift)
        decoder = MTPDecoder(qwen_trunk, head, GREEDY, 1)
        list(decoder.generate(PROMPT, 16))
        accepted[shift] = decoder.stats.acceptance_by_depth[0]
    assert accepted[True] > 0.3
    assert accepted[False] < accepted[True] / 2


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_greedy_on_hybrid_trunk_is_plain_decoding(qwen, qwen_trunk: Trunk, depth: int):
    head = load_native_head(qwen[0], qwen_trunk.model)
    want = decode_plain(qwen_trunk.model, PROMPT, GREEDY, 14)
    decoder = MTPDecoder(qwen_trunk, head, GREEDY, depth)
    assert list(decoder.generate(PROMPT, 14)) == want
    assert decoder.stats.accepted_at[0] > 0


@pytest.mark.parametrize("source", ["pre_norm", "post_norm"])
def test_verify_pass_on_hybrid_trunk_equals_step_by_step(qwen_trunk: Trunk, source):
    assert_verify_pass_equals_step_by_step(qwen_trunk, source)


def test_hybrid_caches_equal_plain_decodings_after_every_cycle(qwen, qwen_trunk: Trunk):
    # Recurrent state cannot be trimmed: it is restored from a snapshot and the kept tokens replayed.
    assert any(isinstance(c, ArraysCache) for c in make_prompt_cache(qwen_trunk.model))
    head = load_native_head(qwen[0], qwen_trunk.model)
    params = SamplingParams(temperature=1.0, top_k=3, seed=4)
    seen = check_cycles_against_plain(qwen_trunk, head, 3, params, 6)
    assert 0 in seen and len(seen) >= 2


def test_sharded_checkpoint_reads_only_the_head_shard(tmp_path: Path, qwen_trunk: Trunk):
    want = write_tiny_qwen3_5(tmp_path, shards=3)
    weights = read_native_weights(tmp_path)
    assert set(weights) == set(want)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3


def test_load_head_finds_native_then_sidecar_then_nothing(qwen, tiny_llama_path, tmp_path):
    folder, _ = qwen
    model, _ = load_model(folder)
    assert load_head(folder, model).config.kind == "native"
    llama_dir = shutil.copytree(tiny_llama_path, tmp_path / "llama")
    llama, _ = mlx_lm.load(str(llama_dir))
    assert load_head(llama_dir, llama) is None
    save_head(make_generic_head(llama), sidecar_path(llama_dir))
    assert load_head(llama_dir, llama).config.kind == "generic"
    mlx_lm.load(str(llama_dir))  # mlx-lm's loader does not trip over the sidecar


def test_sidecar_round_trip(tiny_llama_path: Path, tmp_path: Path):
    model, _ = mlx_lm.load(str(tiny_llama_path))
    mx.random.seed(5)
    head = make_generic_head(model, num_layers=2, hidden_source="pre_norm")
    path = tmp_path / SIDECAR_NAME
    save_head(head, path)
    loaded = load_sidecar_head(path, model)
    assert loaded.config == head.config
    assert len(loaded.layers) == 2
    for (key, got), (_, want) in zip(
        tree_flatten(loaded.parameters()), tree_flatten(head.parameters()), strict=True
    ):
        np.testing.assert_array_equal(np.array(got), np.array(want), err_msg=key)
    embeddings, hiddens = mx.random.normal((1, 3, 64)), mx.random.normal((1, 3, 64))
    np.testing.assert_allclose(
        np.array(loaded(embeddings, hiddens, loaded.make_cache())),
        np.array(head(embeddings, hiddens, head.make_cache())),
        atol=1e-6,
    )


def test_sidecar_errors_say_what_was_wrong(tiny_llama_path: Path, tmp_path: Path):
    model, _ = mlx_lm.load(str(tiny_llama_path))
    head = make_generic_head(model)
    weights = dict(tree_flatten(head.parameters()))
    path = tmp_path / SIDECAR_NAME
    mx.save_safetensors(str(path), weights, metadata={"format": "other"})
    with pytest.raises(HeadLoadError, match="format/version"):
        load_sidecar_head(path, model)
    narrow = {**head.config.block_args, "hidden_size": 32}
    with pytest.raises(HeadLoadError, match="width 32 for a model of width 64"):
        make_generic_head(model, block_args=narrow)
    with pytest.raises(ValueError, match="only generic heads"):
        save_head(MTPHead(64, 1e-5, [], HeadConfig("native")), path)


def test_native_errors_say_what_was_wrong(qwen, qwen_trunk: Trunk, tiny_llama_path: Path):
    weights = read_native_weights(qwen[0])
    llama, _ = mlx_lm.load(str(tiny_llama_path))
    with pytest.raises(HeadLoadError, match="got model type 'llama'"):
        native_head_from_weights(weights, llama)
    partial = {k: v for k, v in weights.items() if k != "fc.weight"}
    with pytest.raises(HeadLoadError, match=r"missing \['fc.weight'\]"):
        native_head_from_weights(partial, qwen_trunk.model)
    wide = {**weights, "fc.weight": mx.zeros((64, 64))}
    with pytest.raises(HeadLoadError, match=r"fc.weight: got \(64, 64\), want \(64, 128\)"):
        native_head_from_weights(wide, qwen_trunk.model)
    gap = {k.replace("layers.0.", "layers.1."): v for k, v in weights.items()}
    with pytest.raises(HeadLoadError, match=r"mtp layers \[1\]"):
        native_head_from_weights(gap, qwen_trunk.model)


def test_expert_tensors_are_stacked_and_norms_shifted():
    e0, e1 = mx.ones((4, 3)), 2 * mx.ones((4, 3))
    weights = {
        "layers.0.mlp.experts.1.up_proj.weight": e1,
        "layers.0.mlp.experts.0.up_proj.weight": e0,
        "layers.0.mlp.gate.weight": mx.ones((2, 3)),
        "layers.1.mlp.experts.gate_up_proj": mx.arange(2 * 8 * 3).reshape(2, 8, 3),
        "layers.1.mlp.experts.down_proj": mx.ones((2, 3, 4)),
        "layers.0.self_attn.q_norm.weight": mx.zeros((4,)),
        "norm.weight": mx.full((3,), 0.5),
    }
    got = to_mlx_layout(weights, shift_norms=True)
    assert sorted(got) == [
        "layers.0.mlp.gate.weight",
        "layers.0.mlp.switch_mlp.up_proj.weight",
        "layers.0.self_attn.q_norm.weight",
        "layers.1.mlp.switch_mlp.down_proj.weight",
        "layers.1.mlp.switch_mlp.gate_proj.weight",
        "layers.1.mlp.switch_mlp.up_proj.weight",
        "norm.weight",
    ]
    stacked = np.array(got["layers.0.mlp.switch_mlp.up_proj.weight"])
    assert stacked.shape == (2, 4, 3) and stacked[0, 0, 0] == 1 and stacked[1, 0, 0] == 2
    assert got["layers.1.mlp.switch_mlp.gate_proj.weight"].shape == (2, 4, 3)
    assert got["layers.1.mlp.switch_mlp.up_proj.weight"][0, 0, 0].item() == 12
    np.testing.assert_array_equal(np.array(got["norm.weight"]), [1.5] * 3)
    np.testing.assert_array_equal(np.array(got["layers.0.self_attn.q_norm.weight"]), [1.0] * 4)
    kept = to_mlx_layout(weights, shift_norms=False)
    np.testing.assert_array_equal(np.array(kept["norm.weight"]), [0.5] * 3)
