"""The OpenAI wire format: what request bodies accept, what they refuse (naming the field) and
the engine params they become; chat messages -> template messages; the pieces of responses."""

from __future__ import annotations

from typing import Any

from inference.backend import GenerationChunk, Usage
from inference.sampling import TokenLogprobs

import pytest
from pydantic import ValidationError

from rag.server.chat_format import template_messages
from rag.server.errors import APIError
from rag.server.openai_schemas import (
    MAX_STOP,
    ChatCompletionRequest,
    ChoiceState,
    CompletionRequest,
    TokenTexts,
    legacy_logprobs,
    usage_body,
)

USER = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": USER, **fields})


def refused(model: type, body: dict) -> tuple[str, str]:
    """The first error's location (as the server's param) and message."""
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    first = info.value.errors()[0]
    return ".".join(str(part) for part in first["loc"]), first["msg"]


def test_defaults_become_neutral_sampling_and_no_limit() -> None:
    body = chat(user="u-1", store=True, metadata={"a": 1})  # unknown fields are ignored
    params = body.sampling(0, num_top_logprobs=body.num_top_logprobs)
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (1.0, 1.0, 0, 0.0)
    assert params.seed is None and not params.logprobs and not params.has_penalties
    assert body.completion_limit is None and body.num_choices == 1 and not body.include_usage
    assert body.stop_params(None).stop == ()


def test_sampling_fields_reach_the_engine_params() -> None:
    body = chat(
        temperature=0.5,
        top_p=0.9,
        top_k=-1,
        min_p=0.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        logit_bias={"7": -100, "11": 5},
        seed=41,
        logprobs=True,
        top_logprobs=3,
    )
    params = body.sampling(2, num_top_logprobs=body.num_top_logprobs)
    assert params.top_k == 0  # vLLM's -1: off
    assert params.seed == 43  # choice 2 of n
    assert dict(params.logit_bias) == {7: -100, 11: 5}
    assert (params.logprobs, params.num_top_logprobs) == (True, 3)
    assert (params.repetition_penalty, params.presence_penalty) == (1.2, 0.5)


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert chat(max_tokens=5, max_completion_tokens=9).completion_limit == 9
    assert chat(max_tokens=5).completion_limit == 5


@pytest.mark.parametrize(("stop", "expected"), [("###", ("###",)), (["a", "b"], ("a", "b"))])
def test_stop_is_a_string_or_a_list(stop: Any, expected: tuple[str, ...]) -> None:
    assert chat(stop=stop).stop_params(4).stop == expected


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"stop": 5}, "stop", "a string or a list of strings, got int"),
        ({"stop": [""]}, "stop", "must not be empty"),
        ({"stop": ["x"] * (MAX_STOP + 1)}, "stop", f"at most {MAX_STOP}"),
        ({"temperature": "hot"}, "temperature", "valid number"),
        ({"temperature": -1}, "temperature", "greater than or equal to 0"),
        ({"temperature": 1e300}, "temperature", "less than or equal to 100"),
        ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"n": 0}, "n", "greater than or equal to 1"),
        ({"logit_bias": {"a": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"3": 101}}, "logit_bias", "[-100, 100]"),
        ({"top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "'system'"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", "got int"),
    ],
)
def test_bad_chat_fields_are_named(fields: dict, param: str, says: str) -> None:
    got_param, message = refused(ChatCompletionRequest, {"messages": USER, **fields})
    assert got_param == param
    assert says in message


def test_infinity_is_refused() -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate_json(
            '{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}'
        )


@pytest.mark.parametrize(
    ("prompt", "batch"),
    [
        ("once", ["once"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1], [2, 3]], [[1], [2, 3]]),
    ],
)
def test_completion_prompt_forms_become_a_batch(prompt: Any, batch: list) -> None:
    assert CompletionRequest.model_validate({"prompt": prompt}).prompts() == batch


