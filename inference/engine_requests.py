"""One request inside the engine: its token history, the token being sampled, stop state, stream.

    token_ids = prompt + output known on the host        (what the runner reads)
    pending   = the next token, still a lazy MLX scalar  (the step in flight samples it)

With a prefix cache, `block_keys` name the full blocks of the known tokens (prompt, then output
as it grows); the first `num_stored_blocks` of them are cached (found at admission or stored as
the request went), and `restore` holds the found blocks until the request's first step loads
`num_restore_tokens` of them into its slot.

`accept` turns a sampled token into the request's next chunk: it runs stop tokens, stop strings
and max_tokens through the StopChecker and the UTF-8-safe detokenizer.

Ignores: scheduling, batching and when the engine calls it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from inference.backend import GenerationChunk, GenerationRequest, Usage
from inference.detokenize import Decodes, IncrementalDetokenizer
from inference.engine_stream import GenerationHandle
from inference.prefix_cache import PrefixHit
from inference.sampling import SamplingParams, TokenLogprobs, make_seed
from inference.stopping import StopChecker

import mlx.core as mx


@dataclass(eq=False)
class RequestState:
    """A request in flight; see the module docstring."""

    request: GenerationRequest
    handle: GenerationHandle
    stop: StopChecker
    seed: int
    token_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    pending: mx.array | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from a prefix cache
    block_keys: list[str] = field(default_factory=list)  # chained keys of the full blocks
    num_stored_blocks: int = 0  # leading blocks in the prefix cache (found or stored)
    storing: bool = True  # False once a block could not be cached: later ones are unreachable
    restore: PrefixHit | None = None  # found blocks, loaded into the slot at the first step
    num_restore_tokens: int = 0  # ... this many of their tokens
    ssd_checked: bool = False  # the SSD tier was asked for its blocks (once per request)
    prompt_tail_stored: bool = False  # the prompt's last, partial block is cached

    @classmethod
    def make(
        cls,
        request: GenerationRequest,
        handle: GenerationHandle,
        *,
        decoder: Decodes,
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
    ) -> RequestState:
        """Add the model's EOS ids and the context's room to the request's own stop params."""
        room = max_model_len - len(request.prompt_ids)
        stop = request.stop
        stop = replace(
            stop,
            max_tokens=room if stop.max_tokens is None else min(stop.max_tokens, room),
            stop_token_ids=stop.stop_token_ids + (() if request.ignore_eos else eos_token_ids),
        )
        seed = request.sampling.seed
        return cls(
            request=request,
            handle=handle,
            stop=StopChecker(stop, IncrementalDetokenizer(decoder)),
            seed=make_seed() if seed is None else seed,
            token_ids=list(request.prompt_ids),
        )

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    def usage(self) -> Usage:
        return Usage(len(self.request.prompt_ids), self.num_cached_tokens, len(self.output_ids))

    def accept(self, token_id: int, logprobs: TokenLogprobs | None) -> GenerationChunk:
        """Record a sampled token; the chunk says what text it releases and whether it ended."""
        self.pending = None
        self.token_ids.append(token_id)
        self.output_ids.append(token_id)
        update = self.stop.add_token(token_id)
        return GenerationChunk(
            self.request_id,
            update.text,
            (token_id,),
            self.usage(),
            finish_reason=update.finish_reason,
            stop_reason=update.stop_reason,
            logprobs=() if logprobs is None else (logprobs,),
        )

    def cancelled_chunk(self) -> GenerationChunk:
        return GenerationChunk(self.request_id, "", (), self.usage(), finish_reason="cancelled")
