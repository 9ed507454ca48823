"""BERT-family encoder in MLX: BERT and (XLM-)RoBERTa, plus a sequence-classification head.

One contract for every consumer: `BertModel(input_ids, attention_mask) -> hidden [B, L, H]`.
The embedder pools those hidden states; a cross-encoder wraps the same trunk in
`BertForSequenceClassification`, whose head is `out_proj(tanh(dense(hidden[:, 0])))` for both
families (BERT's pooler + classifier and RoBERTa's classifier.dense + out_proj are that shape).
This module knows nothing about tokenizers, pooling or sentence-transformers folders.

Speed on CPU: MLX's CPU backend evaluates exp/erf one element at a time (~20 ns each here), and
its fused kernels are SIMD only when contiguous and free of min/max/where. So GELU uses a
rational erf (`fast_math.gelu_erf`), and on a CPU device the batch runs packed: the real tokens
of all sequences end to end as one [T, H] matrix (no padding in any GEMM), the attention core
(scores, softmax, context) in NumPy one sequence at a time (`bert_attention.py`: 3-5x faster
than MLX over the padded batch), and the biases of the q/k/v, attention-output and down
projections added inside those NumPy kernels instead of by MLX's addmm (its broadcast copy
of the bias costs ~8% of a GEMM here). The padded MLX path with a polynomial exp stays for
other devices.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.bert_attention import attention_context, residual_layer_norm
from inference.fast_math import gelu_erf, softmax_numerator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# model_type -> whether positions start after the padding index (RoBERTa's quirk).
_FAMILIES = {"bert": False, "roberta": True, "xlm-roberta": True, "camembert": True}
_ERF_ACTS = {"gelu"}
_TANH_ACTS = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}


@dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face config.json that the encoder uses."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_act: str = "gelu"
    num_labels: int = 1

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BertConfig:
        model_type = raw.get("model_type", "")
        if model_type not in _FAMILIES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; expected one of {sorted(_FAMILIES)}"
            )
        position_type = raw.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"unsupported position_embedding_type {position_type!r}; expected 'absolute'"
            )
        act = raw.get("hidden_act", "gelu")
        if act not in _ERF_ACTS | _TANH_ACTS | {"relu"}:
            raise ValueError(f"unsupported hidden_act {act!r}")
        if raw["hidden_size"] % raw["num_attention_heads"]:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        labels = raw.get("id2label")
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            intermediate_size=raw["intermediate_size"],
            max_position_embeddings=raw["max_position_embeddings"],
            type_vocab_size=raw.get("type_vocab_size", 2),
            layer_norm_eps=raw.get("layer_norm_eps", 1e-12),
            pad_token_id=raw.get("pad_token_id", 0) or 0,
            hidden_act=act,
            num_labels=raw.get("num_labels", len(labels) if labels else 1),
        )

    @property
    def position_offset(self) -> int:
        """First position id of a sequence: 0 for BERT, pad_token_id + 1 for RoBERTa models."""
        return self.pad_token_id + 1 if _FAMILIES[self.model_type] else 0

    @property
    def max_tokens(self) -> int:
        """Longest input, special tokens included, that the position table can hold."""
        return self.max_position_embeddings - self.position_offset


# --- the network ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mask:
    """Which keys each sequence attends to on the padded (non-CPU) path."""

    additive: mx.array  # [B, 1, 1, L]: 0 for real tokens, -inf for padding


class Embeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.offset = config.position_offset
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, input_ids: mx.array, token_type_ids: mx.array | None) -> mx.array:
        length = input_ids.shape[1]
        # Right padding only, so positions are offset..offset+L-1 for every row (RoBERTa too).
        positions = self.position_embeddings.weight[self.offset : self.offset + length]
        if token_type_ids is None:
            types = self.token_type_embeddings.weight[0]
        else:
            types = self.token_type_embeddings(token_type_ids)
        return self.norm(self.word_embeddings(input_ids) + positions + types)

    def packed(
        self, input_ids: mx.array, positions: mx.array, token_type_ids: mx.array | None
    ) -> mx.array:
        """[T] token ids of sequences laid end to end and each one's position from 0 -> [T, H]."""
        if token_type_ids is None:
            types = self.token_type_embeddings.weight[0]
        else:
            types = self.token_type_embeddings(token_type_ids)
        positions = self.position_embeddings(positions + self.offset)
        return self.norm(self.word_embeddings(input_ids) + positions + types)


