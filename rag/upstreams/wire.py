"""The OpenAI legacy-completions wire format, both ways, for token-id prompts.

    completion_body(request, model, max_model_len)  -> the JSON of POST /v1/completions
    sse_payload(line)                               -> the JSON of one `data:` line, or None
    ChunkDecoder.feed(payload) -> [GenerationChunk]  text chunks as they come
    ChunkDecoder.finish()      -> GenerationChunk    the last one, with the final usage

The finish arrives in one chunk and the usage (stream_options.include_usage) in the next, so
the finish chunk is held until the stream ends; text is never held.

Sampling fields beyond OpenAI's (top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids,
return_token_ids) are sent only when set; vLLM, SGLang and this appliance read them, others
ignore unknown fields.

Ignores: HTTP (client.py), which upstream (pool.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inference.backend import FinishReason, GenerationChunk, GenerationRequest, Usage


class UpstreamStreamError(Exception):
    """The upstream sent an error, or something that is not a completion chunk."""


def completion_body(request: GenerationRequest, model: str, max_model_len: int) -> dict[str, Any]:
    s, stop = request.sampling, request.stop
    # Without max_tokens a legacy completion stops at 16 tokens; the engine fills the context.
    max_tokens = stop.max_tokens or max_model_len - len(request.prompt_ids)
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(request.prompt_ids),
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "return_token_ids": True,  # vLLM's extension: exact ids instead of re-encoded text
    }
    optional: dict[str, Any] = {
        "top_k": s.top_k or None,
        "min_p": s.min_p or None,
        "presence_penalty": s.presence_penalty or None,
        "frequency_penalty": s.frequency_penalty or None,
        "repetition_penalty": None if s.repetition_penalty == 1 else s.repetition_penalty,
        "logit_bias": {str(k): v for k, v in s.logit_bias.items()} or None,
        "seed": s.seed,
        "stop": list(stop.stop) or None,
        "stop_token_ids": list(stop.stop_token_ids) or None,
        "ignore_eos": request.ignore_eos or None,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def sse_payload(line: str) -> dict[str, Any] | None:
    """One SSE line -> its JSON; None for blank lines, comments, `event:` lines and [DONE]."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    try:
        payload = json.loads(data)
    except json.JSONDecodeError as exc:
        raise UpstreamStreamError(f"not JSON in the stream: {data[:200]!r}") from exc
    if not isinstance(payload, dict):
        raise UpstreamStreamError(f"not a JSON object in the stream: {data[:200]!r}")
    return payload


def error_message(payload: Any) -> str:
    """The message of an OpenAI or Anthropic error body (or the body itself, cut short)."""
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return str(payload)[:300]


@dataclass
class _Finish:
    reason: FinishReason
    stop_reason: str | int | None


class ChunkDecoder:
    """One request's stream of completion chunks -> GenerationChunks."""

    def __init__(
        self, request_id: str, num_prompt_tokens: int, encode: Callable[[str], list[int]]
    ) -> None:
        self._request_id = request_id
        self._encode = encode  # for upstreams that send text only (token ids for metrics)
        self.num_tokens = 0
        self._usage = Usage(num_prompt_tokens, 0, 0)
        self._final_usage: Usage | None = None
        self._finish: _Finish | None = None

    @property
    def finished(self) -> bool:
        """A finish reason arrived: the answer is complete, whatever comes after it."""
        return self._finish is not None

    @property
    def usage(self) -> Usage:
        return self._final_usage or Usage(
            self._usage.prompt_tokens, self._usage.cached_tokens, self.num_tokens
        )

    def feed(self, payload: dict[str, Any]) -> list[GenerationChunk]:
        if "error" in payload:
            raise UpstreamStreamError(error_message(payload))
        if isinstance(usage := payload.get("usage"), dict):
            self._final_usage = _usage(usage, self._usage.prompt_tokens)
        chunks: list[GenerationChunk] = []
        for choice in payload.get("choices") or ():
            text = choice.get("text") or ""
            ids = choice.get("token_ids")
            token_ids = tuple(ids) if isinstance(ids, list) else tuple(self._encode(text))
            if text or token_ids:
                self.num_tokens += len(token_ids)
                chunks.append(GenerationChunk(self._request_id, text, token_ids, self.usage))
            if reason := choice.get("finish_reason"):
                self._finish = _finish(reason, choice.get("stop_reason"))
        return chunks

    def finish(self) -> GenerationChunk:
        """The last chunk; raises UpstreamStreamError when the stream ended without a finish."""
        if self._finish is None:
            raise UpstreamStreamError(
                f"the stream ended without a finish reason after {self.num_tokens} tokens"
            )
        return GenerationChunk(
            self._request_id,
            "",
            (),
            self.usage,
            finish_reason=self._finish.reason,
            stop_reason=self._finish.stop_reason,
        )


def _finish(reason: str, stop_reason: Any) -> _Finish:
    if reason in ("abort", "cancelled", "error"):
        raise UpstreamStreamError(f"the upstream ended the request: finish_reason {reason!r}")
    # "stop" and "length" are ours; anything else (e.g. "content_filter") is a stop too.
    kind: FinishReason = "length" if reason == "length" else "stop"
    if not isinstance(stop_reason, str | int) or isinstance(stop_reason, bool):
        stop_reason = None
    return _Finish(kind, stop_reason)


def _usage(usage: dict[str, Any], num_prompt_tokens: int) -> Usage:
    details = usage.get("prompt_tokens_details") or {}
    return Usage(
        prompt_tokens=int(usage.get("prompt_tokens") or num_prompt_tokens),
        cached_tokens=int(details.get("cached_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )
