"""GGUF -> mlx-lm folder conversion, checked against the model and tokenizer it was made from.

Each test writes a tiny random llama (mlx-lm's own class) and a freshly trained byte-level BPE
into a GGUF the way llama.cpp's converter does (GGUF names, Q/K rows permuted for rotary,
vocab/merges/token types in metadata), converts it back, and compares with the source.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from inference.chat_model import ModelNotFoundError, converted_gguf, resolve_chat_model
from inference.gguf_convert import GGUFContents, convert_gguf, read_gguf, write_model_folder
from inference.gguf_tokenizer import GGUFError, build_tokenizer, make_pre_tokenizer

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.models import llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TRAINING_TEXT = [
    "The capital of France is Paris. The capital of Italy is Rome; 2024 was a year.",
    "Numbers like 12345 and 3.14159, unicode like café, naïve, 日本語 and emoji 🙂.",
    "def main():\n    return 42\n\n\tindented\ttabs   and   runs of spaces",
]
TRICKY_TEXTS = [
    "Hello world",
    "   leading spaces,   runs\t\ttabs\n\n\nnewlines\r\nCRLF ",
    "digits 1234567890 and 3.14, 2024-01-31",
    "unicode café naïve Ωmega 日本語 Ünïcödé",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "special <|im_start|>user\nhi<|im_end|> inline<|endoftext|>",
    "contractions: it's we've they're I'll",
    "",
]
PROMPT_IDS = [1, 5, 9, 2, 100, 250, 17, 42]
LLAMA_CPP_NAMES = {  # HF suffix -> GGUF name, as llama.cpp's convert_hf_to_gguf.py writes them
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


@dataclass
class Source:
    """The model and tokenizer a test GGUF was written from."""

    model: llama.Model
    args: llama.ModelArgs
    tokenizer: Tokenizer
    gguf_path: Path


def train_tokenizer(pre: str) -> Tokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if pre == "smollm"
        else byte_level
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 4, trainer=trainer)
    return tokenizer


def llama_cpp_permute(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, written independently of our inverse."""
    shape = rows.shape
    return (
        rows.reshape(num_heads, 2, shape[0] // num_heads // 2, *shape[1:])
        .swapaxes(1, 2)
        .reshape(shape)
    )


def gguf_tensors(model: llama.Model, args: llama.ModelArgs) -> dict[str, mx.array]:
    tensors: dict[str, mx.array] = {}
    for name, value in tree_flatten(model.parameters()):
        module, _, part = name.rpartition(".")
        if module == "model.embed_tokens":
            gguf = "token_embd"
        elif module == "model.norm":
            gguf = "output_norm"
        elif module == "lm_head":
            gguf = "output"
        else:
            _, _, layer, suffix = module.split(".", 3)
            gguf = f"blk.{layer}.{LLAMA_CPP_NAMES[suffix]}"
        array = np.array(value)
        if gguf.endswith("attn_q"):
            array = llama_cpp_permute(array, args.num_attention_heads)
        elif gguf.endswith("attn_k"):
            array = llama_cpp_permute(array, args.num_key_value_heads)
        tensors[f"{gguf}.{part}"] = mx.array(array)
    return tensors


def gguf_metadata(args: llama.ModelArgs, tokenizer: Tokenizer, pre: str) -> dict[str, object]:
    def u32(value: int) -> mx.array:
        return mx.array(value, dtype=mx.uint32)

    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
    return {
        "general.architecture": "llama",
        "llama.embedding_length": u32(args.hidden_size),
        "llama.feed_forward_length": u32(args.intermediate_size),
        "llama.block_count": u32(args.num_hidden_layers),
        "llama.attention.head_count": u32(args.num_attention_heads),
        "llama.attention.head_count_kv": u32(args.num_key_value_heads),
        "llama.rope.dimension_count": u32(args.hidden_size // args.num_attention_heads),
        "llama.context_length": u32(2048),
        "llama.rope.freq_base": mx.array(args.rope_theta, dtype=mx.float32),
        "llama.attention.layer_norm_rms_epsilon": mx.array(args.rms_norm_eps, dtype=mx.float32),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m for m in merges],
        "tokenizer.ggml.token_type": mx.array(
            [3 if t in SPECIAL_TOKENS else 1 for t in tokens], dtype=mx.int32
        ),
        "tokenizer.ggml.bos_token_id": u32(1),
        "tokenizer.ggml.eos_token_id": u32(2),
        "tokenizer.ggml.unknown_token_id": u32(0),
        "tokenizer.ggml.padding_token_id": u32(2),
        "tokenizer.chat_template": CHATML,
    }


def make_source(folder: Path, pre: str = "smollm", *, tie: bool = True, seed: int = 0) -> Source:
    """Write a tiny llama as a GGUF at folder/tiny.gguf; returns it with its source objects."""
    tokenizer = train_tokenizer(pre)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=tokenizer.get_vocab_size(),
        rope_theta=10000.0,
        tie_word_embeddings=tie,
    )
    mx.random.seed(seed)
    model = llama.Model(args)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.gguf"
    mx.save_gguf(str(path), gguf_tensors(model, args), gguf_metadata(args, tokenizer, pre))
    return Source(model, args, tokenizer, path)