class Attention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.scale = (config.hidden_size // config.num_attention_heads) ** -0.5
        # query, key and value fused into one matmul (see `sanitize`).
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)

    def packed(self, x: mx.array, lengths: list[int]) -> mx.array:
        """[T, H] packed sequences -> the output projection [T, H], without its bias."""
        qkv_bias = self.qkv.bias if "bias" in self.qkv else None
        context = attention_context(
            x @ self.qkv.weight.T, qkv_bias, lengths, self.num_heads, self.scale
        )
        return context.astype(x.dtype) @ self.out.weight.T

    def __call__(self, x: mx.array, mask: Mask) -> mx.array:
        batch, length, hidden = x.shape
        # [B, L, 3H] -> 3 x [B, heads, L, head_dim]
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        # mask: [B, 1, 1, L] additive (0 or -inf); addmm writes it and the scaled scores in one pass.
        scores = mx.addmm(
            mask.additive, q, k.swapaxes(-1, -2), alpha=self.scale
        )  # [B, heads, L, L]
        weights = softmax_numerator(scores)
        context = (weights @ v) / weights.sum(axis=-1, keepdims=True)  # normalise the small side
        return self.out(context.transpose(0, 2, 1, 3).reshape(batch, length, hidden))


class Layer(nn.Module):
    """Post-norm transformer block: x = norm(x + attn(x)); x = norm(x + down(act(up(x))))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = Attention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.hidden_act in _ERF_ACTS:
            self.act = gelu_erf
        elif config.hidden_act in _TANH_ACTS:
            self.act = nn.gelu_approx
        else:
            self.act = nn.relu

    def __call__(self, x: mx.array, mask: Mask) -> mx.array:
        x = self.attention_norm(x + self.attention(x, mask))
        return self.ffn_norm(x + self.down(self.act(self.up(x))))

    def packed(self, x: mx.array, lengths: list[int]) -> mx.array:
        """The CPU path over [T, H] packed sequences: NumPy attention and residual + norm
        (bert_attention.py), which also add the attention-output and down biases."""
        attended = self.attention.packed(x, lengths)
        x = _residual_norm(self.attention_norm, x, attended, self.attention.out).astype(x.dtype)
        down = self.act(self.up(x)) @ self.down.weight.T
        return _residual_norm(self.ffn_norm, x, down, self.down).astype(x.dtype)


def _residual_norm(norm: nn.LayerNorm, x: mx.array, residual: mx.array, source: nn.Linear):
    """norm(x + residual + source's bias): the bias that `residual`'s projection left out."""
    bias = source.bias if "bias" in source else None
    return residual_layer_norm(x, residual, bias, norm.weight, norm.bias, norm.eps)


class BertModel(nn.Module):
    """The encoder trunk: token ids and a 0/1 mask in, the last hidden states out."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = [Layer(config) for _ in range(config.num_hidden_layers)]

    def __call__(
        self,
        input_ids: mx.array,
        attention_mask: mx.array,
        token_type_ids: mx.array | None = None,
    ) -> mx.array:
        """input_ids, attention_mask: [B, L] (right-padded) -> hidden states [B, L, H]."""
        if mx.default_device() == mx.cpu:
            return self._packed(input_ids, attention_mask, token_type_ids)
        x = self.embeddings(input_ids, token_type_ids)
        additive = mx.where(attention_mask.astype(mx.bool_), 0.0, -mx.inf).astype(x.dtype)
        mask = Mask(additive[:, None, None, :])
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def _packed(
        self, input_ids: mx.array, attention_mask: mx.array, token_type_ids: mx.array | None
    ) -> mx.array:
        """The CPU path: real tokens only, end to end, through every layer; padded positions of
        the [B, L, H] result are zeros."""
        batch, length = input_ids.shape
        lengths = attention_mask.astype(mx.int32).sum(axis=1).tolist()
        rows = np.repeat(np.arange(batch), lengths)
        positions = np.concatenate([np.arange(n) for n in lengths] or [np.zeros(0, np.int64)])
        flat = mx.array((rows * length + positions).astype(np.int32))
        types = None if token_type_ids is None else token_type_ids.reshape(-1)[flat]
        x = self.embeddings.packed(
            input_ids.reshape(-1)[flat], mx.array(positions.astype(np.int32)), types
        )
        for layer in self.layers:
            x = layer.packed(x, lengths)
        # Back to [B, L, H]: padded positions gather the zero row appended at index T.
        total = len(rows)
        where = np.full((batch, length), total, dtype=np.int32)
        where[rows, positions] = np.arange(total, dtype=np.int32)
        padded = mx.concatenate([x, mx.zeros((1, x.shape[-1]), dtype=x.dtype)])
        return padded[mx.array(where)]


class ClassifierHead(nn.Module):
    """out_proj(tanh(dense(CLS))): BERT's pooler + classifier, RoBERTa's classifier block."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def __call__(self, hidden: mx.array) -> mx.array:
        return self.out_proj(mx.tanh(self.dense(hidden[:, 0])))


class BertForSequenceClassification(nn.Module):
    """The trunk plus a classifier head: logits [B, num_labels] (a cross-encoder's scores)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.head = ClassifierHead(config)

    def __call__(
        self,
        input_ids: mx.array,
        attention_mask: mx.array,
        token_type_ids: mx.array | None = None,
    ) -> mx.array:
        return self.head(self.bert(input_ids, attention_mask, token_type_ids))


# --- weights ----------------------------------------------------------------------------------

# Hugging Face key (after the `bert.` / `roberta.` prefix is dropped) -> ours.
_RENAMES = (
    (r"^embeddings\.LayerNorm\.", "embeddings.norm."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.out."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attention_norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.up."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.down."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.ffn_norm."),
)
_HEAD_RENAMES = (
    (r"^pooler\.dense\.", "head.dense."),  # BERT: pooler then classifier
    (r"^classifier\.dense\.", "head.dense."),  # RoBERTa: classifier.dense then out_proj
    (r"^classifier\.out_proj\.", "head.out_proj."),
    (r"^classifier\.", "head.out_proj."),
)
_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)$")
_DROPPED = re.compile(r"(position_ids|lm_head|cls\.predictions|cls\.seq_relationship)")


def sanitize(weights: dict[str, mx.array], *, with_head: bool) -> dict[str, mx.array]:
    """Map a Hugging Face BERT / RoBERTa state dict onto this module's names.

    Accepts bare trunk keys (`embeddings.*`, as sentence-transformers saves them) and prefixed
    ones (`bert.*`, `roberta.*`, as *ForSequenceClassification saves them); old TF-era names
    (`gamma` / `beta`) too. With `with_head` False the pooler and any classifier are dropped.
    """
    out: dict[str, mx.array] = {}
    qkv: dict[tuple[str, str], dict[str, mx.array]] = {}
    for key, value in weights.items():
        key = re.sub(r"^(bert|roberta|model)\.", "", key)
        key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
        if _DROPPED.search(key):
            continue
        if match := _QKV.match(key):
            layer, part, kind = match.groups()
            qkv.setdefault((layer, kind), {})[part] = value
            continue
        head_key = _rename(key, _HEAD_RENAMES)
        if head_key != key:
            if with_head:
                out[head_key] = value
            continue
        out[_rename(key, _RENAMES)] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"layer {layer}: incomplete attention {kind}s, got {sorted(parts)}")
        out[f"layers.{layer}.attention.qkv.{kind}"] = mx.concatenate(
            [parts["query"], parts["key"], parts["value"]], axis=0
        )
    return out


