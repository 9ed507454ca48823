"""Convert a llama-architecture GGUF file into an mlx-lm model folder, atomically.

The folder is a standard Hugging Face llama layout (config.json, model.safetensors, tokenizer
files, generation_config.json) that `mlx_lm.load` reads unchanged, plus gguf_source.json, which
records the source file's fingerprint so a cache can tell when to convert again.

  GGUF -> mx.load -> rename tensors -> undo llama.cpp's Q/K row permutation -> cast or keep
       quantized -> write into a temp dir -> rename onto the target

MLX reads Q4_0, Q4_1 and Q8_0 tensors as affine-quantized triples (`<name>.weight` packed uint32,
`<name>.scales`, `<name>.biases`, group size 32); other GGUF quantizations (K-quants, IQ) are
refused by `mx.load` itself. Only the "llama" architecture is handled; anything else raises
`GGUFError` naming what was found.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from inference.gguf_tokenizer import GGUFError, write_tokenizer_files

import mlx.core as mx
import numpy as np

ModelDtype = Literal["float32", "bfloat16", "float16", "quantized"]
MODEL_DTYPES: tuple[str, ...] = get_args(ModelDtype)
CONVERTER_VERSION = 1  # bump when the output changes, so cached folders are converted again
SOURCE_RECORD = "gguf_source.json"
_STALE_TEMP_S = 3600.0  # temp dirs older than this belong to a killed conversion

_FLOAT_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class GGUFContents:
    """A GGUF file as MLX reads it: tensors under GGUF names, metadata as plain Python values."""

    tensors: dict[str, mx.array]
    metadata: dict[str, Any]


@dataclass(frozen=True)
class SourceFingerprint:
    """Identifies a GGUF file: size and mtime for a cheap check, sha256 for a sure one."""

    path: str
    size: int
    mtime_ns: int
    sha256: str


@dataclass(frozen=True)
class ConversionRecord:
    """gguf_source.json: what a converted folder was made from and how."""

    source: SourceFingerprint | None  # None when written from in-memory contents
    dtype: str
    converter_version: int


def _plain(value: Any) -> Any:
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def read_gguf(gguf_path: str | Path) -> GGUFContents:
    """Load every tensor and the metadata of a GGUF file."""
    path = Path(gguf_path)
    if not path.is_file():
        raise GGUFError(f"no GGUF file at {path}")
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as exc:  # e.g. a K-quant type MLX cannot read
        raise GGUFError(f"MLX cannot read {path}: {exc}") from exc
    return GGUFContents(tensors, {key: _plain(value) for key, value in metadata.items()})


def fingerprint_file(path: str | Path) -> SourceFingerprint:
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    stat = path.stat()
    return SourceFingerprint(
        str(path.resolve()), stat.st_size, stat.st_mtime_ns, digest.hexdigest()
    )


def read_conversion_record(model_dir: Path) -> ConversionRecord | None:
    """The record a converted folder carries, or None when it has none or it is unreadable."""
    try:
        raw = json.loads((model_dir / SOURCE_RECORD).read_text())
        source = SourceFingerprint(**raw["source"]) if raw["source"] is not None else None
        return ConversionRecord(source, raw["dtype"], int(raw["converter_version"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---- config ----------------------------------------------------------------------------------


def _float32_value(value: Any) -> float:
    return float(str(np.float32(value)))  # GGUF floats are f32: 1e-05, not 9.999999747378752e-06


def _meta_int(metadata: dict[str, Any], key: str, default: int | None = None) -> int:
    value = metadata.get(key, default)
    if value is None:
        raise GGUFError(f"GGUF metadata has no {key!r}")
    if isinstance(value, list):
        raise GGUFError(f"{key!r} varies per layer ({value[:4]}...); not supported")
    return int(value)


def llama_config(metadata: dict[str, Any], tensors: dict[str, mx.array]) -> dict[str, Any]:
    """config.json for mlx-lm's llama model, from `llama.*` metadata and the tensor shapes."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"unsupported general.architecture {arch!r}: only 'llama' is converted")
    if "rope_freqs.weight" in tensors:
        raise GGUFError("rope_freqs tensor (llama3-style rope scaling) is not supported")
    hidden = _meta_int(metadata, "llama.embedding_length")
    num_heads = _meta_int(metadata, "llama.attention.head_count")
    num_kv_heads = _meta_int(metadata, "llama.attention.head_count_kv", num_heads)
    head_dim = _meta_int(metadata, "llama.attention.key_length", hidden // num_heads)
    rope_dim = _meta_int(metadata, "llama.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise GGUFError(f"partial rotary (rope dim {rope_dim} < head dim {head_dim}) not supported")
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": _meta_int(metadata, "llama.feed_forward_length"),
        "num_hidden_layers": _meta_int(metadata, "llama.block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "vocab_size": int(tensors["token_embd.weight"].shape[0]),
        "max_position_embeddings": _meta_int(metadata, "llama.context_length", 4096),
        "rms_norm_eps": _float32_value(metadata["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": _float32_value(metadata.get("llama.rope.freq_base", 10000.0)),
        "rope_traditional": False,  # Q/K rows are un-permuted back to the HF layout
        "rope_scaling": _rope_scaling(metadata),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
    }
    for role in ("bos", "eos", "padding"):
        if (value := metadata.get(f"tokenizer.ggml.{role}_token_id")) is not None:
            config["pad_token_id" if role == "padding" else f"{role}_token_id"] = int(value)
    return config


def _rope_scaling(metadata: dict[str, Any]) -> dict[str, Any] | None:
    kind = metadata.get("llama.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"type": "linear", "factor": _float32_value(metadata["llama.rope.scaling.factor"])}
    raise GGUFError(f"unsupported llama.rope.scaling.type {kind!r}: only 'linear' is converted")


# ---- tensors ---------------------------------------------------------------------------------


def hf_module_name(gguf_module: str) -> str:
    """'blk.3.attn_q' -> 'model.layers.3.self_attn.q_proj'; unknown names raise GGUFError."""
    if gguf_module in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_module]
    parts = gguf_module.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise GGUFError(f"unknown llama GGUF tensor {gguf_module!r}")


def unpermute_rows(rows: mx.array, num_heads: int) -> mx.array:
    """Undo llama.cpp's rotary permutation of Q/K output rows (works on weight, scales, biases).

    Per head, HF keeps the two rotary halves apart [x0..x(d/2-1), x(d/2)..x(d-1)]; llama.cpp
    interleaves them [x0, x(d/2), x1, x(d/2+1), ...] for its "traditional" rope:
      gguf rows (heads, d/2, 2, ...) --swap axes 1,2--> hf rows (heads, 2, d/2, ...)
    """
    half = rows.shape[0] // num_heads // 2
    rest = rows.shape[1:]
    return rows.reshape(num_heads, half, 2, *rest).swapaxes(1, 2).reshape(rows.shape)


def _input_features(gguf_module: str, config: dict[str, Any]) -> int:
    if gguf_module.endswith("ffn_down"):
        return config["intermediate_size"]
    if gguf_module.endswith("attn_output"):
        return config["num_attention_heads"] * config["head_dim"]
    return config["hidden_size"]


def convert_tensors(
    contents: GGUFContents, config: dict[str, Any], dtype: ModelDtype
) -> tuple[dict[str, mx.array], dict[str, dict[str, Any]]]:
    """HF-named weights and, for dtype "quantized", each quantized module's group size and bits."""
    modules: dict[str, dict[str, mx.array]] = {}
    for name, tensor in contents.tensors.items():
        module, _, part = name.rpartition(".")
        modules.setdefault(module, {})[part] = tensor
    weights: dict[str, mx.array] = {}
    quantized: dict[str, dict[str, Any]] = {}
    for gguf_module, parts in modules.items():
        hf_module = hf_module_name(gguf_module)
        if gguf_module.endswith(("attn_q", "attn_k")):
            q = gguf_module.endswith("attn_q")
            heads = config["num_attention_heads" if q else "num_key_value_heads"]
            parts = {part: unpermute_rows(t, heads) for part, t in parts.items()}
        if "scales" in parts:
            params = _quant_params(gguf_module, parts, config)
            if dtype == "quantized":
                quantized[hf_module] = params
            else:
                parts = _dequantized(parts, params)
        for part, tensor in parts.items():
            if dtype != "quantized" and mx.issubdtype(tensor.dtype, mx.floating):
                tensor = tensor.astype(_FLOAT_DTYPES[dtype])
            weights[f"{hf_module}.{part}"] = tensor
    return weights, quantized


def _dequantized(parts: dict[str, mx.array], params: dict[str, Any]) -> dict[str, mx.array]:
    """A quantized triple as one float32 weight; other parts (a bias) pass through."""
    f32 = mx.float32  # dequantize in f32: exactly llama.cpp's d * q + m, no fp16 rounding
    weight = mx.dequantize(
        parts["weight"],
        parts["scales"].astype(f32),
        parts["biases"].astype(f32),
        group_size=params["group_size"],
        bits=params["bits"],
    )
    rest = {part: t for part, t in parts.items() if part not in ("weight", "scales", "biases")}
    return {"weight": weight} | rest


def _quant_params(
    gguf_module: str, parts: dict[str, mx.array], config: dict[str, Any]
) -> dict[str, Any]:
    """Recover group size and bits from the packed shapes and the layer's input width."""
    in_features = _input_features(gguf_module, config)
    packed, num_groups = parts["weight"].shape[-1], parts["scales"].shape[-1]
    bits, group_size = packed * 32 // in_features, in_features // num_groups
    if packed * 32 != bits * in_features or group_size * num_groups != in_features:
        raise GGUFError(f"{gguf_module}: packed shape {parts['weight'].shape} fits no quantization")
    return {"group_size": group_size, "bits": bits, "mode": "affine"}


def _quantization_block(quantized: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """mlx-lm's quantization config: the commonest setting on top, every module listed."""
    common = Counter((q["group_size"], q["bits"]) for q in quantized.values()).most_common(1)
    (group_size, bits), _ = common[0]
    return {"group_size": group_size, "bits": bits, "mode": "affine"} | quantized


# ---- folder ----------------------------------------------------------------------------------


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    dtype: ModelDtype = "float32",
    *,
    overwrite: bool = False,
) -> Path:
    """Convert a llama GGUF into an mlx-lm folder at out_dir; a killed run leaves no half folder.

    dtype "float32"/"bfloat16"/"float16" dequantizes every tensor to that type; "quantized" keeps
    the GGUF's own Q4_0/Q4_1/Q8_0 tensors as MLX 4/8-bit layers (other tensors stay as stored).
    """
    _check_target(Path(out_dir), dtype, overwrite)
    source = fingerprint_file(gguf_path)
    contents = read_gguf(gguf_path)
    return write_model_folder(contents, out_dir, dtype, source=source, overwrite=overwrite)


def _check_target(out_dir: Path, dtype: str, overwrite: bool) -> None:
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype must be one of {MODEL_DTYPES}, got {dtype!r}")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")


def write_model_folder(
    contents: GGUFContents,
    out_dir: str | Path,
    dtype: ModelDtype = "float32",
    *,
    source: SourceFingerprint | None = None,
    overwrite: bool = False,
) -> Path:
    """Write already-loaded GGUF contents as an mlx-lm folder (via a temp dir and a rename)."""
    out_dir = Path(out_dir)
    _check_target(out_dir, dtype, overwrite)
    config = llama_config(contents.metadata, contents.tensors)
    weights, quantized = convert_tensors(contents, config, dtype)
    if quantized:
        config["quantization"] = config["quantization_config"] = _quantization_block(quantized)
    if dtype != "quantized":
        config["torch_dtype"] = dtype

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        ids = write_tokenizer_files(contents.metadata, tmp)
        generation = {"bos_token_id": ids.bos_id, "eos_token_id": ids.eos_id}
        generation["pad_token_id"] = ids.pad_id
        record = ConversionRecord(source, dtype, CONVERTER_VERSION)
        for name, content in (
            ("config.json", config),
            ("generation_config.json", {k: v for k, v in generation.items() if v is not None}),
            (SOURCE_RECORD, asdict(record)),
        ):
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        _fsync_files(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the published folder should read like any other
        _publish(tmp, out_dir, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once published
    return out_dir


def _fsync_files(folder: Path) -> None:
    """Flush file contents before the rename publishes them (a crash must not expose empties)."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} appeared during the conversion")
    # A directory cannot be renamed onto a non-empty one: move the old aside first.
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temps(out_dir: Path) -> None:
    cutoff = time.time() - _STALE_TEMP_S
    for pattern in (f".{out_dir.name}.tmp-*", f".{out_dir.name}.old-*"):
        for leftover in out_dir.parent.glob(pattern):
            if leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)
