"""Cross-encoder relevance in MLX: (query, document) pairs in, one score per document out.

Loads a Hugging Face *ForSequenceClassification folder of the BERT family (BERT, XLM-RoBERTa,
RoBERTa): config.json, *.safetensors, tokenizer.json. Each pair is encoded as the tokenizer's pair
template (BERT: `[CLS] query [SEP] document [SEP]` with token types 0 / 1; XLM-R:
`<s> query </s></s> document </s>`, no token types), truncated "longest first" to the model's
limit exactly as the reference tokenizer does it (the longer side, nearly always the document,
loses tokens first; the query is cut only when it holds more than half the room), sorted by length
into token-budgeted batches (the embedder's `plan_batches`) and scored:

    num_labels == 1:  raw = logit                   score = sigmoid(raw)
    num_labels == 2:  raw = logit[1] - logit[0]     score = sigmoid(raw) = softmax(logits)[1]

With several batches on a CPU they run on parallel lanes (`encoder_lanes.py`), else on the
calling thread. Ignores: retrieval, HTTP, what a score is used for,
and a folder's sentence-transformers activation setting (scores are always probabilities here; the
raw logits are returned beside them).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from inference.bert import BertConfig, BertForSequenceClassification, load_weights, make_model
from inference.embedder import (
    DEFAULT_BATCH_TOKENS,
    DEFAULT_MAX_BATCH,
    MIN_BUFFER_CACHE_BYTES,
    bucket_length,
    ensure_buffer_cache,
    plan_batches,
)
from inference.encoder_lanes import EncoderBatches

import mlx.core as mx
import numpy as np
from tokenizers import Encoding, Tokenizer

_HEAD_KEY = re.compile(r"(^|\.)classifier\.")
_UNBOUNDED = 10**9  # tokenizer_config's model_max_length when the tokenizer sets no limit


class NotACrossEncoderError(ValueError):
    """The folder holds a model, but not a sequence classifier this module can score with."""


@dataclass(frozen=True)
class CrossEncoderScores:
    """Scores of documents against one query, in input order."""

    raw: np.ndarray  # float32 [n]: the logit (one label) or the label-1 log-odds (two labels)
    scores: list[float]  # sigmoid(raw): relevance in [0, 1]
    num_tokens: list[int]  # tokens per pair incl. special tokens, after truncation
    truncated: list[bool]  # True where the pair was cut to max_tokens


class CrossEncoder:
    """A loaded cross-encoder: `score(query, documents)`."""

    def __init__(
        self,
        *,
        name: str,
        model: BertForSequenceClassification,
        tokenizer: Tokenizer,
        max_tokens: int,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        max_batch: int = DEFAULT_MAX_BATCH,
        lanes: int | None = None,
    ):
        config = model.config
        if config.num_labels not in (1, 2):
            raise NotACrossEncoderError(
                f"{name}: num_labels={config.num_labels}; a reranker has 1 (a relevance logit) "
                "or 2 (irrelevant / relevant)"
            )
        if batch_tokens < max_tokens or max_batch < 1:
            raise ValueError(
                f"batch_tokens={batch_tokens} must hold one max_tokens={max_tokens} pair"
            )
        self.name = name
        self.model = model
        self.num_labels = config.num_labels
        self.max_tokens = max_tokens
        self.batch_tokens = batch_tokens
        self.max_batch = max_batch
        self._runner = EncoderBatches(lanes)  # lanes None: one per core on a CPU (up to 4)
        # BERT embeds token types (query 0, document 1); RoBERTa-style models have one type row.
        self._use_token_types = config.type_vocab_size > 1
        self._pad_id = config.pad_token_id
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()  # batching pads
        self._tokenizer.enable_truncation(max_length=max_tokens, strategy="longest_first")
        num_special = len(self._tokenizer.encode("", "").ids)
        if max_tokens <= num_special + 1:
            raise ValueError(f"max_tokens={max_tokens} leaves no room for a query and a document")

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        max_tokens: int | None = None,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        max_batch: int = DEFAULT_MAX_BATCH,
        lanes: int | None = None,
    ) -> CrossEncoder:
        """Load a *ForSequenceClassification folder; `max_tokens` may only lower its limit."""
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: not a model folder (no config.json)")
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{folder}: no tokenizer.json (a fast tokenizer is required)")
        raw_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        architectures = raw_config.get("architectures") or []
        if architectures and not any(
            a.endswith("ForSequenceClassification") for a in architectures
        ):
            raise NotACrossEncoderError(
                f"{folder}: architectures {architectures}; a cross-encoder is a "
                "*ForSequenceClassification model (e.g. BertForSequenceClassification)"
            )
        config = BertConfig.from_dict(raw_config)
        limit = min(config.max_tokens, _tokenizer_limit(folder))
        if max_tokens is None:
            max_tokens = limit
        elif not 0 < max_tokens <= limit:
            raise ValueError(f"max_tokens={max_tokens}: this model takes 1..{limit}")
        weights = load_weights(folder)
        if not any(_HEAD_KEY.search(key) for key in weights):
            raise NotACrossEncoderError(
                f"{folder}: the weights have no classifier head (no 'classifier.*' tensors); "
                "is this an embedding model rather than a cross-encoder?"
            )
        ensure_buffer_cache(MIN_BUFFER_CACHE_BYTES)
        try:
            model = make_model(config, weights, with_head=True)
        except ValueError as exc:
            raise NotACrossEncoderError(f"{folder}: weights do not fit the config: {exc}") from exc
        assert isinstance(model, BertForSequenceClassification)
        return cls(
            name=folder.resolve().name,
            model=model,
            tokenizer=Tokenizer.from_file(str(folder / "tokenizer.json")),
            max_tokens=max_tokens,
            batch_tokens=batch_tokens,
            max_batch=max_batch,
            lanes=lanes,
        )

    def score(self, query: str, documents: list[str]) -> CrossEncoderScores:
        """Relevance of each document to the query, in input order."""
        if not isinstance(query, str) or not isinstance(documents, list | tuple):
            raise TypeError("score(query: str, documents: list[str])")
        encodings = self._tokenizer.encode_batch([(query, d) for d in documents])
        lengths = [len(e.ids) for e in encodings]
        raw = np.zeros(len(documents), dtype=np.float32)
        results = self._runner.run(
            lambda cap: list(
                plan_batches(
                    lengths,
                    max_tokens=self.max_tokens,
                    batch_tokens=min(self.batch_tokens, cap or self.batch_tokens),
                    max_batch=self.max_batch,
                )
            ),
            sum(bucket_length(n, self.max_tokens) for n in lengths),
            lambda rows: self._forward([encodings[i] for i in rows]),
        )
        for rows, logits in results:
            raw[rows] = _raw_scores(logits)
        return CrossEncoderScores(
            raw=raw,
            scores=sigmoid(raw).tolist(),
            num_tokens=lengths,
            truncated=[bool(e.overflowing) for e in encodings],
        )

    def close(self) -> None:
        """Stop the lane threads, if any ran (also done at interpreter exit)."""
        self._runner.close()

    def _forward(self, encodings: list[Encoding]) -> mx.array:
        """One right-padded batch of pairs -> logits [B, num_labels] fp32."""
        lengths = [len(e.ids) for e in encodings]
        padded = bucket_length(max(lengths), self.max_tokens)
        ids = np.full((len(encodings), padded), self._pad_id, dtype=np.int32)
        types = np.zeros((len(encodings), padded), dtype=np.int32)
        for row, e in enumerate(encodings):
            ids[row, : lengths[row]] = e.ids
            types[row, : lengths[row]] = e.type_ids
        mask = mx.arange(padded)[None, :] < mx.array(lengths)[:, None]  # [B, L] bool
        token_types = mx.array(types) if self._use_token_types else None
        return self.model(mx.array(ids), mask, token_types).astype(mx.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) without overflow for large |x|."""
    return (0.5 * (1.0 + np.tanh(0.5 * x.astype(np.float64)))).astype(np.float32)


def _raw_scores(logits: np.ndarray) -> np.ndarray:
    """[B, 1] -> the logit; [B, 2] -> log-odds of label 1, so that sigmoid gives softmax[:, 1]."""
    if logits.shape[1] == 1:
        return logits[:, 0]
    return logits[:, 1] - logits[:, 0]


def _tokenizer_limit(folder: Path) -> int:
    """tokenizer_config.json's model_max_length, or no limit when it is absent or unbounded."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return _UNBOUNDED
    limit = json.loads(path.read_text(encoding="utf-8")).get("model_max_length")
    return int(limit) if isinstance(limit, int | float) and 0 < limit < _UNBOUNDED else _UNBOUNDED
