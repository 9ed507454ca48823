"""The Messages API driven by the official `anthropic` client against a live tiny server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from inference.backend import GenerationRequest
from inference.sampling import SamplingParams
from inference.stopping import StopParams

import anthropic
import httpx
import pytest

from rag.server.settings import ServerSettings
from tests.fixtures.live_server import (
    TINY_MODEL,
    TinyServer,
    make_tiny_services,
    tiny_server_running,
)

USER = [{"role": "user", "content": "What is the capital of France?"}]
PREFILL = "The capital"  # steers the tiny random model off its greedy run of newlines
PREFILLED = [*USER, {"role": "assistant", "content": PREFILL}]
STREAM_EVENTS = [
    "message_start",
    "content_block_start",
    "ping",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
]


@pytest.fixture(scope="module")
def client(tiny_server: TinyServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=tiny_server.base_url, api_key="x", max_retries=0)


# anthropic 2.x has no `temperature` argument any more (newer Claude models ignore sampling
# parameters); the server still honours it, sent as an extra body field.
GREEDY = {"temperature": 0}


def greedy(client: anthropic.Anthropic, **kwargs: object) -> anthropic.types.Message:
    args: dict = {"model": TINY_MODEL, "max_tokens": 12, "messages": PREFILLED}
    return client.messages.create(**{**args, **kwargs}, extra_body=GREEDY)


def prompt_tokens(usage: anthropic.types.Usage) -> int:
    # Anthropic's input_tokens leaves out prefix-cache reads; together they are the prompt.
    return usage.input_tokens + (usage.cache_read_input_tokens or 0)


def text_of(message: anthropic.types.Message) -> str:
    assert len(message.content) == 1 and message.content[0].type == "text"
    return message.content[0].text


def test_message_has_anthropic_shape(client: anthropic.Anthropic) -> None:
    message = greedy(client, system="Answer briefly.", metadata={"user_id": "u1"})
    assert message.id.startswith("msg_") and message.type == "message"
    assert message.role == "assistant" and message.model == TINY_MODEL
    assert text_of(message)
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert message.usage.cache_read_input_tokens is not None
    assert message.usage.cache_creation_input_tokens == 0


def test_temperature_zero_is_deterministic(client: anthropic.Anthropic) -> None:
    first = greedy(client)
    assert text_of(greedy(client)) == text_of(first)
    streamed = greedy(client, stream=True)
    text = "".join(
        e.delta.text
        for e in streamed
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert text == text_of(first)


def test_max_tokens_stops_at_exactly_that_many(client: anthropic.Anthropic) -> None:
    message = greedy(client, max_tokens=5, messages=USER)
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 5


def test_stop_sequence_cuts_the_text_and_is_named(client: anthropic.Anthropic) -> None:
    full = text_of(greedy(client))
    assert len(full) >= 6, f"the greedy text is too short to pick a stop sequence from: {full!r}"
    stop = full[3:6]
    message = greedy(client, stop_sequences=["never-generated", stop])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    assert text_of(message) == full[: full.index(stop)]


def test_prefill_is_continued_not_repeated(
    client: anthropic.Anthropic, tiny_server: TinyServer
) -> None:
    message = greedy(client)
    # The same continuation straight from the engine: the generation prompt + the prefill's ids.
    engine = tiny_server.services.models.get(TINY_MODEL)
    ids = engine.apply_chat_template(USER) + engine.encode(PREFILL)
    request = GenerationRequest(ids, SamplingParams(temperature=0), StopParams(max_tokens=12))
    expected = "".join(chunk.text for chunk in engine.submit(request))
    assert text_of(message) == expected
    assert prompt_tokens(message.usage) == len(ids)


def test_count_tokens_matches_a_real_call(client: anthropic.Anthropic) -> None:
    for messages in (USER, PREFILLED):
        counted = client.messages.count_tokens(
            model=TINY_MODEL, system="Answer briefly.", messages=messages
        )
        usage = greedy(client, system="Answer briefly.", messages=messages, max_tokens=1).usage
        assert counted.input_tokens == prompt_tokens(usage)


def test_prefix_cache_reads_are_reported_apart(client: anthropic.Anthropic) -> None:
    system = "You answer questions about European capitals. " * 20  # several KV blocks
    first = greedy(client, system=system, messages=USER, max_tokens=1).usage
    again = greedy(client, system=system, messages=USER, max_tokens=1).usage
    assert again.cache_read_input_tokens and again.cache_read_input_tokens > 0
    assert again.input_tokens < prompt_tokens(first) == prompt_tokens(again)


def test_stream_helper_builds_the_final_message(client: anthropic.Anthropic) -> None:
    expected = greedy(client)
    with client.messages.stream(
        model=TINY_MODEL, max_tokens=12, messages=PREFILLED, extra_body=GREEDY
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == text_of(final) == text_of(expected)
    assert final.stop_reason == expected.stop_reason
    assert prompt_tokens(final.usage) == prompt_tokens(expected.usage)
    assert final.usage.output_tokens == expected.usage.output_tokens


def test_raw_stream_event_order_includes_ping(tiny_server: TinyServer) -> None:
    body = {"model": TINY_MODEL, "max_tokens": 4, "messages": USER, "stream": True}
    headers = {"x-api-key": "x", "anthropic-version": "2023-06-01", "anthropic-beta": "any"}
    with httpx.stream(
        "POST", f"{tiny_server.base_url}/v1/messages", json=body, headers=headers
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = []
    for block in raw.strip().split("\n\n"):
        name_line, data_line = block.split("\n")
        name = name_line.removeprefix("event: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name
        events.append((name, data))
    names = [name for name, _ in events]
    # Deltas are only sent for text; collapse them to compare the order.
    assert [n for i, n in enumerate(names) if n != names[i - 1] or i == 0] == STREAM_EVENTS
    assert names.count("content_block_delta") <= 4
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] > 0
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 4


def test_sdk_stream_events_in_order(client: anthropic.Anthropic) -> None:
    stream = greedy(client, max_tokens=3, messages=USER, stream=True)
    types = [event.type for event in stream]
    assert types == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * (len(types) - 5),
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


# -- errors, in Anthropic's shape ----------------------------------------------------------------


def post_raw(tiny_server: TinyServer, body: bytes | dict) -> httpx.Response:
    url = f"{tiny_server.base_url}/v1/messages"
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={"content-type": "application/json"})
    return httpx.post(url, json=body)


def assert_anthropic_error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status
    body = response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == kind
    return body["error"]["message"]


def test_malformed_json_is_invalid_request(tiny_server: TinyServer) -> None:
    message = assert_anthropic_error(
        post_raw(tiny_server, b'{"model": "x", '), 400, "invalid_request_error"
    )
    assert "not valid JSON" in message


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 2}, "temperature"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ],
)
def test_wrong_fields_are_invalid_request(
    tiny_server: TinyServer, change: dict, param: str
) -> None:
    body = {"model": TINY_MODEL, "max_tokens": 4, "messages": USER, **change}
    body = {k: v for k, v in body.items() if v is not None}
    message = assert_anthropic_error(post_raw(tiny_server, body), 400, "invalid_request_error")
    assert message.startswith(param)


def test_unknown_model_is_not_found(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        greedy(client, model="claude-nonexistent")
    assert info.value.body["error"]["type"] == "not_found_error"
    assert "claude-nonexistent" in info.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="claude-nonexistent", messages=USER)


def test_context_overflow_fails_before_the_stream(client: anthropic.Anthropic) -> None:
    long_text = "the capital of France is Paris " * 400  # far over the tiny model's 2048
    with pytest.raises(anthropic.BadRequestError) as info:
        greedy(client, messages=[{"role": "user", "content": long_text}], stream=True)
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert info.value.body["error"]["message"].startswith("prompt is too long")


def test_image_block_is_refused(client: anthropic.Anthropic) -> None:
    image = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    content = [{"type": "text", "text": "What is this?"}, {"type": "image", "source": image}]
    with pytest.raises(anthropic.BadRequestError) as info:
        greedy(client, messages=[{"role": "user", "content": content}])
    assert "image blocks are not supported" in info.value.body["error"]["message"]


# -- API keys ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server(
    tiny_llama_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TinyServer]:
    settings = ServerSettings(api_keys=("sk-ant-test",))
    with pytest.MonkeyPatch.context() as env:
        # A module fixture starts before the per-test data dir: keep the engine's caches out of ~.
        env.setenv("RAG_DATA_DIR", str(tmp_path_factory.mktemp("keyed-data")))
        with tiny_server_running(make_tiny_services(tiny_llama_path), settings) as server:
            yield server


def test_api_key_goes_in_x_api_key(keyed_server: TinyServer) -> None:
    good = anthropic.Anthropic(base_url=keyed_server.base_url, api_key="sk-ant-test")
    assert greedy(good, max_tokens=1).usage.output_tokens == 1
    bad = anthropic.Anthropic(base_url=keyed_server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        greedy(bad, max_tokens=1)
    assert info.value.body["error"]["type"] == "authentication_error"
