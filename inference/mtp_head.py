"""MTP heads: a small block that reads (h_t, x_{t+1}) and predicts x_{t+2}, with its own KV cache.

The layout is the one Qwen3-Next / Qwen3.5 checkpoints ship as `mtp.*` tensors:

    e   = pre_fc_norm_embedding(embed(x_{t+1}))     embed: the trunk's own, shared
    g   = pre_fc_norm_hidden(h_t)                   h_t: the trunk's hidden state at t
    z   = fc(concat[e, g])                          (2H -> H)
    z   = layers[i](z, mask, cache[i])              decoder block(s), their own KV cache
    out = norm(z)                                   -> the trunk's lm_head: logits for x_{t+2}

`out` also stands in for h at the next depth (D2 / D3 run the same head on its own output).

A head may draft from a subset of the vocabulary (`draft_ids`, the tokens the fitted trunk emits
most): its logits are then out @ lm_head[draft_ids].T, a quarter of the cost on a CPU, and every
other token has draft probability 0 (the acceptance rule stays exact).

Two ways to get one:
- native: the `mtp.*` tensors of a Hugging Face Qwen3-Next / Qwen3.5 checkpoint, which mlx-lm's
  `sanitize` drops, read here from the model folder. Blocks are the trunk's own full-attention
  layer class; the checkpoint's zero-centred RMSNorm gains get +1, as mlx-lm does for the trunk.
- generic: the same shape for any mlx-lm model, with mlx-lm llama blocks sized from the trunk's
  config; random at first (`mtp_fit` fits one), saved and loaded as a sidecar
  `mtp_head.safetensors` in the model folder (mlx-lm's loader reads only `model*.safetensors`,
  so it never sees the sidecar), or shipped in this package's `heads/` folder for a model the
  appliance installs, matched by the GGUF it was converted from or the folder's fingerprint.

Which trunk hidden state feeds the head (before or after the trunk's final norm) differs by family
and is probed by acceptance; it travels with the head as `HeadConfig.hidden_source`.

Ignores: drafting, acceptance, sampling and fitting a head.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from inference.gguf_convert import read_conversion_record
from inference.model_fingerprint import fingerprint_model_dir, parameters_dtype

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

HiddenSource = Literal["pre_norm", "post_norm"]
HIDDEN_SOURCES: tuple[HiddenSource, ...] = ("pre_norm", "post_norm")
SIDECAR_NAME = "mtp_head.safetensors"
SIDECAR_FORMAT = "rag-mtp-head"
SIDECAR_VERSION = "1"
DRAFT_IDS_KEY = "draft_ids"  # sidecar tensor: the draft vocabulary, absent for the full one
PACKAGED_HEADS_DIR = Path(__file__).parent / "heads"
# Families whose checkpoints carry native `mtp.*` weights in this layout.
NATIVE_FAMILIES = ("qwen3_next", "qwen3_5", "qwen3_5_moe")
_MTP_KEY = re.compile(r"^(?:.*\.)?mtp\.(.+)$")
_EXPERT_KEY = re.compile(r"^(layers\.\d+\.mlp)\.experts\.(\d+)\.(\w+_proj)\.weight$")
_BLOCK_ARG_NAMES = (
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "rms_norm_eps",
    "rope_theta",
    "rope_traditional",
    "rope_scaling",
    "max_position_embeddings",
)


class HeadLoadError(ValueError):
    """An MTP head's weights or sidecar do not fit the model; says what was got and wanted."""


@dataclass(frozen=True)
class HeadConfig:
    """What kind of head it is and which trunk hidden state it reads."""

    kind: Literal["native", "generic"]
    hidden_source: HiddenSource = "post_norm"
    block_args: Mapping[str, Any] = field(default_factory=dict)  # generic heads: llama block

    def __post_init__(self) -> None:
        if self.hidden_source not in HIDDEN_SOURCES:
            raise ValueError(
                f"hidden_source must be one of {HIDDEN_SOURCES}, got {self.hidden_source!r}"
            )


