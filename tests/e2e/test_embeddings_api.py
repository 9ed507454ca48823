"""`POST /v1/embeddings` through the official `openai` client on a live server (tiny BERT).

The client asks for base64 by default and decodes it; `encoding_format="float"` must give the same
numbers. Errors must arrive in OpenAI's shape with the right status, so the client raises its own
typed exceptions.
"""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from tokenizers import Tokenizer

from tests.fixtures.live_server import TinyServer
from tests.fixtures.tiny_bert import MAX_SEQ_LENGTH

TEXTS = ["the capital of france is paris", "rome", "café é 日本 🙂"]
TOO_LONG = "paris " * MAX_SEQ_LENGTH  # 24 words + [CLS] [SEP] > 24 tokens


@pytest.fixture(scope="module")
def client(tiny_server: TinyServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(tiny_server: TinyServer) -> str:
    assert tiny_server.services.embedder is not None
    return tiny_server.services.embedder.name


@pytest.fixture(scope="module")
def tokenizer(tiny_bert_path: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(tiny_bert_path / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def vectors(response: object) -> np.ndarray:
    return np.array([item.embedding for item in response.data], dtype=np.float32)  # type: ignore[attr-defined]


# --- success ------------------------------------------------------------------------------------


def test_default_base64_and_float_agree(client: openai.OpenAI, model: str) -> None:
    default = client.embeddings.create(model=model, input=TEXTS[0])  # the client sends base64
    floats = client.embeddings.create(model=model, input=TEXTS[0], encoding_format="float")
    assert default.model == floats.model == model
    assert len(default.data) == 1 and default.data[0].index == 0
    np.testing.assert_allclose(vectors(default), vectors(floats), atol=1e-7)
    assert np.linalg.norm(vectors(default)[0]) == pytest.approx(1.0, abs=1e-5)


def test_base64_is_little_endian_float32(tiny_server: TinyServer, model: str) -> None:
    body = {"model": model, "input": TEXTS[1], "encoding_format": "base64"}
    raw = httpx.post(f"{tiny_server.base_url}/v1/embeddings", json=body).json()
    body["encoding_format"] = "float"
    floats = httpx.post(f"{tiny_server.base_url}/v1/embeddings", json=body).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert decoded.tolist() == floats["data"][0]["embedding"]


def test_list_input_matches_the_embedder_and_counts_usage(
    client: openai.OpenAI, tiny_server: TinyServer, model: str
) -> None:
    response = client.embeddings.create(model=model, input=TEXTS, encoding_format="float")
    assert [item.index for item in response.data] == [0, 1, 2]
    embedder = tiny_server.services.embedder
    assert embedder is not None
    direct = embedder.embed(TEXTS)
    np.testing.assert_allclose(vectors(response), direct.vectors, atol=1e-6)
    assert response.usage.prompt_tokens == response.usage.total_tokens == sum(direct.num_tokens)


def test_token_ids_embed_like_their_text(
    client: openai.OpenAI, model: str, tokenizer: Tokenizer
) -> None:
    # Ids are content tokens of the embedder's tokenizer; the server adds [CLS] and [SEP].
    ids = [tokenizer.encode(text, add_special_tokens=False).ids for text in TEXTS]
    texts = client.embeddings.create(model=model, input=TEXTS, encoding_format="float")
    as_lists = client.embeddings.create(model=model, input=ids, encoding_format="float")
    one = client.embeddings.create(model=model, input=ids[0], encoding_format="float")
    np.testing.assert_allclose(vectors(as_lists), vectors(texts), atol=1e-6)
    np.testing.assert_allclose(vectors(one)[0], vectors(texts)[0], atol=1e-6)
    assert as_lists.usage.total_tokens == texts.usage.total_tokens
    assert one.usage.total_tokens == len(ids[0]) + 2


def test_dimensions_cut_and_renormalise(client: openai.OpenAI, model: str) -> None:
    full = vectors(client.embeddings.create(model=model, input=TEXTS))
    cut = vectors(client.embeddings.create(model=model, input=TEXTS, dimensions=8))
    assert cut.shape == (len(TEXTS), 8)
    expected = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, atol=1e-6)


def test_truncate_extension_cuts_long_inputs(client: openai.OpenAI, model: str) -> None:
    response = client.embeddings.create(
        model=model, input=[TOO_LONG, "rome"], extra_body={"truncate": True}
    )
    assert len(response.data) == 2
    assert response.usage.total_tokens == MAX_SEQ_LENGTH + 3  # cut to 24, and [CLS] rome [SEP]


def test_embedded_inputs_are_counted(
    client: openai.OpenAI, tiny_server: TinyServer, model: str
) -> None:
    def counted() -> float:
        text = httpx.get(f"{tiny_server.base_url}/metrics").text
        prefix = f'rag_embedded_inputs_total{{model="{model}"}} '
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        return float(lines[0].removeprefix(prefix)) if lines else 0.0

    before = counted()
    client.embeddings.create(model=model, input=TEXTS)
    assert counted() == before + len(TEXTS)


# --- errors -------------------------------------------------------------------------------------


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert caught.value.code == "model_not_found" and caught.value.param == "model"


@pytest.mark.parametrize("bad_input", ["", [], ["paris", ""], [[]]])
def test_empty_input_is_400(client: openai.OpenAI, model: str, bad_input: object) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=model, input=bad_input)  # type: ignore[arg-type]
    assert caught.value.param == "input" and "empty" in caught.value.message


def test_too_long_input_is_400_with_index_and_lengths(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=model, input=["rome", TOO_LONG])
    error = caught.value
    assert error.code == "context_length_exceeded"
    assert f"input[1] has {MAX_SEQ_LENGTH + 2} tokens" in error.message
    assert f"at most {MAX_SEQ_LENGTH}" in error.message


def test_too_many_inputs_is_400(client: openai.OpenAI, tiny_server: TinyServer, model: str) -> None:
    limit = tiny_server.settings.max_embedding_inputs
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=model, input=["a"] * (limit + 1))
    assert f"at most {limit}" in caught.value.message


@pytest.mark.parametrize("dimensions", [0, -1, 33])
def test_bad_dimensions_is_400(client: openai.OpenAI, model: str, dimensions: int) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=model, input="x", dimensions=dimensions)
    assert caught.value.param == "dimensions" and "1..32" in caught.value.message


def test_bad_token_id_and_wrong_types_are_400_in_openai_shape(
    tiny_server: TinyServer, model: str
) -> None:
    url = f"{tiny_server.base_url}/v1/embeddings"
    for body in (
        {"model": model, "input": [[5, 10**6]]},  # an id outside the vocabulary
        {"model": model, "input": [1, "mixed"]},
        {"model": model, "input": "x", "encoding_format": "int8"},
        {"model": model},
    ):
        response = httpx.post(url, json=body)
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
