"""Our MLX embedder against sentence-transformers' own MiniLM embeddings (a committed fixture).

The fixture is made by tests/reference/make_minilm_reference.py; this test needs only numpy and
the packaged model, not torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from inference.embedder import Embedder, EmbedderNotInstalledError, default_embedder_path

import numpy as np
import pytest

REFERENCE = Path(__file__).parents[1] / "reference" / "minilm_reference.npz"

pytestmark = pytest.mark.default_models


@pytest.fixture(scope="module")
def minilm() -> Embedder:
    try:
        path = default_embedder_path()
    except EmbedderNotInstalledError as exc:
        pytest.skip(str(exc))
    return Embedder.load(path)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def test_minilm_matches_sentence_transformers(minilm: Embedder, reference: dict) -> None:
    texts = [str(t) for t in reference["texts"]]
    batch = minilm.embed(texts)
    expected = reference["vectors"]
    cosine = (batch.vectors * expected).sum(1) / (
        np.linalg.norm(batch.vectors, axis=1) * np.linalg.norm(expected, axis=1)
    )
    assert cosine.min() >= 0.9999, f"worst text {int(cosine.argmin())}: cosine {cosine.min()}"
    assert np.abs(batch.vectors - expected).max() < 1e-4
    assert batch.num_tokens == reference["num_tokens"].tolist()
    assert batch.truncated == reference["truncated"].tolist()


def test_minilm_shape_and_limits(minilm: Embedder, reference: dict) -> None:
    versions = json.loads(str(reference["versions"]))
    assert minilm.dim == 384
    assert minilm.max_tokens == versions["max_seq_length"] == 256
    assert minilm.num_special_tokens == 2
    # The tokenizer.json pins truncation at 128: the embedder must count past it.
    assert minilm.count_tokens(["word " * 300]) == [302]