class MTPHead(nn.Module):
    """The head's own weights; the embedding and lm_head it uses stay with the trunk."""

    def __init__(
        self, hidden_size: int, eps: float, layers: list[nn.Module], config: HeadConfig
    ) -> None:
        super().__init__()
        self.pre_fc_norm_embedding = nn.RMSNorm(hidden_size, eps=eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(hidden_size, eps=eps)
        self.fc = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.layers = layers
        self.norm = nn.RMSNorm(hidden_size, eps=eps)
        self.config = config
        self._draft_ids: mx.array | None = None  # underscore: not a parameter, never trained
        self._draft_ids_host: np.ndarray | None = None  # the same ids, for host-side scatters

    @property
    def draft_ids(self) -> mx.array | None:
        """(V',) sorted int32 token ids the head drafts from; None drafts from the whole vocab."""
        return self._draft_ids

    @property
    def draft_ids_host(self) -> np.ndarray | None:
        """draft_ids as a NumPy int64 array (None drafts from the whole vocab)."""
        return self._draft_ids_host

    def set_draft_ids(self, token_ids: Sequence[int] | mx.array | None) -> None:
        if token_ids is None:
            self._draft_ids = self._draft_ids_host = None
            return
        ids = sorted({int(t) for t in np.array(token_ids).reshape(-1).tolist()})
        if not ids or ids[0] < 0:
            raise ValueError(f"draft ids must be non-empty and >= 0, got {len(ids)} ids")
        self._draft_ids = mx.array(ids, dtype=mx.int32)
        self._draft_ids_host = np.array(ids, dtype=np.int64)

    def __call__(self, embeddings: mx.array, hiddens: mx.array, cache: list[KVCache]) -> mx.array:
        """(B, L, H) embeddings of x_{t+1} and trunk hiddens h_t -> (B, L, H) head outputs."""
        x = mx.concatenate(
            [self.pre_fc_norm_embedding(embeddings), self.pre_fc_norm_hidden(hiddens)], axis=-1
        )
        x = self.fc(x)
        mask = create_attention_mask(x, cache[0])
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            x = layer(x, mask, cache=layer_cache)
        return self.norm(x)

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]


def fingerprint_head(head: MTPHead) -> str:
    """32 hex digits naming the head's weights, draft vocabulary and config (what its cached
    context depends on besides the trunk)."""
    digest = hashlib.blake2b(digest_size=16)
    config = head.config
    described = [config.kind, config.hidden_source, dict(config.block_args)]
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    arrays = dict(tree_flatten(head.parameters()))
    if head.draft_ids is not None:
        arrays[DRAFT_IDS_KEY] = head.draft_ids
    for name in sorted(arrays):
        array = arrays[name]
        if array.dtype == mx.bfloat16:
            array = array.view(mx.uint16)  # numpy has no bfloat16: hash the bits
        digest.update(f"\0{name}\0{array.dtype}\0{array.shape}\0".encode())
        digest.update(np.array(array).tobytes())
    return digest.hexdigest()


def text_model(model: nn.Module) -> nn.Module:
    """The part of an mlx-lm model that holds `.model` (embed, layers, norm), `.args`, lm_head."""
    return getattr(model, "language_model", model)


# -- generic heads -------------------------------------------------------------------------------


def generic_block_args(model: nn.Module) -> dict[str, Any]:
    """mlx-lm llama block arguments sized like the trunk's own layers."""
    args = text_model(model).args
    block_args: dict[str, Any] = {"model_type": "llama", "num_hidden_layers": 1, "vocab_size": 1}
    for name in _BLOCK_ARG_NAMES:
        value = getattr(args, name, None)
        if value is not None:
            block_args[name] = value
    missing = {"hidden_size", "num_attention_heads", "intermediate_size", "rms_norm_eps"}
    if missing - block_args.keys():
        raise HeadLoadError(
            f"{type(model).__module__}: config lacks {sorted(missing - block_args.keys())}, "
            "which a generic head needs to size its block"
        )
    return block_args


