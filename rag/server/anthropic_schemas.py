"""Anthropic Messages API: the request and response bodies, and a request flattened to chat text.

    CreateMessageRequest --to_chat()--> Chat(messages [{"role", "content"}], prefill)
    stop_reason_of(last chunk) -> ("end_turn" | "max_tokens" | "stop_sequence", matched string)
    message_usage(Usage) -> Anthropic's usage object

Text is the only content this server understands: image, document, tool and thinking blocks,
`tools`, and extended `thinking` get a 400 that says so. Consecutive turns of one role are
merged, as Anthropic does; a final assistant turn is a prefill that the reply continues.

Ignores: `metadata`, `cache_control` (the engine caches prefixes by itself), citations, and HTTP
(routes_anthropic.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from inference.backend import GenerationChunk, Usage

from pydantic import BaseModel, ConfigDict, Field

from rag.server.errors import APIError

StopReason = Literal["end_turn", "max_tokens", "stop_sequence"]

# Joins text blocks of one message, and the texts of consecutive turns of one role.
BLOCK_SEPARATOR = "\n"
TURN_SEPARATOR = "\n\n"

# Block types of the real API that this server rejects by name (any other type is a 400 too).
UNSUPPORTED_BLOCK_TYPES = (
    "image",
    "document",
    "search_result",
    "tool_use",
    "tool_result",
    "server_tool_use",
    "web_search_tool_result",
    "thinking",
    "redacted_thinking",
    "container_upload",
)


class TextBlock(BaseModel):
    type: Literal["text"]
    text: str


class UnsupportedBlock(BaseModel):
    """A block this server cannot use; parsed only to name it in the 400."""

    model_config = ConfigDict(extra="allow")

    type: Literal[UNSUPPORTED_BLOCK_TYPES]  # type: ignore[valid-type]


ContentBlock = Annotated[TextBlock | UnsupportedBlock, Field(discriminator="type")]


class InputMessage(BaseModel):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class CountTokensRequest(BaseModel):
    """The prompt part of a request: what /v1/messages/count_tokens counts."""

    model: str
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    # Accepted only to be refused with a clear message (see to_chat).
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


class CreateMessageRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1, strict=True)
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1, strict=True)
    top_p: float | None = Field(default=None, gt=0, le=1, strict=True)
    top_k: int | None = Field(default=None, ge=0, strict=True)  # 0: off
    metadata: dict[str, Any] | None = None
    stream: bool = Field(default=False, strict=True)
    generation_mode: Literal["auto", "ar", "mtp"] | None = None  # ours: "ar" forces plain decoding


class TextContent(BaseModel):
    type: Literal["text"] = "text"
    text: str


class MessageUsage(BaseModel):
    input_tokens: int  # prompt tokens not read from the prefix cache, as Anthropic counts them
    output_tokens: int
    cache_read_input_tokens: int
    cache_creation_input_tokens: int


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextContent]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: MessageUsage


class CountTokensResponse(BaseModel):
    input_tokens: int


@dataclass(frozen=True)
class Chat:
    """A request as chat-template messages; `prefill` is the final assistant text to continue."""

    messages: list[dict[str, str]]  # the system message first, if any; no prefill
    prefill: str = ""


def _block_text(content: str | list[TextBlock | UnsupportedBlock], where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, block in enumerate(content):
        if not isinstance(block, TextBlock):
            raise APIError(
                400,
                f"{where}.{j}: {block.type} blocks are not supported by this server; "
                "send text blocks only",
                param=f"{where}.{j}.type",
            )
        texts.append(block.text)
    return BLOCK_SEPARATOR.join(texts)


def _refuse_unsupported_options(request: CountTokensRequest) -> None:
    if request.tools:
        raise APIError(400, "tools are not supported by this server", param="tools")
    thinking_type = (request.thinking or {}).get("type", "disabled")
    if thinking_type != "disabled":
        raise APIError(
            400,
            f"extended thinking is not supported by this server, got thinking.type "
            f"{thinking_type!r}; leave it out or send 'disabled'",
            param="thinking",
        )


def to_chat(request: CountTokensRequest) -> Chat:
    """The request's system prompt and turns as chat-template messages; raises APIError 400."""
    _refuse_unsupported_options(request)
    messages: list[dict[str, str]] = []
    system = _block_text(request.system or "", "system")
    if system:
        messages.append({"role": "system", "content": system})
    turns: list[dict[str, str]] = []
    for i, message in enumerate(request.messages):
        text = _block_text(message.content, f"messages.{i}.content")
        if turns and turns[-1]["role"] == message.role:
            turns[-1]["content"] += TURN_SEPARATOR + text
        else:
            turns.append({"role": message.role, "content": text})
    prefill = ""
    if turns[-1]["role"] == "assistant":
        prefill = turns.pop()["content"]
        # As Anthropic: a trailing space would be tokenized apart from the word the model writes.
        if prefill != prefill.rstrip():
            raise APIError(
                400,
                "final assistant content cannot end with trailing whitespace",
                param=f"messages.{len(request.messages) - 1}.content",
            )
    if not turns and not prefill:
        raise APIError(
            400,
            "messages hold no turn to answer: send a user turn or a non-empty prefill",
            param="messages",
        )
    return Chat(messages + turns, prefill)


def stop_reason_of(chunk: GenerationChunk) -> tuple[StopReason, str | None]:
    """The last chunk's end in Anthropic's terms, with the stop sequence that matched."""
    if chunk.finish_reason == "length":
        return "max_tokens", None
    if isinstance(chunk.stop_reason, str):
        return "stop_sequence", chunk.stop_reason
    return "end_turn", None  # an end-of-turn token


def message_usage(usage: Usage) -> MessageUsage:
    # Anthropic's input_tokens leaves out cache reads: the three input counts add up to the prompt.
    return MessageUsage(
        input_tokens=usage.prompt_tokens - usage.cached_tokens,
        output_tokens=usage.completion_tokens,
        cache_read_input_tokens=usage.cached_tokens,
        cache_creation_input_tokens=0,
    )
