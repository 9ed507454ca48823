"""What every generation backend speaks: requests in, streamed chunks out.

The local MLX engine (engine.py) implements `GenerationBackend`, and so does `rag.upstreams`'
RemoteBackend (OpenAI-compatible upstreams: vLLM, SGLang, llama-server, another appliance), so the
HTTP layer and `rag ask` depend on this file only.

    backend.apply_chat_template(messages) -> prompt ids
    backend.submit(GenerationRequest(prompt_ids, sampling, stop)) -> GenerationStream
    for chunk in stream / async for chunk in stream: chunk.text, chunk.finish_reason, chunk.usage

Ignores: how tokens are computed, batched or scheduled, and where the model runs.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from inference.sampling import SamplingParams, TokenLogprobs
from inference.stopping import StopParams

# OpenAI's "stop" and "length", plus "cancelled" for a request that left before finishing.
FinishReason = Literal["stop", "length", "cancelled"]
# "auto": the backend picks (the speculative MTP lane when the model has a head, load is low, and
# speculation cannot change a seeded sample: greedy or unseeded); "mtp": the lane whenever load
# is low, seeded or not (same distribution, another sample than plain decoding's for the seed);
# "ar": plain autoregressive decoding only (a live A/B switch).
GenerationMode = Literal["auto", "ar", "mtp"]
GENERATION_MODES: tuple[str, ...] = ("auto", "ar", "mtp")


def make_request_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class GenerationRequest:
    """One completion to generate from prompt token ids."""

    prompt_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: StopParams = field(default_factory=StopParams)
    request_id: str = field(default_factory=make_request_id)
    ignore_eos: bool = False  # True: the model's EOS tokens do not stop it (benchmarks)
    generation_mode: GenerationMode = "auto"
    # True: the consumer reads nothing until the last chunk (a non-streamed API answer), so a
    # backend may discard what it generated and start the request over elsewhere (a remote
    # backend whose upstream died mid-answer). Streamed requests leave it False.
    restartable: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_ids", tuple(self.prompt_ids))
        if self.generation_mode not in GENERATION_MODES:
            raise ValueError(
                f"generation_mode must be one of {', '.join(GENERATION_MODES)}, "
                f"got {self.generation_mode!r}"
            )
        if not self.prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        if any(not isinstance(t, int) or t < 0 for t in self.prompt_ids):
            raise ValueError("prompt_ids must be token ids >= 0")


@dataclass(frozen=True)
class Usage:
    """Token counts of a request so far (OpenAI's usage, with cached prompt tokens)."""

    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from a prefix cache
    completion_tokens: int


@dataclass(frozen=True)
class SpeculationStats:
    """How a request's tokens were decoded: in the speculative MTP lane or in the batch."""

    mtp_tokens: int  # tokens committed by draft-verify cycles
    batch_tokens: int  # tokens decoded one per step (the batch, or plain decoding)
    max_depth: int  # deepest draft used (0: never speculated)
    num_cycles: int  # draft-verify cycles
    num_drafted: int  # draft tokens proposed
    accepted_by_depth: tuple[int, ...]  # cycles whose draft j + 1 stood, j = 0..max_depth - 1
    generation_mode: GenerationMode = "auto"

    @property
    def num_accepted(self) -> int:
        return sum(self.accepted_by_depth)

    @property
    def lane(self) -> str:
        """Where most of its tokens came from: "mtp", "batch", or "ar" when it was forced."""
        if self.generation_mode == "ar":
            return "ar"
        return "mtp" if self.mtp_tokens > self.batch_tokens else "batch"


@dataclass(frozen=True)
class GenerationChunk:
    """What one step adds to a request: text safe to show, the tokens, and maybe the end."""

    request_id: str
    text: str  # never splits a UTF-8 character; may be "" (held back by a possible stop string)
    token_ids: tuple[int, ...]
    usage: Usage
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that matched
    logprobs: tuple[TokenLogprobs, ...] = ()
    speculation: SpeculationStats | None = None  # on the last chunk, from backends that track it


class GenerationError(RuntimeError):
    """The backend failed while generating; raised to the stream's consumer."""


@runtime_checkable
class GenerationStream(Protocol):
    """One request's chunks, for a thread (`for`) or an asyncio task (`async for`)."""

    @property
    def request_id(self) -> str: ...

    def __iter__(self) -> Iterator[GenerationChunk]: ...

    def __aiter__(self) -> AsyncIterator[GenerationChunk]: ...

    def cancel(self) -> None:
        """The consumer is gone: stop generating (the stream ends with "cancelled")."""
        ...


@runtime_checkable
class GenerationBackend(Protocol):
    """A model that generates: its name, its tokenizer's view, and submit."""

    @property
    def model_name(self) -> str: ...

    @property
    def max_model_len(self) -> int:
        """Prompt plus completion tokens one request may hold."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def encode(self, text: str) -> list[int]:
        """Text -> token ids, without special tokens."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """Token ids -> text, special tokens included."""
        ...

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Chat messages ({"role", "content"}) -> prompt token ids, with the model's template."""
        ...

    def submit(self, request: GenerationRequest) -> GenerationStream: ...

    def close(self) -> None: ...
