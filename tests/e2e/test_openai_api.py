"""/v1/chat/completions and /v1/completions through the official `openai` client on a real server.

The tiny model is random, so these check shapes, counts, finish reasons, determinism and errors,
never what the text says. `NO_EOS` keeps the model from stopping by itself where a test needs an
exact number of tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.fixtures.live_server import TINY_MODEL, TinyServer
from tests.fixtures.tiny_llama import SPECIAL_TOKENS

EOS = SPECIAL_TOKENS.index("<|im_end|>")
NO_EOS = {str(EOS): -100}
USER = [{"role": "user", "content": "The capital of France is"}]


@pytest.fixture(scope="module")
def client(tiny_server: TinyServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused") as c:
        yield c


def chat(client: openai.OpenAI, **fields: Any) -> Any:
    return client.chat.completions.create(
        model=TINY_MODEL, messages=fields.pop("messages", USER), **fields
    )


def sse_payloads(base_url: str, path: str, body: dict) -> list[Any]:
    """Every `data:` payload of a streamed response, JSON-decoded except the final [DONE]."""
    with httpx.stream("POST", f"{base_url}{path}", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    data = [line.removeprefix("data: ") for line in lines]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


# -- chat: shapes and counts --------------------------------------------------------------------


def test_chat_completion_shape_and_usage(client: openai.OpenAI) -> None:
    response = chat(client, max_tokens=8, temperature=0)
    assert response.id.startswith("chatcmpl-")
    assert response.object == "chat.completion" and response.model == TINY_MODEL
    [choice] = response.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    usage = response.usage
    assert usage.prompt_tokens > 5 and 1 <= usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 <= usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens


@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
def test_token_limit_ends_with_length_and_exactly_that_many_tokens(
    client: openai.OpenAI, limit: str
) -> None:
    response = chat(client, **{limit: 7}, logit_bias=NO_EOS)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 7


def test_greedy_and_seeded_sampling_repeat(client: openai.OpenAI) -> None:
    def text(**fields: Any) -> str:
        return chat(client, max_tokens=16, logit_bias=NO_EOS, **fields).choices[0].message.content

    assert text(temperature=0) == text(temperature=0)
    # A high temperature flattens the random model's peaked distribution: seeds matter.
    assert text(temperature=50, seed=1) == text(temperature=50, seed=1)
    assert text(temperature=50, seed=1) != text(temperature=50, seed=2)


def test_stop_string_cuts_the_text_and_finishes_with_stop(client: openai.OpenAI) -> None:
    free = chat(client, max_tokens=24, temperature=50, seed=3, logit_bias=NO_EOS)
    text = free.choices[0].message.content
    assert len(text) >= 8
    stop = text[5:7]
    stopped = chat(client, max_tokens=24, temperature=50, seed=3, logit_bias=NO_EOS, stop=[stop])
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = chat(
        client, max_tokens=24, temperature=50, seed=3, logit_bias=NO_EOS, stop=stop, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[: text.index(stop)]


def test_n_choices_are_indexed_and_counted(client: openai.OpenAI) -> None:
    response = chat(client, n=2, max_tokens=5, logit_bias=NO_EOS, temperature=50, seed=7)
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in response.choices)
    assert response.usage.completion_tokens == 10
    single = chat(client, max_tokens=5, logit_bias=NO_EOS, temperature=50, seed=7)
    assert response.usage.prompt_tokens == single.usage.prompt_tokens  # counted once
    # Choice i uses seed + i: choice 0 is the single request's completion.
    assert response.choices[0].message.content == single.choices[0].message.content


def test_chat_logprobs(client: openai.OpenAI) -> None:
    response = chat(client, max_tokens=6, logit_bias=NO_EOS, logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == 6
    for token in content:
        assert token.logprob <= 0 and token.bytes == list(token.token.encode())
        alternatives = [t.logprob for t in token.top_logprobs]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        assert token.logprob <= alternatives[0] + 1e-5


# -- chat: streaming ------------------------------------------------------------------------------


def test_stream_matches_the_non_streamed_text(client: openai.OpenAI) -> None:
    fields = {"max_tokens": 12, "temperature": 0, "logit_bias": NO_EOS}
    full = chat(client, **fields).choices[0].message.content
    chunks = list(chat(client, stream=True, **fields))
    first, last = chunks[0].choices[0], chunks[-1].choices[0]
    assert first.delta.role == "assistant" and first.delta.content == ""
    assert last.finish_reason == "length" and not last.delta.content
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.choices[0].delta.content for c in chunks[1:-1])  # no empty deltas
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full
    assert len({c.id for c in chunks}) == 1 and all(c.usage is None for c in chunks)


def test_include_usage_sends_usage_last_before_done(tiny_server: TinyServer) -> None:
    body = {
        "messages": USER,
        "max_tokens": 4,
        "logit_bias": NO_EOS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    payloads = sse_payloads(tiny_server.base_url, "/v1/chat/completions", body)
    assert payloads[-1] == "[DONE]"
    usage_chunk = payloads[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 4
    usage = usage_chunk["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]
    assert all(p["usage"] is None for p in payloads[:-2])


def test_streamed_n_choices_each_start_and_finish(client: openai.OpenAI) -> None:
    chunks = list(
        chat(
            client,
            n=2,
            max_tokens=3,
            logit_bias=NO_EOS,
            stream=True,
            stream_options={"include_usage": True},
            logprobs=True,
        )
    )
    assert chunks[-1].usage.completion_tokens == 6
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert [c.finish_reason for c in mine if c.finish_reason] == ["length"]
        assert sum(len(c.logprobs.content) for c in mine if c.logprobs) == 3


# -- legacy completions ---------------------------------------------------------------------------


def test_completion_prompt_forms(client: openai.OpenAI) -> None:
    one = client.completions.create(
        model=TINY_MODEL, prompt="The capital", max_tokens=4, logit_bias=NO_EOS
    )
    assert one.id.startswith("cmpl-") and one.object == "text_completion"
    assert one.choices[0].finish_reason == "length" and one.usage.completion_tokens == 4
    batch = client.completions.create(
        model=TINY_MODEL, prompt=["The capital", "Numbers like"], max_tokens=3, logit_bias=NO_EOS
    )
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.usage.completion_tokens == 6
    ids = client.completions.create(model=TINY_MODEL, prompt=[5, 6, 7], max_tokens=2)
    assert ids.usage.prompt_tokens == 3
    id_batch = client.completions.create(
        model=TINY_MODEL, prompt=[[5, 6], [7, 8, 9]], max_tokens=2, n=2
    )
    assert len(id_batch.choices) == 4 and id_batch.usage.prompt_tokens == 5


def test_completion_defaults_to_16_tokens_like_openai(client: openai.OpenAI) -> None:
    response = client.completions.create(model=TINY_MODEL, prompt="Paris", logit_bias=NO_EOS)
    assert response.usage.completion_tokens == 16


def test_completion_echo_prepends_the_prompt(client: openai.OpenAI) -> None:
    plain = client.completions.create(
        model=TINY_MODEL, prompt="Rome is", max_tokens=4, temperature=0
    )
    echoed = client.completions.create(
        model=TINY_MODEL, prompt="Rome is", max_tokens=4, temperature=0, echo=True
    )
    assert echoed.choices[0].text == "Rome is" + plain.choices[0].text


def test_completion_logprobs_legacy_shape(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model=TINY_MODEL, prompt="Paris", max_tokens=5, logit_bias=NO_EOS, logprobs=2
    )
    choice = response.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 5
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)  # alternatives may decode alike
    assert logprobs.text_offset[0] == 0
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    assert logprobs.text_offset[-1] <= len(choice.text)


def test_streamed_completion_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=TINY_MODEL,
            prompt="Paris",
            max_tokens=6,
            temperature=0,
            logit_bias=NO_EOS,
            echo=True,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].text == "Paris"  # the echo comes first
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-2].choices[0].finish_reason == "length"
    full = client.completions.create(
        model=TINY_MODEL, prompt="Paris", max_tokens=6, temperature=0, logit_bias=NO_EOS
    )
    assert "".join(c.choices[0].text for c in chunks[:-1]) == "Paris" + full.choices[0].text


# -- errors: always the OpenAI shape, always before a stream starts --------------------------------


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=USER)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"messages": [{"role": "user"}], "n": "two"}, "n"),
        ({"stop": {"a": 1}}, "stop"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ],
)
def test_bad_types_are_400_with_the_param(client: openai.OpenAI, fields: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, **fields)
    assert info.value.body["param"] == param
    assert info.value.body["type"] == "invalid_request_error"


def test_malformed_json_is_400(tiny_server: TinyServer) -> None:
    response = httpx.post(
        f"{tiny_server.base_url}/v1/chat/completions",
        content=b'{"messages": [',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "the request body is not valid JSON"


@pytest.mark.parametrize("stream", [False, True])
def test_context_overflow_is_400_before_any_stream(client: openai.OpenAI, stream: bool) -> None:
    long = [{"role": "user", "content": "Paris Rome " * 1200}]
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, messages=long, stream=stream)
    assert info.value.body["code"] == "context_length_exceeded"
    assert info.value.body["param"] == "messages"


def test_prompt_plus_max_tokens_over_the_context_names_both(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, max_tokens=2040, stream=True)
    message = info.value.body["message"]
    assert info.value.body["code"] == "context_length_exceeded"
    assert "2048" in message and "2040 in the completion" in message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=TINY_MODEL, prompt=[5] * 2000, max_tokens=100)
    assert info.value.body["param"] == "prompt"
    assert "2000 in the prompt, 100 in the completion" in info.value.body["message"]


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
            "tools",
            "tool calling is not supported",
        ),
        ({"response_format": {"type": "json_object"}}, "response_format", "not supported"),
        ({"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content.0",
            "read text only",
        ),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_unsupported_features_are_a_clear_400(
    client: openai.OpenAI, fields: dict, param: str, says: str, stream: bool
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, stream=stream, **fields)
    assert info.value.body["param"] == param
    assert says in info.value.body["message"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"suffix": "end"}, "suffix"), ({"echo": True, "logprobs": 1}, "echo")],
)
def test_unsupported_completion_fields_are_400(
    client: openai.OpenAI, fields: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=TINY_MODEL, prompt="x", **fields)
    assert info.value.body["param"] == param and "not" in info.value.body["message"]


def test_response_format_text_and_unknown_fields_are_fine(tiny_server: TinyServer) -> None:
    response = httpx.post(
        f"{tiny_server.base_url}/v1/chat/completions",
        json={
            "messages": USER,
            "max_tokens": 2,
            "response_format": {"type": "text"},
            "user": "someone",
            "store": False,
            "parallel_tool_calls": True,
            "some_future_field": {"x": 1},
        },
    )
    assert response.status_code == 200, response.text
