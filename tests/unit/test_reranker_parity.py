"""Our MLX cross-encoder against Hugging Face transformers' scores (a committed fixture).

The fixture is made by tests/reference/make_cross_encoder_reference.py from three tiny random
folders (BERT with one label, BERT with two, XLM-RoBERTa); this test rebuilds the same folders with
numpy and needs neither torch nor a download.
"""

from __future__ import annotations

from pathlib import Path

from inference.reranker import CrossEncoder

import numpy as np
import pytest

from tests.reference.make_cross_encoder_reference import (
    MODELS,
    OUT,
    PAIRS,
    build_models,
    weights_digest,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("cross_encoders"))


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(OUT, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def test_fixture_matches_the_pairs(reference: dict) -> None:
    assert reference["queries"].tolist() == [q for q, _ in PAIRS]
    assert reference["documents"].tolist() == [d for _, d in PAIRS]


@pytest.mark.parametrize("name", MODELS)
def test_scores_match_transformers(name: str, folders: dict, reference: dict) -> None:
    folder = folders[name]
    assert weights_digest(folder) == str(reference[f"{name}_digest"]), (
        "the tiny models changed: rerun tests/reference/make_cross_encoder_reference.py"
    )
    encoder = CrossEncoder.load(folder)
    logits = reference[f"{name}_logits"].astype(np.float64)
    # Pairs grouped by query, as a caller sends them; every group mixes lengths in its batches.
    raw = np.zeros(len(PAIRS), dtype=np.float32)
    scores = np.zeros(len(PAIRS))
    num_tokens = [0] * len(PAIRS)
    for query in dict.fromkeys(q for q, _ in PAIRS):
        rows = [i for i, (q, _) in enumerate(PAIRS) if q == query]
        result = encoder.score(query, [PAIRS[i][1] for i in rows])
        raw[rows], scores[rows] = result.raw, result.scores
        for row, n in zip(rows, result.num_tokens, strict=True):
            num_tokens[row] = n

    if logits.shape[1] == 1:
        expected_raw = logits[:, 0]
        expected_scores = 1 / (1 + np.exp(-logits[:, 0]))
    else:
        expected_raw = logits[:, 1] - logits[:, 0]
        softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        expected_scores = softmax[:, 1]
    np.testing.assert_allclose(raw, expected_raw, atol=1e-4)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-4)
    assert num_tokens == reference[f"{name}_num_tokens"].tolist()


def test_truncated_pairs_are_in_the_fixture(reference: dict) -> None:
    # The fixture must cover "longest first" cuts: pairs at exactly the 40-token limit.
    assert (reference["bert1_num_tokens"] == 40).sum() >= 3
