"""The wire format of the OpenAI generation routes: request bodies in, response bodies out.

    ChatCompletionRequest   POST /v1/chat/completions
    CompletionRequest       POST /v1/completions
    both -> .sampling(choice) -> SamplingParams,  .stop_params(max_tokens) -> StopParams
    ChoiceState             one choice's chunks -> text, logprobs, finish reason, usage
    usage_body, chat_logprobs, legacy_logprobs, ResponseMeta: the pieces of response JSON

Unknown fields are ignored (clients send many: user, store, metadata, parallel_tool_calls ...);
known fields are type-checked here, so a bad one is a 400 naming its parameter. Fields that are
known but unsupported (tools, json response formats, suffix) are accepted here and refused by the
routes with a message that says so.

Ignores: tokenization, context limits, submitting and streaming (routes_openai.py).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from inference.backend import GenerationChunk, SpeculationStats, Usage
from inference.sampling import MAX_TOP_LOGPROBS, SamplingParams, TokenLogprobs
from inference.stopping import StopParams

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import PydanticCustomError

from rag.server.errors import APIError

MAX_N = 16  # choices per prompt: each one is a request in the engine's batch
MAX_STOP = 16  # OpenAI allows 4; more costs little here
MAX_CHOICES = 128  # prompts x n in one /v1/completions request
MAX_SCALE = 100.0  # temperature and repetition_penalty


class _Body(BaseModel):
    # Unknown fields are dropped; Infinity / NaN are refused (JSON parsers accept them).
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


def _invalid(message: str) -> PydanticCustomError:
    # Not ValueError: pydantic would prefix its message with "Value error, ".
    return PydanticCustomError("invalid_value", message)


def _union_error(value: Any, handler: ValidatorFunctionWrapHandler, wanted: str) -> Any:
    """Run a union field's validation; on failure one plain sentence instead of one per member."""
    try:
        return handler(value)
    except ValidationError:
        raise _invalid(f"must be {wanted}, got {type(value).__name__}") from None


class StreamOptions(_Body):
    include_usage: bool | None = None


class ResponseFormat(_Body):
    type: str