def logits(model: nn.Module) -> np.ndarray:
    return np.array(model(mx.array([PROMPT_IDS]))[0].astype(mx.float32))


@pytest.fixture(scope="module")
def smollm_source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    return make_source(tmp_path_factory.mktemp("gguf"), "smollm")


@pytest.mark.parametrize("tie", [True, False])
def test_float32_conversion_reproduces_source_logits(tmp_path: Path, tie: bool) -> None:
    source = make_source(tmp_path, tie=tie)
    out = convert_gguf(source.gguf_path, tmp_path / "converted", "float32")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tie
    assert config["rope_traditional"] is False and "quantization" not in config
    model, _ = load(str(out))
    np.testing.assert_allclose(logits(model), logits(source.model), atol=1e-5, rtol=1e-5)


def test_bfloat16_conversion_is_close(smollm_source: Source, tmp_path: Path) -> None:
    model, _ = load(str(convert_gguf(smollm_source.gguf_path, tmp_path / "bf16", "bfloat16")))
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    np.testing.assert_allclose(logits(model), logits(smollm_source.model), atol=0.05)


def quantized_contents(source: Source) -> GGUFContents:
    """The source GGUF with every 2-D weight affine-quantized, as MLX reads Q4_1 tensors."""
    contents = read_gguf(source.gguf_path)
    tensors: dict[str, mx.array] = {}
    for name, tensor in contents.tensors.items():
        if tensor.ndim == 2:
            weight, scales, biases = mx.quantize(tensor, group_size=32, bits=4)
            base = name.removesuffix(".weight")
            tensors |= {
                f"{base}.weight": weight,
                f"{base}.scales": scales,
                f"{base}.biases": biases,
            }
        else:
            tensors[name] = tensor
    return GGUFContents(tensors, contents.metadata)


