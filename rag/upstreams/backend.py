"""RemoteBackend: a GenerationBackend whose tokens come from OpenAI-compatible upstreams.

    backend = make_remote_backend(specs, RouterConfig(), tokenizer_folder)
    backend.apply_chat_template(messages) -> ids          (local tokenizer, tokenizer.py)
    backend.submit(GenerationRequest(ids, ...)) -> stream (for / async for, like the engine's)

With one upstream it is a remote engine that retries with backoff before the first token; with
several it is the router: prefix affinity or round robin, failover and health (pool.py). The
routes, `rag ask` and the RAG path cannot tell it from the local engine.

Ignores: logprobs (refused: upstreams report token strings, not the ids ours carry).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from inference.backend import GenerationRequest, GenerationStream
from inference.engine_types import ContextLengthError, EngineLoad

from rag.upstreams.client import fetch_model_card
from rag.upstreams.config import RouterConfig, UpstreamSpec
from rag.upstreams.pool import UpstreamPool, UpstreamStats
from rag.upstreams.tokenizer import LocalTokenizer, load_local_tokenizer

log = logging.getLogger(__name__)


class RemoteBackend:
    """Generation on upstreams, tokenization here; implements GenerationBackend."""

    def __init__(self, tokenizer: LocalTokenizer, pool: UpstreamPool) -> None:
        self._tokenizer = tokenizer
        self._pool = pool
        self._vocab_size = tokenizer.vocab_size()

    @property
    def model_name(self) -> str:
        return self._pool.model

    @property
    def tokenizer_folder(self) -> Path:
        return self._tokenizer.folder

    @property
    def max_model_len(self) -> int:
        return self._pool.max_model_len

    def count_tokens(self, text: str) -> int:
        return self._tokenizer.count_tokens(text)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(token_ids)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        return self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt
        )

    def submit(self, request: GenerationRequest) -> GenerationStream:
        """Never blocks on the network: the request is sent from the pool's I/O thread."""
        num_prompt = len(request.prompt_ids)
        if num_prompt >= self.max_model_len:
            raise ContextLengthError(
                f"prompt has {num_prompt} tokens; {self.model_name} holds {self.max_model_len} "
                "in all, which leaves no room to generate"
            )
        if max(request.prompt_ids) >= self._vocab_size:
            # Checked here so a bad id is a 400 before any stream starts, as with the engine.
            raise ValueError(
                f"prompt token id {max(request.prompt_ids)} is outside the vocabulary "
                f"(size {self._vocab_size})"
            )
        if request.sampling.logprobs:
            raise ValueError("logprobs are not available for a model served by remote upstreams")
        return self._pool.start(request)

    def load(self) -> EngineLoad:
        """Requests in flight on the upstreams (their own queues are theirs to report)."""
        return EngineLoad(num_waiting=0, num_running=self._pool.num_in_flight)

    def upstream_stats(self) -> list[UpstreamStats]:
        return self._pool.stats()

    def close(self) -> None:
        self._pool.close()


def make_remote_backend(
    specs: Sequence[UpstreamSpec], config: RouterConfig, tokenizer_folder: Path
) -> RemoteBackend:
    """Load the tokenizer, ask the upstreams for the model's name and context, start the pool.

    All upstreams must serve the same model (replicas): affinity only pays between copies of
    one model's prefix cache. Upstreams that are down at start-up are taken in when they answer.
    """
    tokenizer = load_local_tokenizer(tokenizer_folder)
    cards = [fetch_model_card(spec, config.connect_timeout_s) for spec in specs]
    names = {spec.model or (card or {}).get("id") for spec, card in zip(specs, cards, strict=True)}
    names.discard(None)
    if not names:
        raise ValueError(
            "no upstream answered /v1/models: name the model with --upstream URL,model=NAME"
        )
    if len(names) > 1:
        raise ValueError(
            f"upstreams serve different models ({', '.join(sorted(names))}); "
            "one router serves replicas of one model"
        )
    model = str(names.pop())
    max_model_len = config.max_model_len or _reported_context(cards) or tokenizer.context_length()
    if max_model_len is None:
        raise ValueError(f"the context length of {model} is unknown: pass --upstream-max-model-len")
    specs = [UpstreamSpec(s.url, model, s.api_key) for s in specs]
    log.info(
        "generation on %d upstream(s) (%s), model %s, context %d, policy %s",
        len(specs),
        ", ".join(s.name for s in specs),
        model,
        max_model_len,
        config.policy,
    )
    pool = UpstreamPool(
        specs, config, model=model, max_model_len=max_model_len, encode=tokenizer.encode
    )
    return RemoteBackend(tokenizer, pool)


def _reported_context(cards: Sequence[Mapping[str, Any] | None]) -> int | None:
    """The smallest max_model_len the upstreams report (vLLM and this appliance do)."""
    lengths = [int(c["max_model_len"]) for c in cards if c and c.get("max_model_len")]
    return min(lengths) if lengths else None
