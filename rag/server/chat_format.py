"""OpenAI chat messages -> the plain {"role", "content"} dicts a model's chat template renders.

A message's text parts are joined with newlines; "developer" is OpenAI's newer name for "system";
an assistant message with no content (one that only called tools) renders as "". Image, audio and
file parts are refused with a 400 that names the part: the chat models here read text only.

Ignores: tokenization and the template itself (the backend applies it), tool calls and message
names (tools are refused by the route).
"""

from __future__ import annotations

from collections.abc import Sequence

from rag.server.errors import APIError
from rag.server.openai_schemas import ChatMessage

TEXT_PART_TYPES = frozenset({"text", "input_text"})  # the Chat and the Responses API names
IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image"})
ROLE_ALIASES = {"developer": "system"}


def template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat template wants them; raises APIError 400 for a non-text part."""
    return [
        {"role": ROLE_ALIASES.get(m.role, m.role), "content": _text(m, i)}
        for i, m in enumerate(messages)
    ]


def _text(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for j, part in enumerate(content):
        param = f"messages.{index}.content.{j}"
        if part.type in IMAGE_PART_TYPES:
            raise APIError(
                400,
                f"{param} is an image ({part.type!r}); this server's chat models read text only",
                param=param,
                code="unsupported_content",
            )
        if part.type not in TEXT_PART_TYPES:
            raise APIError(
                400,
                f"{param} has type {part.type!r}; only text parts are supported",
                param=param,
                code="unsupported_content",
            )
        if part.text is None:
            raise APIError(400, f"{param} is a text part without 'text'", param=param)
        texts.append(part.text)
    return "\n".join(texts)