def test_quantized_triples_are_unpermuted_and_kept(smollm_source: Source, tmp_path: Path) -> None:
    # Quantization groups run along rows, so un-permuting rows of the triple is exact.
    expected_model = llama.Model(smollm_source.args)
    expected_model.update(smollm_source.model.parameters())
    nn.quantize(expected_model, group_size=32, bits=4)
    expected = logits(expected_model)
    contents = quantized_contents(smollm_source)

    quantized_dir = write_model_folder(contents, tmp_path / "q4", "quantized")
    config = json.loads((quantized_dir / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    assert config["quantization"]["model.layers.1.mlp.down_proj"] == {
        "group_size": 32,
        "bits": 4,
        "mode": "affine",
    }
    model, _ = load(str(quantized_dir))
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    np.testing.assert_allclose(logits(model), expected, atol=1e-5, rtol=1e-5)

    dequantized, _ = load(str(write_model_folder(contents, tmp_path / "f32", "float32")))
    assert isinstance(dequantized.model.layers[0].self_attn.q_proj, nn.Linear)
    np.testing.assert_allclose(logits(dequantized), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pre", ["smollm", "gpt2"])
def test_tokenizer_matches_source(tmp_path: Path, pre: str) -> None:
    source = make_source(tmp_path, pre)
    out = convert_gguf(source.gguf_path, tmp_path / "converted")
    rebuilt = Tokenizer.from_file(str(out / "tokenizer.json"))
    _, wrapper = load(str(out))
    for text in TRICKY_TEXTS:
        ids = source.tokenizer.encode(text).ids
        assert rebuilt.encode(text).ids == ids, text
        assert wrapper.encode(text, add_special_tokens=False) == ids, text
        assert rebuilt.decode(ids, skip_special_tokens=False) == text
    assert rebuilt.encode("<|im_start|>").ids == [1]
    assert wrapper.eos_token_id == 2 and wrapper.bos_token == "<|im_start|>"


def test_smollm_pre_tokenizer_splits_every_digit() -> None:
    # A vocab trained this way has no multi-digit merges, so only the split itself shows it.
    pieces = [piece for piece, _ in make_pre_tokenizer("smollm").pre_tokenize_str("ab 2024x")]
    assert pieces == ["ab", "Ġ", "2", "0", "2", "4", "x"]
    pieces = [piece for piece, _ in make_pre_tokenizer("gpt2").pre_tokenize_str("ab 2024x")]
    assert pieces == ["ab", "Ġ2024", "x"]


def test_add_bos_token_is_honoured(smollm_source: Source) -> None:
    metadata = read_gguf(smollm_source.gguf_path).metadata
    plain = smollm_source.tokenizer.encode("Hello world").ids
    assert build_tokenizer(metadata).encode("Hello world").ids == plain
    metadata["tokenizer.ggml.add_bos_token"] = True
    assert build_tokenizer(metadata).encode("Hello world").ids == [1, *plain]


def test_chat_template_renders(smollm_source: Source, tmp_path: Path) -> None:
    _, wrapper = load(str(convert_gguf(smollm_source.gguf_path, tmp_path / "converted")))
    messages = [{"role": "user", "content": "Hi 2024"}]
    text = wrapper.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nHi 2024<|im_end|>\n<|im_start|>assistant\n"
    ids = wrapper.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == smollm_source.tokenizer.encode(text).ids
    assert ids[0] == 1 and ids.count(2) == 1


def test_unsupported_pre_tokenizer_leaves_no_folder(tmp_path: Path) -> None:
    source = make_source(tmp_path, pre="qwen2")
    with pytest.raises(GGUFError, match="'qwen2'"):
        convert_gguf(source.gguf_path, tmp_path / "out")
    # The weights were already written into the temp dir when the tokenizer failed.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_failed_overwrite_keeps_old_folder_and_stale_temps_go(
    smollm_source: Source, tmp_path: Path
) -> None:
    out = convert_gguf(smollm_source.gguf_path, tmp_path / "out")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        convert_gguf(smollm_source.gguf_path, out)
    bad = make_source(tmp_path / "bad", pre="qwen2")
    with pytest.raises(GGUFError):
        convert_gguf(bad.gguf_path, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before

    stale = tmp_path / ".out.tmp-killed"  # what a killed conversion leaves behind
    stale.mkdir()
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    convert_gguf(smollm_source.gguf_path, out, overwrite=True)
    assert not stale.exists()


def test_unsupported_architecture_is_named(smollm_source: Source, tmp_path: Path) -> None:
    contents = read_gguf(smollm_source.gguf_path)
    contents.metadata["general.architecture"] = "qwen2"
    with pytest.raises(GGUFError, match="'qwen2'"):
        write_model_folder(contents, tmp_path / "out")


def test_cached_conversion_reconverts_only_on_change(tmp_path: Path) -> None:
    source = make_source(tmp_path / "src")
    first = converted_gguf(source.gguf_path, "tiny-float32", "float32")
    weights = first / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    later = time.time() + 5
    os.utime(source.gguf_path, (later, later))  # touched, same bytes: the hash says keep it
    assert converted_gguf(source.gguf_path, "tiny-float32", "float32") == first
    assert weights.stat().st_mtime_ns == stamp

    make_source(tmp_path / "src", seed=1)  # same path and size, other weights
    again = converted_gguf(source.gguf_path, "tiny-float32", "float32")
    assert (again / "model.safetensors").stat().st_mtime_ns != stamp
    record = json.loads((again / "gguf_source.json").read_text())
    assert record["dtype"] == "float32" and record["source"]["path"] == str(source.gguf_path)


def test_resolve_chat_model(
    smollm_source: Source, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = convert_gguf(smollm_source.gguf_path, tmp_path / "models" / "tiny")
    assert resolve_chat_model(str(folder)) == folder
    with pytest.raises(ModelNotFoundError, match="RAG_MODEL_DIR is not set"):
        resolve_chat_model("tiny")
    monkeypatch.setenv("RAG_MODEL_DIR", str(tmp_path / "models"))
    assert resolve_chat_model("tiny") == folder
    with pytest.raises(ModelNotFoundError, match=r"'missing' in .*models \(has: tiny\)"):
        resolve_chat_model("missing")
    (tmp_path / "models" / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        resolve_chat_model("empty")
    converted = resolve_chat_model(str(smollm_source.gguf_path), dtype="quantized")
    assert converted.name == "tiny-quantized" and (converted / "config.json").is_file()
