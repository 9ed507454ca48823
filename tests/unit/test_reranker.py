"""The MLX cross-encoder on tiny random folders, and the rerankers `rag` builds on it.

Shapes and ranges, "longest first" truncation, batching invariance, one vs two labels, folders
that are not cross-encoders; then the two `rag.reranking` implementations and choose_reranker.
Agreement with the reference implementation is test_reranker_parity.py's job.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from inference.embedder import Embedder
from inference.reranker import CrossEncoder, NotACrossEncoderError

import mlx.core as mx
import numpy as np
import pytest

from rag.reranking import (
    CROSS_ENCODER,
    EMBEDDING_SIMILARITY,
    CrossEncoderReranker,
    EmbeddingSimilarityReranker,
    Reranker,
)
from rag.server.reranker_choice import choose_reranker
from tests.fixtures.tiny_bert import MAX_POSITIONS
from tests.reference.make_cross_encoder_reference import build_models

QUERY = "what is the capital of france"
DOCUMENTS = [
    "paris is the capital of france",
    "rome",
    "",
    "the capital of italy is rome, the capital of france is paris.",
    "café é 日本 🙂 zzz!",
    "retrieval augmented generation " * 3,
]
LONG = "the capital of france is paris and the capital of italy is rome " * 4


@pytest.fixture(scope="module")
def encoder(tiny_cross_encoder_path: Path) -> CrossEncoder:
    return CrossEncoder.load(tiny_cross_encoder_path)


@pytest.fixture(scope="module")
def two_label_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_models(tmp_path_factory.mktemp("variants"))["bert2"]


# --- scores -------------------------------------------------------------------------------------


def test_scores_shapes_and_ranges(encoder: CrossEncoder) -> None:
    result = encoder.score(QUERY, DOCUMENTS)
    assert result.raw.shape == (len(DOCUMENTS),) and result.raw.dtype == np.float32
    assert len(result.scores) == len(result.num_tokens) == len(result.truncated) == len(DOCUMENTS)
    assert all(0.0 <= s <= 1.0 for s in result.scores)
    np.testing.assert_allclose(result.scores, 1 / (1 + np.exp(-result.raw)), atol=1e-6)
    assert len(set(result.scores)) == len(DOCUMENTS)  # a random model still tells them apart
    # [CLS] query [SEP] [SEP]: the empty document costs one separator.
    assert result.num_tokens[2] == len(encoder._tokenizer.encode(QUERY).ids) + 1
    assert not any(result.truncated)


def test_no_documents(encoder: CrossEncoder) -> None:
    result = encoder.score(QUERY, [])
    assert result.raw.shape == (0,) and result.scores == [] and result.num_tokens == []


def test_score_matches_the_classifier_on_one_pair(encoder: CrossEncoder) -> None:
    # Query tokens are type 0 and document tokens type 1, as BERT was trained.
    encoding = encoder._tokenizer.encode(QUERY, "rome")
    assert set(encoding.type_ids) == {0, 1} and encoding.type_ids[0] == 0
    logits = encoder.model(
        mx.array([encoding.ids]),
        mx.ones((1, len(encoding.ids)), dtype=mx.bool_),
        mx.array([encoding.type_ids]),
    )
    assert float(encoder.score(QUERY, ["rome"]).raw[0]) == pytest.approx(logits.item(), abs=1e-6)


def test_two_labels_score_the_relevant_label(two_label_path: Path) -> None:
    encoder = CrossEncoder.load(two_label_path)
    assert encoder.num_labels == 2
    encoding = encoder._tokenizer.encode(QUERY, DOCUMENTS[0])
    logits = np.asarray(
        encoder.model(
            mx.array([encoding.ids]),
            mx.ones((1, len(encoding.ids)), dtype=mx.bool_),
            mx.array([encoding.type_ids]),
        )
    )[0].astype(np.float64)
    softmax = np.exp(logits) / np.exp(logits).sum()
    result = encoder.score(QUERY, [DOCUMENTS[0]])
    assert result.scores[0] == pytest.approx(softmax[1], abs=1e-6)
    assert float(result.raw[0]) == pytest.approx(logits[1] - logits[0], abs=1e-5)


# --- truncation ---------------------------------------------------------------------------------


def test_long_documents_are_cut_at_the_model_limit(encoder: CrossEncoder) -> None:
    # tokenizer.json pins truncation at 16; the model's limit (40 positions) must win.
    assert encoder.max_tokens == MAX_POSITIONS
    result = encoder.score(QUERY, [LONG, LONG + " and more words after the cut", "rome"])
    assert result.num_tokens[:2] == [MAX_POSITIONS, MAX_POSITIONS]
    assert result.truncated == [True, True, False]
    # The document side was cut, so what follows the cut cannot change the score.
    assert result.scores[0] == pytest.approx(result.scores[1], abs=1e-6)


def test_truncation_keeps_a_short_query_whole(encoder: CrossEncoder) -> None:
    encoding = encoder._tokenizer.encode(QUERY, LONG)
    query_ids = encoder._tokenizer.encode(QUERY).ids  # [CLS] query [SEP]
    assert len(encoding.ids) == MAX_POSITIONS
    assert encoding.ids[: len(query_ids)] == query_ids


def test_long_query_and_long_document_are_both_cut(encoder: CrossEncoder) -> None:
    encoding = encoder._tokenizer.encode(LONG, LONG)
    types = encoding.type_ids
    assert len(encoding.ids) == MAX_POSITIONS
    # Longest first: the two sides share the room (40 - 3 special tokens), 18 and 19.
    assert abs(types.count(0) - types.count(1)) <= 2


def test_max_tokens_override_and_limits(tiny_cross_encoder_path: Path) -> None:
    short = CrossEncoder.load(tiny_cross_encoder_path, max_tokens=24)
    assert short.score(QUERY, [LONG]).num_tokens == [24]
    with pytest.raises(ValueError, match=r"1\.\.40"):
        CrossEncoder.load(tiny_cross_encoder_path, max_tokens=41)


# --- batching -----------------------------------------------------------------------------------


def test_scores_do_not_depend_on_batch_neighbours(tiny_cross_encoder_path: Path) -> None:
    # A budget of 48 padded tokens forces batches of one to three pairs of different lengths.
    small = CrossEncoder.load(tiny_cross_encoder_path, batch_tokens=48)
    documents = [*DOCUMENTS, LONG, "paris " * 9, "rome"]
    together = small.score(QUERY, documents)
    alone = [small.score(QUERY, [d]) for d in documents]
    np.testing.assert_allclose(together.raw, [a.raw[0] for a in alone], atol=1e-5)
    assert together.num_tokens == [a.num_tokens[0] for a in alone]
    shuffled = small.score(QUERY, documents[::-1])
    np.testing.assert_allclose(shuffled.raw[::-1], together.raw, atol=1e-5)


def test_lanes_give_the_scores_of_one_thread(tiny_cross_encoder_path: Path) -> None:
    one = CrossEncoder.load(tiny_cross_encoder_path, batch_tokens=48, lanes=1)
    two = CrossEncoder.load(tiny_cross_encoder_path, batch_tokens=48, lanes=2)
    documents = [*DOCUMENTS, LONG, "paris " * 9, "rome"] * 3
    try:
        a, b = one.score(QUERY, documents), two.score(QUERY, documents)
    finally:
        two.close()
    np.testing.assert_allclose(b.raw, a.raw, atol=1e-6)
    assert b.num_tokens == a.num_tokens and b.truncated == a.truncated


# --- folders that are not cross-encoders ---------------------------------------------------------


def test_an_embedding_model_is_refused(tiny_bert_path: Path) -> None:
    with pytest.raises(NotACrossEncoderError, match="ForSequenceClassification"):
        CrossEncoder.load(tiny_bert_path)


def test_weights_without_a_classifier_are_refused(tiny_bert_path: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_bert_path, tmp_path / "headless")
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotACrossEncoderError, match="no classifier head"):
        CrossEncoder.load(folder)


def test_three_labels_are_refused(tiny_cross_encoder_path: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    folder = shutil.copytree(tiny_cross_encoder_path, tmp_path / "nli")
    weights = load_file(str(folder / "model.safetensors"))
    weights["classifier.weight"] = np.zeros((3, weights["classifier.weight"].shape[1]), np.float32)
    weights["classifier.bias"] = np.zeros(3, np.float32)
    save_file(weights, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config.update(num_labels=3, id2label={str(i): f"L{i}" for i in range(3)})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotACrossEncoderError, match="num_labels=3"):
        CrossEncoder.load(folder)


def test_missing_files_say_what_is_missing(tiny_cross_encoder_path: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        CrossEncoder.load(tmp_path)
    folder = shutil.copytree(tiny_cross_encoder_path, tmp_path / "no_tokenizer")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        CrossEncoder.load(folder)


# --- rag.reranking and choose_reranker ------------------------------------------------------------


def test_cross_encoder_reranker_adapts_scores(encoder: CrossEncoder) -> None:
    reranker = CrossEncoderReranker(encoder)
    assert isinstance(reranker, Reranker)
    assert reranker.kind == CROSS_ENCODER and reranker.name == encoder.name
    result = reranker.score(QUERY, DOCUMENTS)
    direct = encoder.score(QUERY, DOCUMENTS)
    assert result.scores == pytest.approx(direct.scores)
    assert result.raw_scores == pytest.approx(direct.raw.tolist())
    assert result.num_tokens == sum(direct.num_tokens)


def test_embedding_similarity_reranker(tiny_bert_path: Path) -> None:
    embedder = Embedder.load(tiny_bert_path)
    reranker = EmbeddingSimilarityReranker(embedder)
    assert isinstance(reranker, Reranker) and reranker.kind == EMBEDDING_SIMILARITY
    assert reranker.name != embedder.name  # /v1/models lists both; ids must differ
    documents = [QUERY, "rome", "paris is the capital of france"]
    result = reranker.score(QUERY, documents)
    vectors = embedder.embed([QUERY, *documents]).vectors.astype(np.float64)
    cosine = vectors[1:] @ vectors[0] / np.linalg.norm(vectors[1:], axis=1)
    cosine /= np.linalg.norm(vectors[0])
    assert result.raw_scores == pytest.approx(cosine.tolist(), abs=1e-6)
    assert result.scores == pytest.approx(((cosine + 1) / 2).tolist(), abs=1e-6)
    assert result.scores[0] == pytest.approx(1.0, abs=1e-6)  # the query itself
    assert result.num_tokens == sum(embedder.count_tokens([QUERY, *documents]))
    assert reranker.score(QUERY, []).scores == []


def test_choose_reranker(tiny_cross_encoder_path: Path, tiny_bert_path: Path) -> None:
    embedder = Embedder.load(tiny_bert_path)
    chosen = choose_reranker(tiny_cross_encoder_path, embedder)
    assert chosen is not None and chosen.kind == CROSS_ENCODER
    assert chosen.name == tiny_cross_encoder_path.name
    fallback = choose_reranker(None, embedder)
    assert fallback is not None and fallback.kind == EMBEDDING_SIMILARITY
    assert choose_reranker(None, None) is None


def test_choose_reranker_refuses_a_bad_folder(tiny_bert_path: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such folder"):
        choose_reranker(tmp_path / "missing", None)
    with pytest.raises(NotACrossEncoderError):
        choose_reranker(tiny_bert_path, None)  # an embedder folder is not a fallback


def test_models_loaded_on_one_thread_score_on_another(
    tiny_cross_encoder_path: Path, tiny_bert_path: Path
) -> None:
    # The server loads on the main thread and scores on its encoder thread.
    from concurrent.futures import ThreadPoolExecutor

    cross = CrossEncoderReranker(CrossEncoder.load(tiny_cross_encoder_path))
    similarity = EmbeddingSimilarityReranker(Embedder.load(tiny_bert_path))
    here = [r.score(QUERY, DOCUMENTS).scores for r in (cross, similarity)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        there = [
            pool.submit(r.score, QUERY, DOCUMENTS).result().scores for r in (cross, similarity)
        ]
    for a, b in zip(here, there, strict=True):
        assert a == pytest.approx(b, abs=1e-6)
