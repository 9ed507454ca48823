"""Model runner: executes one ScheduledStep on an mlx-lm model and returns the logits to sample.

A step mixes decodes (1 token), speculative verifies (1 + k tokens) and prefill chunks (many
tokens) of different requests. They are grouped into forward passes by length, each pass a
right-padded (rows, L) batch over the slot KV cache (runner_cache.py):

    items sorted by num_tokens: 1 1 1 1 2 | 96 | 240
    a pass costs `pass_cost_tokens` tokens of compute (one trip over the weights) plus
    rows x L for its tokens, padding included; an item joins the previous pass while that is
    cheaper than a pass of its own.

So all decodes share one pass, a 4k-token prompt's chunk runs beside them in a second pass, and
short prompts admitted together share a pass. Only the rows that sample a token go through the
vocabulary projection (on SmolLM2 the logits of a whole 256-token chunk would cost a fifth of
its forward pass).

A request that hit the prefix cache gets its slot from `restore` (the cached keys and values)
before its first step, which then starts at the first uncached token.

Ignores: sampling (returns logits), token bookkeeping (the caller passes each request's token ids),
scheduling, and stop conditions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from inference.runner_cache import PassRows, SlotKVCache
from inference.scheduler import ScheduledItem, ScheduledStep

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

PAD_TOKEN_ID = 0  # what right-padding feeds the model; its keys land past the row's length


class UnsupportedModelError(ValueError):
    """The model needs a KV cache the runner does not have (sliding window, recurrent state)."""


@dataclass(frozen=True)
class RunnerConfig:
    """How the runner batches a step into forward passes."""

    num_slots: int = 16  # requests whose KV the runner holds at once (the scheduler's max_num_seqs)
    # A forward pass costs this many tokens' worth of compute beyond its tokens: ~5 for
    # SmolLM2-135M on a 2-core CPU (80 ms a decode pass, ~16 ms a prefill token); hundreds on a GPU.
    pass_cost_tokens: int = 8

    def __post_init__(self) -> None:
        if self.num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {self.num_slots}")
        if self.pass_cost_tokens < 0:
            raise ValueError(f"pass_cost_tokens must be >= 0, got {self.pass_cost_tokens}")


@dataclass(frozen=True)
class RunOutput:
    """Logits to sample: row i belongs to request_ids[i], its token goes at positions[i]."""

    request_ids: tuple[str, ...]
    positions: tuple[int, ...]  # index in the request's token sequence of the sampled token
    logits: mx.array | None  # (rows, vocab), lazy; None when no row samples this step
    num_passes: int
    # (rows, hidden) the final hidden states the logits were projected from (a draft head's
    # input), lazy; None when no row samples or the model's head could not be split off.
    hiddens: mx.array | None = None
    # request id -> (num_tokens, hidden) every final hidden state of its chunk, for the
    # requests `execute` was asked to capture (a draft head reads the prompt's too).
    captured: Mapping[str, mx.array] = field(default_factory=dict)


def plan_passes(
    items: Sequence[ScheduledItem], pass_cost_tokens: int
) -> list[tuple[ScheduledItem, ...]]:
    """Group items into forward passes, shortest first (see the module docstring)."""
    passes: list[list[ScheduledItem]] = []
    longest = 0  # num_tokens of the last pass's longest item
    for item in sorted(items, key=lambda it: it.num_tokens):
        if passes:
            num_rows = len(passes[-1])
            # Padding the pass's rows up to this item vs paying for another pass.
            if num_rows * (item.num_tokens - longest) <= pass_cost_tokens:
                passes[-1].append(item)
                longest = item.num_tokens
                continue
        passes.append([item])
        longest = item.num_tokens
    return [tuple(group) for group in passes]


def check_supported(model: nn.Module) -> None:
    """Raise UnsupportedModelError unless every layer caches plain keys and values."""
    make_cache = getattr(model, "make_cache", None)
    if make_cache is None:
        return  # mlx-lm gives such models a KVCache per layer
    kinds = sorted({type(c).__name__ for c in make_cache() if type(c) is not KVCache})
    if kinds:
        raise UnsupportedModelError(
            f"{type(model).__module__} needs {', '.join(kinds)} caches; "
            "the runner supports full-attention models (KVCache) only"
        )


def split_head(model: nn.Module) -> tuple[Callable[..., mx.array], Callable[[mx.array], mx.array]]:
    """(body, head) with model(x) == head(body(x)), checked on a probe; else (model, identity)."""
    body = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    if head is None and body is not None:
        head = getattr(getattr(body, "embed_tokens", None), "as_linear", None)
    if body is None or head is None:
        return model, _identity
    probe = mx.array([[1, 2, 3]])
    try:
        expected, got = model(probe), head(body(probe))
        same = expected.shape == got.shape and mx.allclose(expected, got, atol=1e-4).item()
    except (TypeError, ValueError, AttributeError):
        same = False
    # A model that post-processes logits (soft-capping, scaling) keeps its own full forward.
    return (body, head) if same else (model, _identity)


def _identity(x: mx.array) -> mx.array:
    return x


class ModelRunner:
    """Runs scheduled steps of one model over its slot KV cache."""

    def __init__(self, model: nn.Module, config: RunnerConfig | None = None) -> None:
        check_supported(model)
        self.model = model
        self.config = config or RunnerConfig()
        self.cache = SlotKVCache(len(model.layers), self.config.num_slots)
        self._body, self._head = split_head(model)
        self.has_hiddens = self._head is not _identity  # RunOutput.hiddens are body outputs

    @property
    def head(self) -> Callable[[mx.array], mx.array]:
        """Final hidden states -> logits (the vocabulary projection)."""
        return self._head

    def release(self, request_id: str) -> None:
        """Forget the request's KV (finished, cancelled, preempted)."""
        self.cache.release(request_id)

    def restore(
        self,
        request_id: str,
        keys: Sequence[mx.array],
        values: Sequence[mx.array],
        num_tokens: int,
    ) -> None:
        """Give the request a slot holding a cached prefix, from blocks in token order, each
        (layers, kv_heads, n_i, head_dim); num_tokens: its known tokens (the prompt), for room."""
        slot = self.cache.allocate(request_id)
        assert slot is not None, "more running requests than KV slots"
        self.cache.expect(num_tokens)
        self.cache.load_blocks(request_id, keys, values)

    def _slot(self, request_id: str) -> int:
        slot = self.cache.slot_of(request_id)
        assert slot is not None, f"{request_id} has no KV slot"
        return slot

    def execute(
        self,
        step: ScheduledStep,
        token_ids: Mapping[str, Sequence[int]],
        pending: Mapping[str, mx.array] | None = None,
        capture: frozenset[str] = frozenset(),
    ) -> RunOutput:
        """Build the step's forward passes lazily; the caller evaluates them.

        token_ids[request] holds the request's known tokens; pending[request], when present, its
        next tokens still being computed (lazy): the token the step in flight samples, so a step
        can be built before the previous one has finished, or a verify chunk's drafts. The
        requests in `capture` get every hidden state of their chunk in RunOutput.captured.
        """
        pending = pending or {}
        captured: dict[str, mx.array] = {}
        for request_id in step.preempted_ids:
            self.cache.release(request_id)
        for item in step.items:
            if self.cache.slot_of(item.request_id) is None:
                slot = self.cache.allocate(item.request_id)
                assert slot is not None, "more running requests than KV slots"
                self.cache.expect(len(token_ids[item.request_id]))  # grow once for the prompt
            cached = self.cache.length(item.request_id)
            assert cached == item.start_position, (
                f"{item.request_id}: scheduled from {item.start_position}, KV holds {cached}"
            )

        passes = plan_passes(step.items, self.config.pass_cost_tokens)
        request_ids: list[str] = []
        positions: list[int] = []
        selected: list[mx.array] = []  # hidden states of the rows that sample
        for group in passes:
            # 1. One right-padded (rows, L) batch; each row writes KV at its slot's offset.
            num_tokens = max(item.num_tokens for item in group)
            rows = PassRows(
                slots=tuple(self._slot(item.request_id) for item in group),
                offsets=tuple(item.start_position for item in group),
                num_tokens=num_tokens,
            )
            inputs = _inputs(group, token_ids, pending, num_tokens)
            hidden = self._body(inputs, cache=self.cache.views(rows))  # (rows, L, dim)
            self.cache.commit(rows, [item.num_tokens for item in group])
            for row, item in enumerate(group):
                if item.request_id in capture:
                    captured[item.request_id] = hidden[row, : item.num_tokens]

            # 2. Keep the positions whose next token gets sampled (1 + lookahead per item).
            flat_rows: list[int] = []
            for row, item in enumerate(group):
                if not item.produces_token:
                    continue
                first = item.num_tokens - 1 - item.num_lookahead_tokens
                for j in range(first, item.num_tokens):
                    flat_rows.append(row * num_tokens + j)
                    request_ids.append(item.request_id)
                    positions.append(item.start_position + j + 1)
            if not flat_rows:
                continue
            if num_tokens == 1 and len(flat_rows) == len(group):
                selected.append(hidden[:, 0])  # the all-decode pass: no gather
            else:
                flat = hidden.reshape(len(group) * num_tokens, *hidden.shape[2:])
                selected.append(flat[mx.array(flat_rows)])

        # 3. The vocabulary projection, once, for the sampling rows only.
        logits = hiddens = None
        if selected:
            hiddens = selected[0] if len(selected) == 1 else mx.concatenate(selected)
            logits = self._head(hiddens)
        return RunOutput(
            tuple(request_ids),
            tuple(positions),
            logits,
            len(passes),
            hiddens=hiddens if self.has_hiddens else None,
            captured=captured,
        )