@pytest.mark.parametrize(
    ("prompt", "says"),
    [
        ([], "must not be empty"),
        ("", "must not be empty"),
        ([[1], []], "must not be empty"),
        ([1, "a"], "got list"),
        ([[1, -2]], ">= 0"),
        (None, "got NoneType"),
    ],
)
def test_bad_prompts_are_refused(prompt: Any, says: str) -> None:
    param, message = refused(CompletionRequest, {"prompt": prompt})
    assert param == "prompt"
    assert says in message


def test_legacy_logprobs_count_is_the_top_alternatives() -> None:
    body = CompletionRequest.model_validate({"prompt": "x", "logprobs": 0})
    params = body.sampling(0, num_top_logprobs=body.logprobs)
    assert (params.logprobs, params.num_top_logprobs) == (True, 0)


def test_template_messages_join_text_parts_and_rename_developer() -> None:
    body = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": None, "tool_calls": []},
        ]
    )
    assert template_messages(body.messages) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
    ]


@pytest.mark.parametrize(
    ("part", "says"),
    [
        ({"type": "image_url", "image_url": {"url": "http://x/y.png"}}, "read text only"),
        ({"type": "input_audio", "input_audio": {}}, "only text parts"),
        ({"type": "text"}, "without 'text'"),
    ],
)
def test_non_text_parts_are_a_400_naming_the_part(part: dict, says: str) -> None:
    body = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, part]}])
    with pytest.raises(APIError) as info:
        template_messages(body.messages)
    assert info.value.status_code == 400
    assert info.value.param == "messages.0.content.1"
    assert says in info.value.message


# -- response pieces ----------------------------------------------------------------------------


def token_chunk(
    text: str, token_id: int, num_out: int, finish: Any = None, stop_reason: Any = None
) -> GenerationChunk:
    logprobs = TokenLogprobs(token_id, -0.5, (token_id, 9), (-0.5, -2.0))
    usage = Usage(prompt_tokens=10, cached_tokens=4, completion_tokens=num_out)
    return GenerationChunk("r", text, (token_id,), usage, finish, stop_reason, (logprobs,))


def test_choice_state_offsets_and_the_stop_token_left_out() -> None:
    state = ChoiceState(num_chars=3)  # an echoed prompt of 3 characters
    state.add(token_chunk("ab", 5, 1))
    state.add(token_chunk("", 6, 2))  # held back (a possible stop string)
    state.add(token_chunk("cd", 7, 3))
    state.add(token_chunk("", 2, 4, finish="stop", stop_reason=2))  # EOS
    assert state.text == "abcd" and state.finish_reason == "stop"
    assert state.usage is not None and state.usage.completion_tokens == 4
    texts = TokenTexts(lambda ids: f"<{ids[0]}>")
    assert legacy_logprobs(texts, state.take_logprobs()) == {
        "tokens": ["<5>", "<6>", "<7>"],
        "token_logprobs": [-0.5, -0.5, -0.5],
        "top_logprobs": [
            {"<5>": -0.5, "<9>": -2.0},
            {"<6>": -0.5, "<9>": -2.0},
            {"<7>": -0.5, "<9>": -2.0},
        ],
        "text_offset": [3, 5, 5],
    }
    assert state.take_logprobs() == []


def test_a_cancelled_finish_is_an_error_not_a_finish_reason() -> None:
    with pytest.raises(APIError) as info:
        ChoiceState().add(token_chunk("", 1, 0, finish="cancelled"))
    assert info.value.status_code == 503


def test_usage_counts_each_prompt_once_and_every_choice() -> None:
    states = []
    for num_out in (3, 4, 5, 6):  # 2 prompts x n=2
        state = ChoiceState()
        state.add(token_chunk("x", 1, num_out, finish="length"))
        states.append(state)
    assert usage_body(states, num_per_prompt=2) == {
        "prompt_tokens": 20,
        "completion_tokens": 18,
        "total_tokens": 38,
        "prompt_tokens_details": {"cached_tokens": 8},
    }
