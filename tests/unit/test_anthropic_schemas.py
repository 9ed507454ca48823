"""Anthropic request flattening, stop reasons, usage, and continuing a prefilled assistant turn."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from inference.backend import GenerationChunk, Usage

import pytest
from pydantic import ValidationError

from rag.server.anthropic_schemas import (
    Chat,
    CountTokensRequest,
    CreateMessageRequest,
    message_usage,
    stop_reason_of,
    to_chat,
)
from rag.server.errors import APIError
from rag.server.routes_anthropic import continuation_ids, prompt_ids
from tests.fixtures.tiny_llama import CHATML_TEMPLATE, write_bpe_tokenizer


def chat_of(**body: Any) -> Chat:
    return to_chat(CountTokensRequest.model_validate({"model": "m", **body}))


def refusal(**body: Any) -> APIError:
    with pytest.raises(APIError) as info:
        chat_of(**body)
    assert info.value.status_code == 400
    return info.value


def test_system_and_turns_become_chat_messages() -> None:
    chat = chat_of(
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
            {"role": "user", "content": [{"type": "text", "text": "a", "cache_control": {}}]},
        ],
    )
    assert chat == Chat(
        [
            {"role": "system", "content": "Be brief.\nBe kind."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "a"},
        ],
        prefill="",
    )


def test_no_system_message_without_a_system_prompt() -> None:
    for system in (None, "", []):
        chat = chat_of(system=system, messages=[{"role": "user", "content": "Hi"}])
        assert chat.messages == [{"role": "user", "content": "Hi"}]


def test_consecutive_turns_of_one_role_are_merged() -> None:
    chat = chat_of(
        messages=[
            {"role": "user", "content": "one"},
            {"role": "user", "content": [{"type": "text", "text": "two"}]},
            {"role": "assistant", "content": "three"},
        ]
    )
    assert chat.messages == [{"role": "user", "content": "one\n\ntwo"}]
    assert chat.prefill == "three"


def test_an_empty_final_assistant_turn_is_no_prefill() -> None:
    chat = chat_of(
        messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]
    )
    assert chat == Chat([{"role": "user", "content": "q"}], prefill="")


def test_a_conversation_with_nothing_to_answer_is_refused() -> None:
    error = refusal(system="s", messages=[{"role": "assistant", "content": ""}])
    assert "no turn to answer" in error.message
    assert chat_of(messages=[{"role": "assistant", "content": "Once"}]) == Chat([], "Once")


def test_prefill_with_trailing_whitespace_is_refused() -> None:
    error = refusal(
        messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "Sure "}]
    )
    assert "trailing whitespace" in error.message and error.param == "messages.1.content"


@pytest.mark.parametrize("kind", ["image", "document", "tool_use", "tool_result", "thinking"])
def test_non_text_blocks_are_refused_by_name(kind: str) -> None:
    error = refusal(
        messages=[
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": kind}]},
        ]
    )
    assert error.message.startswith(f"messages.1.content.1: {kind} blocks are not supported")
    assert error.param == "messages.1.content.1.type"


def test_tools_and_thinking_are_refused() -> None:
    messages = [{"role": "user", "content": "q"}]
    assert "tools" in refusal(messages=messages, tools=[{"name": "f"}]).message
    error = refusal(messages=messages, thinking={"type": "enabled", "budget_tokens": 1024})
    assert "thinking" in error.message and "'enabled'" in error.message
    assert chat_of(messages=messages, tools=[], thinking={"type": "disabled"}).messages == messages


@pytest.mark.parametrize(
    "change",
    [
        {"max_tokens": 0},
        {"max_tokens": "5"},
        {"max_tokens": True},
        {"temperature": 1.5},
        {"top_p": 0},
        {"top_k": -1},
        {"stop_sequences": [""]},
        {"stream": "yes"},
        {"messages": []},
        {"messages": [{"role": "system", "content": "s"}]},
        {"messages": [{"role": "user", "content": [{"type": "video"}]}]},
    ],
)
def test_invalid_fields_fail_validation(change: dict) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "q"}]}
    with pytest.raises(ValidationError):
        CreateMessageRequest.model_validate({**body, **change})


def chunk(finish_reason: Any, stop_reason: str | int | None = None) -> GenerationChunk:
    return GenerationChunk("r", "", (), Usage(10, 4, 3), finish_reason, stop_reason)


def test_stop_reasons() -> None:
    assert stop_reason_of(chunk("length")) == ("max_tokens", None)
    assert stop_reason_of(chunk("stop", "\n\n")) == ("stop_sequence", "\n\n")
    assert stop_reason_of(chunk("stop", 2)) == ("end_turn", None)  # an end-of-turn token id


def test_usage_counts_cache_reads_apart_from_input_tokens() -> None:
    usage = message_usage(Usage(prompt_tokens=10, cached_tokens=4, completion_tokens=3))
    assert usage.model_dump() == {
        "input_tokens": 6,
        "output_tokens": 3,
        "cache_read_input_tokens": 4,
        "cache_creation_input_tokens": 0,
    }


# -- continuing a prefill: compared with transformers' continue_final_message -------------------

LLAMA3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}<|endoftext|>\n\n"
    "{{ m['content'] | trim }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant<|endoftext|>\n\n{% endif %}"
)
ALTERNATING = (  # refuses a conversation that does not alternate, as Gemma's template does
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TemplateBackend:
    """The chat-template part of a GenerationBackend, over a real tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        return list(
            self.tokenizer.apply_chat_template(
                [dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                return_dict=False,
            )
        )


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    write_bpe_tokenizer(folder)
    return folder


def backend_with(tokenizer_dir: Path, template: str) -> TemplateBackend:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.chat_template = template
    return TemplateBackend(tokenizer)


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, LLAMA3_LIKE], ids=["chatml", "llama3"])
@pytest.mark.parametrize("prefill", ["The capital", "A", "café 日本", "x\n\ny", "AAAA"])
def test_continuation_matches_continue_final_message(
    tokenizer_dir: Path, template: str, prefill: str
) -> None:
    backend = backend_with(tokenizer_dir, template)
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "Where?"}]
    ids = continuation_ids(backend, messages, prefill)
    reference = backend.tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": prefill}],
        continue_final_message=True,
        tokenize=True,
        return_dict=False,
    )
    assert ids == list(reference)
    assert backend.tokenizer.decode(ids).endswith(prefill)


def test_prompt_without_prefill_ends_in_the_generation_prompt(tokenizer_dir: Path) -> None:
    backend = backend_with(tokenizer_dir, CHATML_TEMPLATE)
    ids = prompt_ids(backend, Chat([{"role": "user", "content": "Hi"}]))
    assert (
        backend.tokenizer.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_template_that_refuses_the_turns_is_a_400(tokenizer_dir: Path) -> None:
    backend = backend_with(tokenizer_dir, ALTERNATING)
    chat = Chat([{"role": "assistant", "content": "first"}, {"role": "user", "content": "q"}])
    with pytest.raises(APIError) as info:
        prompt_ids(backend, chat)
    assert info.value.status_code == 400
    assert "roles must alternate" in info.value.message