class ContentPart(_Body):
    """One part of a message's content; only text parts are usable (chat_format.py checks)."""

    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    @field_validator("content", mode="wrap")
    @classmethod
    def _content(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return _union_error(value, handler, "a string or a list of content parts")


class GenerationFields(_Body):
    """What chat and legacy completions share: the model, sampling, stopping and streaming."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    # OpenAI caps temperature at 2; the caps here only keep fp32 sampling math finite.
    temperature: float | None = Field(None, ge=0, le=MAX_SCALE)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's -1 and 0 both mean off
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=MAX_SCALE)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None  # vLLM's extension, for benchmarks
    # Ours: "ar" forces plain decoding, "mtp" lets a seeded sampled request speculate too.
    generation_mode: Literal["auto", "ar", "mtp"] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise _invalid(f"keys must be token ids (digit strings), got {key!r}")
            if not -100 <= bias <= 100:
                raise _invalid(f"values must be in [-100, 100], got {bias} for token {key}")
        return value

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        stop = _union_error(value, handler, "a string or a list of strings")
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP:
            raise _invalid(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise _invalid("stop strings must not be empty")
        return stop

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling(self, choice: int, *, num_top_logprobs: int | None) -> SamplingParams:
        """Choice i of n: the same params, seed + i (so n seeded choices differ yet repeat).

        num_top_logprobs None: no logprobs; 0: the sampled token's only.
        """
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=max(self.top_k or 0, 0),
            top_p=1.0 if self.top_p is None else self.top_p,
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            seed=None if self.seed is None else self.seed + choice,
            logprobs=num_top_logprobs is not None,
            num_top_logprobs=num_top_logprobs or 0,
        )

    def stop_params(self, max_tokens: int | None) -> StopParams:
        return StopParams(max_tokens=max_tokens, stop=self.stop_strings())


class RagOptions(BaseModel):
    """The `rag` extension field of a chat request: answer from the index (see rag_chat.py)."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(5, ge=1, le=50)
    sources: list[str] = Field(default_factory=list)  # path prefixes passages must be under
    mode: Literal["hybrid", "vector", "keyword"] = "hybrid"
    rerank: bool = False
    min_similarity: float | None = Field(None, ge=-1, le=1)


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    rag: RagOptions | None = None  # extension: retrieval-augmented answer (rag_chat.py)

    @field_validator("rag", mode="before")
    @classmethod
    def _rag_flag(cls, value: Any) -> Any:
        # `"rag": true` means the default options; false means plain chat.
        if isinstance(value, bool):
            return {} if value else None
        return value

    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    functions: list[dict[str, Any]] | None = None  # the deprecated form of tools

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_top_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(GenerationFields):
    # A string, a list of strings (one choice each), token ids, or a list of token id lists.
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        prompt = _union_error(
            value,
            handler,
            "a string, a list of strings, a list of token ids or a list of token id lists",
        )
        batch = _batch(prompt)
        if not batch or any(len(p) == 0 for p in batch):
            raise _invalid("must not be empty")
        if any(t < 0 for p in batch if isinstance(p, list) for t in p):
            raise _invalid("token ids must be >= 0")
        return prompt

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a batch: one string or token id list per prompt."""
        return _batch(self.prompt)


def _batch(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str] | list[list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return prompt  # type: ignore[return-value]


# -- response bodies ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportedToken:
    """A generated token's logprobs, and where its text starts in the choice's text."""

    logprobs: TokenLogprobs
    text_offset: int


@dataclass
class ChoiceState:
    """One choice as its chunks arrive: text, logprobs not yet reported, and how it ended."""

    num_chars: int = 0  # the choice's text so far, echoed prompt included
    parts: list[str] = field(default_factory=list)
    pending: list[ReportedToken] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    speculation: SpeculationStats | None = None

    def add(self, chunk: GenerationChunk) -> None:
        for token in chunk.logprobs:
            # The stop token (EOS) is not part of the text, so not of the logprobs either.
            if not (chunk.finish_reason == "stop" and chunk.stop_reason == token.token_id):
                self.pending.append(ReportedToken(token, self.num_chars))
        self.parts.append(chunk.text)
        self.num_chars += len(chunk.text)
        if chunk.finish_reason is not None:
            if chunk.finish_reason == "cancelled":  # only a request we cancelled ends so
                raise APIError(503, "the server cancelled this generation", code="cancelled")
            self.finish_reason = chunk.finish_reason
            self.usage = chunk.usage
            self.speculation = chunk.speculation

    def take_logprobs(self) -> list[ReportedToken]:
        taken, self.pending = self.pending, []
        return taken

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass(frozen=True)
class ResponseMeta:
    """What every body and chunk of one response repeats."""

    id: str
    created: int
    model: str

    @classmethod
    def make(cls, prefix: str, model: str) -> ResponseMeta:
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model)

    def head(self, object_name: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }


def usage_body(states: Sequence[ChoiceState], num_per_prompt: int) -> dict[str, Any]:
    """Prompt tokens once per prompt (not per choice), completion tokens of every choice.

    Choices i*n .. i*n+n-1 share prompt i, as the routes submit them.
    """
    usages = [s.usage for s in states if s.usage is not None]
    assert len(usages) == len(states), "usage is read after every choice finished"
    per_prompt = usages[::num_per_prompt]
    num_prompt = sum(u.prompt_tokens for u in per_prompt)
    num_completion = sum(u.completion_tokens for u in usages)
    body: dict[str, Any] = {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_completion,
        "total_tokens": num_prompt + num_completion,
        "prompt_tokens_details": {"cached_tokens": sum(u.cached_tokens for u in per_prompt)},
    }
    speculation = [s.speculation for s in states if s.speculation is not None]
    if speculation:
        num_accepted = sum(x.num_accepted for x in speculation)
        body["completion_tokens_details"] = {
            # OpenAI's names for draft tokens the model kept and threw away.
            "accepted_prediction_tokens": num_accepted,
            "rejected_prediction_tokens": sum(x.num_drafted for x in speculation) - num_accepted,
        }
        body["speculation"] = speculation_body(speculation)
    return body


def speculation_body(stats: Sequence[SpeculationStats]) -> dict[str, Any]:
    """Our extension: which lane decoded the choices, at what depth, and how drafts fared."""
    max_depth = max(x.max_depth for x in stats)
    by_depth = [
        sum(x.accepted_by_depth[j] for x in stats if j < x.max_depth) for j in range(max_depth)
    ]
    lanes = sorted({x.lane for x in stats})
    return {
        "lane": lanes[0] if len(lanes) == 1 else "mixed",
        "mtp_tokens": sum(x.mtp_tokens for x in stats),
        "batch_tokens": sum(x.batch_tokens for x in stats),
        "max_depth": max_depth,
        "cycles": sum(x.num_cycles for x in stats),
        "drafted_tokens": sum(x.num_drafted for x in stats),
        "accepted_by_depth": by_depth,
    }


class TokenTexts:
    """Token id -> its text alone, for logprobs (memoized: top alternatives repeat)."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._decode([token_id])
        return text


def chat_logprobs(texts: TokenTexts, tokens: Sequence[ReportedToken]) -> dict[str, Any]:
    """Chat's shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = texts(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for t in tokens:
        lp = t.logprobs
        item = entry(lp.token_id, lp.logprob)
        item["top_logprobs"] = [
            entry(i, v) for i, v in zip(lp.top_ids, lp.top_logprobs, strict=True)
        ]
        content.append(item)
    return {"content": content, "refusal": None}


def legacy_logprobs(texts: TokenTexts, tokens: Sequence[ReportedToken]) -> dict[str, Any]:
    """/v1/completions' shape: parallel lists, top alternatives as {text: logprob}."""
    return {
        "tokens": [texts(t.logprobs.token_id) for t in tokens],
        "token_logprobs": [t.logprobs.logprob for t in tokens],
        "top_logprobs": [
            {texts(i): v for i, v in zip(t.logprobs.top_ids, t.logprobs.top_logprobs, strict=True)}
            for t in tokens
        ],
        "text_offset": [t.text_offset for t in tokens],
    }