def make_generic_head(
    model: nn.Module,
    *,
    num_layers: int = 1,
    hidden_source: HiddenSource = "post_norm",
    block_args: Mapping[str, Any] | None = None,
) -> MTPHead:
    """A randomly initialised generic head for `model` (mlx's default init; seed mx.random first)."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    block_args = dict(block_args or generic_block_args(model))
    hidden_size = text_model(model).args.hidden_size
    if block_args["hidden_size"] != hidden_size:
        raise HeadLoadError(
            f"generic head of width {block_args['hidden_size']} for a model of width {hidden_size}"
        )
    layer_args = llama.ModelArgs.from_dict(block_args)
    layers = [llama.TransformerBlock(layer_args) for _ in range(num_layers)]
    config = HeadConfig("generic", hidden_source, block_args)
    return MTPHead(hidden_size, block_args["rms_norm_eps"], layers, config)


def sidecar_path(model_dir: Path) -> Path:
    return Path(model_dir) / SIDECAR_NAME


def save_head(head: MTPHead, path: Path, info: Mapping[str, Any] | None = None) -> None:
    """Write a generic head as a sidecar safetensors file (config, and `info` such as how it was
    fitted, in the metadata; the draft vocabulary as one more tensor)."""
    if head.config.kind != "generic":
        raise ValueError(f"only generic heads are saved as sidecars, got a {head.config.kind} head")
    config = {
        "hidden_source": head.config.hidden_source,
        "num_layers": len(head.layers),
        "block_args": dict(head.config.block_args),
    }
    metadata = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "config": json.dumps(config)}
    if info is not None:
        metadata["info"] = json.dumps(dict(info))
    tensors = dict(tree_flatten(head.parameters()))
    if head.draft_ids is not None:
        tensors[DRAFT_IDS_KEY] = head.draft_ids
    mx.save_safetensors(str(path), tensors, metadata=metadata)


def read_sidecar_info(path: Path) -> dict[str, Any]:
    """A sidecar's `info` metadata ({} when it has none), read from the header alone."""
    with Path(path).open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    metadata = header.get("__metadata__", {})
    return json.loads(metadata["info"]) if "info" in metadata else {}


def load_sidecar_head(path: Path, model: nn.Module) -> MTPHead:
    """Rebuild a generic head from its sidecar file and check it fits `model`."""
    weights, metadata = mx.load(str(path), return_metadata=True)
    got = (metadata.get("format"), metadata.get("version"))
    if got != (SIDECAR_FORMAT, SIDECAR_VERSION):
        raise HeadLoadError(
            f"{path}: format/version {got}, want ({SIDECAR_FORMAT!r}, {SIDECAR_VERSION!r})"
        )
    config = json.loads(metadata["config"])
    head = make_generic_head(
        model,
        num_layers=config["num_layers"],
        hidden_source=config["hidden_source"],
        block_args=config["block_args"],
    )
    draft_ids = weights.pop(DRAFT_IDS_KEY, None)
    vocab_size = text_model(model).args.vocab_size
    if draft_ids is not None and int(mx.max(draft_ids).item()) >= vocab_size:
        raise HeadLoadError(
            f"{path}: draft ids reach {int(mx.max(draft_ids).item())}, want < vocab {vocab_size}"
        )
    _load_strict(head, weights, str(path))
    # A head shipped as fp16 runs in the trunk's float dtype (fp16 matmuls skip BLAS on a CPU).
    dtype = text_model(model).model.embed_tokens.weight.dtype
    if mx.issubdtype(dtype, mx.floating):
        head.set_dtype(dtype)
        mx.eval(head.parameters())
    head.set_draft_ids(draft_ids)
    return head


def packaged_head_path(model_dir: Path, model: nn.Module) -> Path | None:
    """A head shipped in `heads/` that was fitted on this model: same GGUF source (any dtype it
    was converted to) or the same folder fingerprint; None when none matches."""
    candidates = sorted(PACKAGED_HEADS_DIR.glob("*.safetensors"))
    if not candidates:
        return None
    record = read_conversion_record(Path(model_dir))
    source_sha = record.source.sha256 if record and record.source else None
    fingerprint: str | None = None
    for path in candidates:
        info = read_sidecar_info(path)
        if source_sha and info.get("gguf_sha256") == source_sha:
            return path
        if "trunk_fingerprint" in info:
            if fingerprint is None:
                dtype = parameters_dtype(v for _, v in tree_flatten(model.parameters()))
                fingerprint = fingerprint_model_dir(model_dir, dtype)
            if info["trunk_fingerprint"] == fingerprint:
                return path
    return None


def describe_head(model_dir: Path) -> str | None:
    """Which draft head `load_head` would use for this folder, without loading the model (the
    packaged-head match by folder fingerprint needs the model, so only the GGUF match is seen)."""
    model_dir = Path(model_dir)
    try:
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        model_type = None
    if model_type in NATIVE_FAMILIES and read_native_weights(model_dir):
        return "native mtp.* weights"
    if sidecar_path(model_dir).is_file():
        return f"sidecar {sidecar_path(model_dir).name}"
    record = read_conversion_record(model_dir)
    source_sha = record.source.sha256 if record and record.source else None
    for path in sorted(PACKAGED_HEADS_DIR.glob("*.safetensors")):
        if source_sha and read_sidecar_info(path).get("gguf_sha256") == source_sha:
            return f"packaged {path.name}"
    return None


# -- native heads --------------------------------------------------------------------------------