def _rename(key: str, table: tuple[tuple[str, str], ...]) -> str:
    for pattern, replacement in table:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    return key


def load_weights(folder: Path) -> dict[str, mx.array]:
    """All tensors of a folder's safetensors files (sharded checkpoints included)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        found = "pytorch_model.bin" if (folder / "pytorch_model.bin").exists() else "nothing"
        raise FileNotFoundError(
            f"{folder}: no *.safetensors weights (found {found}); convert to safetensors"
        )
    weights: dict[str, mx.array] = {}
    for file in files:
        weights.update(mx.load(str(file)))
    return weights


def make_model(
    config: BertConfig,
    weights: dict[str, mx.array],
    *,
    with_head: bool = False,
    dtype: mx.Dtype = mx.float32,
) -> BertModel | BertForSequenceClassification:
    """Build the trunk (or trunk + head) and load `weights` strictly: every parameter must be set."""
    model: BertModel | BertForSequenceClassification
    if with_head:
        model = BertForSequenceClassification(config)
        params = {
            ("bert." + k if not k.startswith("head.") else k): v
            for k, v in sanitize(weights, with_head=True).items()
        }
    else:
        model = BertModel(config)
        params = sanitize(weights, with_head=False)
    # fp32 is the fastest CPU path (BLAS); half-precision checkpoints are widened here.
    params = {k: v.astype(dtype) for k, v in params.items()}
    model.load_weights(list(params.items()), strict=True)
    mx.eval(model.parameters())
    return model


def load_model(
    folder: Path, *, with_head: bool = False
) -> BertModel | BertForSequenceClassification:
    """config.json + *.safetensors of a Hugging Face folder -> the trunk, or trunk + classifier."""
    config = BertConfig.from_dict(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    return make_model(config, load_weights(folder), with_head=with_head)
