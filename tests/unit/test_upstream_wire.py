"""The completions wire format: request bodies out, stream chunks in, and the local tokenizer."""

from __future__ import annotations

from pathlib import Path

from inference.backend import GenerationRequest, Usage
from inference.engine import Engine
from inference.sampling import SamplingParams
from inference.stopping import StopParams

import pytest

from rag.upstreams.backend import make_remote_backend
from rag.upstreams.config import RouterConfig, UpstreamSpec
from rag.upstreams.tokenizer import load_local_tokenizer
from rag.upstreams.wire import ChunkDecoder, UpstreamStreamError, completion_body, sse_payload


def test_body_sends_token_ids_and_only_the_sampling_that_is_set() -> None:
    request = GenerationRequest((5, 6, 7), SamplingParams(temperature=0.0), StopParams())
    body = completion_body(request, "m", max_model_len=100)
    assert body == {
        "model": "m",
        "prompt": [5, 6, 7],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 97,  # the rest of the context, as the local engine does
        "temperature": 0.0,
        "top_p": 1.0,
        "return_token_ids": True,
    }


def test_body_maps_every_sampling_and_stop_field() -> None:
    sampling = SamplingParams(
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={3: -100.0},
        seed=7,
    )
    stop = StopParams(max_tokens=12, stop=("\n\n",), stop_token_ids=(2,))
    body = completion_body(GenerationRequest((1,), sampling, stop, ignore_eos=True), "m", 100)
    assert {k: body[k] for k in body if k not in ("model", "prompt", "stream_options")} == {
        "stream": True,
        "return_token_ids": True,
        "max_tokens": 12,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "logit_bias": {"3": -100.0},
        "seed": 7,
        "stop": ["\n\n"],
        "stop_token_ids": [2],
        "ignore_eos": True,
    }


def test_sse_lines() -> None:
    assert sse_payload('data: {"a":1}') == {"a": 1}
    assert sse_payload("data: [DONE]") is None
    assert sse_payload("") is None and sse_payload(": ping") is None
    assert sse_payload("event: error") is None
    with pytest.raises(UpstreamStreamError, match="not JSON"):
        sse_payload("data: {oops")


def encode_bytes(text: str) -> list[int]:
    return list(text.encode())


def test_decoder_passes_text_on_and_holds_the_finish_for_the_usage() -> None:
    decoder = ChunkDecoder("r1", 10, encode_bytes)
    # This appliance's shape: text only, "usage": null until the last chunk.
    first = decoder.feed(
        {"choices": [{"index": 0, "text": "Hi", "finish_reason": None}], "usage": None}
    )
    assert [(c.text, c.token_ids, c.finish_reason) for c in first] == [("Hi", (72, 105), None)]
    assert first[0].usage == Usage(10, 0, 2)
    assert decoder.feed({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}) == []
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 8},
    }
    assert decoder.feed({"choices": [], "usage": usage}) == []
    last = decoder.finish()
    assert (last.finish_reason, last.text, last.usage) == ("length", "", Usage(10, 8, 3))


def test_decoder_uses_the_upstreams_token_ids_and_stop_reason() -> None:
    decoder = ChunkDecoder("r1", 4, encode_bytes)
    chunks = decoder.feed(
        {
            "choices": [
                {"text": " Paris", "token_ids": [991], "finish_reason": "stop", "stop_reason": "\n"}
            ]
        }
    )
    assert chunks[0].token_ids == (991,)
    last = decoder.finish()
    assert (last.finish_reason, last.stop_reason, last.usage) == ("stop", "\n", Usage(4, 0, 1))


@pytest.mark.parametrize(
    "payload",
    [
        {"error": {"message": "the model failed", "type": "server_error"}},
        {"choices": [{"text": "", "finish_reason": "abort"}]},
    ],
)
def test_decoder_raises_on_errors_in_the_stream(payload: dict) -> None:
    with pytest.raises(UpstreamStreamError):
        ChunkDecoder("r1", 1, encode_bytes).feed(payload)


def test_a_stream_cut_before_its_finish_is_an_error() -> None:
    decoder = ChunkDecoder("r1", 1, encode_bytes)
    decoder.feed({"choices": [{"text": "abc"}]})
    with pytest.raises(UpstreamStreamError, match="without a finish reason after 3 tokens"):
        decoder.finish()


def test_remote_backend_tokenizes_as_the_engine(tiny_llama_path: Path) -> None:
    # mlx-lm's tokenizer wrapper on both sides (inference.chat_tokenizer): same ids, same EOS.
    local = load_local_tokenizer(tiny_llama_path)
    spec = UpstreamSpec("http://127.0.0.1:9", "m")  # never asked: tokenizing is local
    remote = make_remote_backend([spec], RouterConfig(health_interval_s=60), tiny_llama_path)
    engine = Engine.from_path(tiny_llama_path)
    try:
        messages = [
            {"role": "system", "content": "You answer from the sources."},
            {"role": "user", "content": "The capital of France? café 日本語 🙂"},
        ]
        for prompt in (True, False):
            expected = engine.apply_chat_template(messages, add_generation_prompt=prompt)
            assert remote.apply_chat_template(messages, add_generation_prompt=prompt) == expected
        text = "Numbers like 12345, naïve 日本語"
        assert remote.encode(text) == engine.encode(text)
        assert remote.count_tokens(text) == engine.count_tokens(text)
        ids = engine.apply_chat_template(messages)
        assert remote.decode(ids) == engine.decode(ids)
        assert remote.max_model_len == engine.max_model_len == 2048
        assert local.eos_token_ids == tuple(sorted(engine.eos_token_ids))
    finally:
        engine.close()
        remote.close()


def test_local_tokenizer_refuses_a_folder_without_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no tokenizer"):
        load_local_tokenizer(tmp_path)