def read_native_weights(model_dir: Path) -> dict[str, mx.array]:
    """The checkpoint's `mtp.*` tensors with the prefix stripped ({} when there are none)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / f for k, f in weight_map.items() if _MTP_KEY.match(k)})
    else:
        files = sorted(model_dir.glob("model*.safetensors"))
    weights: dict[str, mx.array] = {}
    for file in files:
        # mx.load is lazy: tensors not taken here are never read from disk.
        for key, value in mx.load(str(file)).items():
            match = _MTP_KEY.match(key)
            if match:
                weights[match.group(1)] = value
    return weights


def load_native_head(
    model_dir: Path,
    model: nn.Module,
    *,
    hidden_source: HiddenSource = "post_norm",
    shift_norms: bool = True,
) -> MTPHead | None:
    """The native head of a Qwen3-Next / Qwen3.5 checkpoint folder, or None if it has none.

    shift_norms: the Hugging Face tensors store RMSNorm gains zero-centred (1 + w); mlx-lm adds
    the 1 to the trunk's in `sanitize`, so the head's need it too (unshifted, acceptance is ~0).
    """
    weights = read_native_weights(model_dir)
    if not weights:
        return None
    return native_head_from_weights(
        weights, model, hidden_source=hidden_source, shift_norms=shift_norms
    )


def native_head_from_weights(
    weights: Mapping[str, mx.array],
    model: nn.Module,
    *,
    hidden_source: HiddenSource = "post_norm",
    shift_norms: bool = True,
) -> MTPHead:
    """Build a native head from Hugging Face `mtp.*` tensors (prefix already stripped)."""
    family = getattr(model, "model_type", None)
    if family not in NATIVE_FAMILIES:
        raise HeadLoadError(
            f"native MTP heads are read for {', '.join(NATIVE_FAMILIES)}, got model type {family!r}"
        )
    text = text_model(model)
    trunk_layers = text.model.layers
    # Head blocks are full-attention layers of the trunk's own class (built by index).
    attention_idx = next(
        (i for i, layer in enumerate(trunk_layers) if not getattr(layer, "is_linear", False)), None
    )
    if attention_idx is None:
        raise HeadLoadError(f"{family}: the trunk has no full-attention layer to copy the class of")
    layer_numbers = {int(k.split(".")[1]) for k in weights if k.startswith("layers.")}
    if not layer_numbers or layer_numbers != set(range(len(layer_numbers))):
        raise HeadLoadError(f"mtp layers {sorted(layer_numbers)}, want 0..N-1 with N >= 1")
    layer_cls = type(trunk_layers[attention_idx])
    layers = [layer_cls(text.args, attention_idx) for _ in layer_numbers]
    config = HeadConfig("native", hidden_source)
    head = MTPHead(text.args.hidden_size, text.args.rms_norm_eps, layers, config)
    dtype = text.model.embed_tokens.weight.dtype
    converted = to_mlx_layout(weights, shift_norms=shift_norms)
    if mx.issubdtype(dtype, mx.floating):
        converted = {k: v.astype(dtype) for k, v in converted.items()}
    _load_strict(head, converted, f"{family} mtp.*")
    return head


def to_mlx_layout(weights: Mapping[str, mx.array], *, shift_norms: bool) -> dict[str, mx.array]:
    """Hugging Face names and gains -> this module's: experts stacked, norms shifted by +1."""
    converted: dict[str, mx.array] = {}
    experts: dict[tuple[str, str], dict[int, mx.array]] = {}
    for key, value in weights.items():
        expert = _EXPERT_KEY.match(key)
        if expert:  # one tensor per expert -> one stacked SwitchGLU tensor
            prefix, number, proj = expert.groups()
            experts.setdefault((prefix, proj), {})[int(number)] = value
        elif key.endswith(".experts.gate_up_proj"):  # fused gate and up, Qwen3.5-MoE style
            prefix = key.removesuffix(".experts.gate_up_proj")
            middle = value.shape[-2] // 2
            converted[f"{prefix}.switch_mlp.gate_proj.weight"] = value[..., :middle, :]
            converted[f"{prefix}.switch_mlp.up_proj.weight"] = value[..., middle:, :]
        elif key.endswith(".experts.down_proj"):
            converted[key.replace(".experts.down_proj", ".switch_mlp.down_proj.weight")] = value
        elif shift_norms and key.endswith("norm.weight") and value.ndim == 1:
            converted[key] = value + 1.0
        else:
            converted[key] = value
    for (prefix, proj), by_number in experts.items():
        stacked = [by_number[i] for i in range(len(by_number))]
        converted[f"{prefix}.switch_mlp.{proj}.weight"] = mx.stack(stacked)
    return converted


def _load_strict(head: MTPHead, weights: Mapping[str, mx.array], source: str) -> None:
    want = dict(tree_flatten(head.parameters()))
    missing = sorted(want.keys() - weights.keys())
    unexpected = sorted(weights.keys() - want.keys())
    if missing or unexpected:
        raise HeadLoadError(f"{source}: missing {missing[:8]}, unexpected {unexpected[:8]}")
    wrong = [
        f"{k}: got {tuple(v.shape)}, want {tuple(want[k].shape)}"
        for k, v in weights.items()
        if v.shape != want[k].shape
    ]
    if wrong:
        raise HeadLoadError(f"{source}: shapes differ: {'; '.join(wrong[:8])}")
    head.load_weights(list(weights.items()))
    mx.eval(head.parameters())


def load_head(
    model_dir: Path, model: nn.Module, *, hidden_source: HiddenSource = "post_norm"
) -> MTPHead | None:
    """The model's native head if its checkpoint has one, else its sidecar, else a packaged head
    fitted on it, else None."""
    head = None
    if getattr(model, "model_type", None) in NATIVE_FAMILIES:
        head = load_native_head(model_dir, model, hidden_source=hidden_source)
    if head is None and sidecar_path(model_dir).is_file():
        head = load_sidecar_head(sidecar_path(model_dir), model)
    if head is None and (packaged := packaged_head_path(model_dir, model)) is not None:
        head = load_sidecar_head(packaged, model)
    return head