def _inputs(
    group: Sequence[ScheduledItem],
    token_ids: Mapping[str, Sequence[int]],
    pending: Mapping[str, mx.array],
    length: int,
) -> mx.array:
    """(rows, length) int32 token ids, right-padded; pending tokens are patched in lazily."""
    rows: list[list[int]] = []
    pending_rows: list[int] = []
    pending_cols: list[int] = []
    pending_tokens: list[mx.array] = []
    for row, item in enumerate(group):
        known = token_ids[item.request_id]
        end = item.start_position + item.num_tokens
        tokens = list(known[item.start_position : end])
        missing = item.num_tokens - len(tokens)
        if missing:
            # Only the newest tokens can still be pending: sampled by the step in flight, or
            # drafts a verify chunk takes from the device.
            lazy = pending.get(item.request_id)
            assert lazy is not None and end == len(known) + missing <= len(known) + lazy.size, (
                f"{item.request_id}: token ids end before the chunk"
            )
            pending_rows += [row] * missing
            pending_cols += range(len(tokens), item.num_tokens)
            pending_tokens.append(lazy.reshape(-1)[:missing])
            tokens += [PAD_TOKEN_ID] * missing
        rows.append(tokens + [PAD_TOKEN_ID] * (length - item.num_tokens))
    if not pending_rows:
        return mx.array(rows, dtype=mx.int32)
    values = pending_tokens[0] if len(pending_tokens) == 1 else mx.concatenate(pending_tokens)
    values = values.astype(mx.int32)
    if length == 1 and len(pending_rows) == len(group):
        return values[:, None]  # the all-decode pass: the sampled tokens are the inputs
    inputs = mx.array(rows, dtype=mx.int32)
    inputs[mx.array(pending_rows), mx.array(pending_cols)] = values
    return inputs
