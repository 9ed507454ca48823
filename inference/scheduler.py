"""Continuous-batching scheduler: which requests run in the next step, and how many tokens each.

It speaks only in request ids and token counts, in the manner of vLLM v1's scheduler: there is no
prefill phase or decode phase, only the tokens each request still needs in the KV cache,

    num_needed = num_prompt_tokens + num_output_tokens + num_lookahead_tokens - num_computed_tokens

One step packs, within `max_num_batched_tokens`:

    pass 1  every running request, oldest first: min(num_needed, 1 + num_lookahead_tokens)
            (a decode never starves; KV pressure here preempts the newest running request)
    pass 2  running requests still catching up, oldest first: the rest of their need, as one
            chunk (chunked prefill: a long prompt takes only the budget the decodes left)
    pass 3  waiting requests, FIFO: admitted while seats, budget and KV capacity last
            (back-pressure: the head of the queue waits; nobody overtakes it)

Prompt tokens found in a prefix cache (`num_cached_tokens`) start out computed: they take KV
capacity but none of a step's token budget. A preempted request loses its KV cache and goes back
to the head of the queue; when admitted again it recomputes its prompt and output so far, less
what the prefix cache still holds (`set_num_cached_tokens`). The engine must make sure one
request of the model's maximum length fits the KV capacity alone (vLLM checks this at start-up);
then a lone request always makes progress.

Ignores: token ids, arrays and mlx, sampling, stop conditions (the engine calls `finish`), and what
the KV cache holds: a `KVCapacity` only answers "does this many tokens fit".
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one step: sequences in flight and tokens through the model."""

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        # Otherwise a full batch of decodes could not run in one step.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs})"
            )


class KVCapacity(Protocol):
    """The scheduler's only view of KV memory; a block-structured prefix cache implements it too."""

    def reserve(self, request_id: str, num_tokens: int) -> bool:
        """Resize the request's reservation to hold num_tokens in all (growing or shrinking).

        Returns False, changing nothing, when the growth does not fit.
        """
        ...

    def free(self, request_id: str) -> None:
        """Release everything the request holds (a no-op for an unknown id)."""
        ...


class CountingKVCapacity:
    """A KVCapacity that only counts blocks of block_size tokens (block_size=1 counts tokens)."""

    def __init__(self, num_blocks: int, block_size: int = 1) -> None:
        if num_blocks < 0 or block_size < 1:
            raise ValueError(
                f"want num_blocks >= 0 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_free_blocks = num_blocks
        self._num_blocks_by_request: dict[str, int] = {}

    def reserve(self, request_id: str, num_tokens: int) -> bool:
        num_wanted = -(-num_tokens // self.block_size)  # ceil division
        num_held = self._num_blocks_by_request.get(request_id, 0)
        if num_wanted - num_held > self.num_free_blocks:
            return False
        self.num_free_blocks -= num_wanted - num_held
        self._num_blocks_by_request[request_id] = num_wanted
        return True

    def free(self, request_id: str) -> None:
        self.num_free_blocks += self._num_blocks_by_request.pop(request_id, 0)

    def num_blocks_of(self, request_id: str) -> int:
        return self._num_blocks_by_request.get(request_id, 0)


@dataclass(frozen=True)
class ScheduledItem:
    """One request's chunk in a step: tokens [start_position, start_position + num_tokens)."""

    request_id: str
    start_position: int  # tokens of this request already in the KV cache
    num_tokens: int
    num_lookahead_tokens: int  # trailing speculative tokens of the chunk, to be verified
    produces_token: bool  # the chunk reaches the request's last known token: sample after it


@dataclass(frozen=True)
class ScheduledStep:
    """What the runner computes next; preempted requests have lost their KV cache."""

    items: tuple[ScheduledItem, ...]
    preempted_ids: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.items)

    @property
    def request_ids(self) -> tuple[str, ...]:
        return tuple(item.request_id for item in self.items)


@dataclass(eq=False)  # identity, not field, equality: requests are looked up in lists
class _Request:
    request_id: str
    num_prompt_tokens: int
    num_computed_tokens: int = 0
    num_output_tokens: int = 0
    num_lookahead_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def num_needed(self) -> int:
        return self.num_tokens + self.num_lookahead_tokens - self.num_computed_tokens


class Scheduler:
    """FIFO continuous batching with chunked prefill and preemption; see the module docstring."""

    def __init__(self, config: SchedulerConfig, kv: KVCapacity) -> None:
        self.config = config
        self.kv = kv
        self._requests: dict[str, _Request] = {}
        self._running: list[_Request] = []  # admission order: oldest first
        self._waiting: deque[_Request] = deque()

    # -- requests in and out ---------------------------------------------------------------

    def add_request(
        self, request_id: str, num_prompt_tokens: int, *, num_cached_tokens: int = 0
    ) -> None:
        """Queue a request; num_cached_tokens of its prompt are already in the KV cache."""
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already scheduled")
        if num_prompt_tokens < 1:
            raise ValueError(f"num_prompt_tokens must be >= 1, got {num_prompt_tokens}")
        if num_cached_tokens < 0:
            raise ValueError(f"num_cached_tokens must be >= 0, got {num_cached_tokens}")
        # The last prompt token must run through the model to give the first token's logits.
        num_computed = min(num_cached_tokens, num_prompt_tokens - 1)
        request = _Request(request_id, num_prompt_tokens, num_computed_tokens=num_computed)
        self._requests[request_id] = request
        self._waiting.append(request)

    def set_num_cached_tokens(self, request_id: str, num_cached_tokens: int) -> None:
        """A waiting request that holds no KV (new or preempted) finds a prefix cached again."""
        request = self._requests[request_id]
        assert request in self._waiting and request.num_computed_tokens == 0, (
            f"{request_id}: only a waiting request without KV can take a cached prefix"
        )
        if num_cached_tokens < 0:
            raise ValueError(f"num_cached_tokens must be >= 0, got {num_cached_tokens}")
        # As in add_request: the last token must run to give the next token's logits.
        request.num_computed_tokens = min(num_cached_tokens, request.num_tokens - 1)

    def set_lookahead(self, request_id: str, num_lookahead_tokens: int) -> None:
        """Ask for num_lookahead_tokens drafted tokens to be verified in the request's next chunk."""
        if num_lookahead_tokens < 0:
            raise ValueError(f"num_lookahead_tokens must be >= 0, got {num_lookahead_tokens}")
        self._requests[request_id].num_lookahead_tokens = num_lookahead_tokens

    def record_output(
        self, request_id: str, num_new_tokens: int, *, num_rejected_tokens: int = 0
    ) -> None:
        """After a step: the request sampled num_new_tokens; num_rejected_tokens drafts roll back."""
        request = self._requests[request_id]
        if num_new_tokens < 0 or num_rejected_tokens < 0:
            raise ValueError(
                f"counts must be >= 0, got {num_new_tokens} new, {num_rejected_tokens} rejected"
            )
        assert num_rejected_tokens <= request.num_computed_tokens - request.num_tokens
        request.num_output_tokens += num_new_tokens
        request.num_computed_tokens -= num_rejected_tokens
        request.num_lookahead_tokens = 0  # drafts are proposed afresh for every step
        assert request.num_computed_tokens <= request.num_tokens, "unverified drafts left in KV"
        if num_rejected_tokens:
            shrunk = self.kv.reserve(request_id, request.num_computed_tokens)
            assert shrunk, "shrinking a KV reservation cannot fail"

    def finish(self, request_id: str) -> None:
        """The request is done (stop, length): drop it and free its KV cache."""
        request = self._requests.pop(request_id)
        if request in self._running:
            self._running.remove(request)
        else:
            self._waiting.remove(request)
        self.kv.free(request_id)

    def abort(self, request_id: str) -> bool:
        """Drop the request wherever it is (client gone); False when it was not known."""
        if request_id not in self._requests:
            return False
        self.finish(request_id)
        return True

    @property
    def running_ids(self) -> tuple[str, ...]:
        return tuple(r.request_id for r in self._running)

    @property
    def waiting_ids(self) -> tuple[str, ...]:
        return tuple(r.request_id for r in self._waiting)

    def num_computed_tokens(self, request_id: str) -> int:
        return self._requests[request_id].num_computed_tokens

    def num_tokens(self, request_id: str) -> int:
        """The request's prompt and output tokens so far (the one being sampled included)."""
        return self._requests[request_id].num_tokens

    # -- one step --------------------------------------------------------------------------

    def schedule(self) -> ScheduledStep:
        """Pick the next step's chunks and count them as computed (the runner must run them)."""
        budget = self.config.max_num_batched_tokens
        granted: dict[str, int] = {}  # request id -> tokens this step, in running order
        preempted_ids: list[str] = []

        # 1. Decode shares, oldest first; when KV is short, the newest running request yields.
        index = 0
        while index < len(self._running) and budget > 0:
            request = self._running[index]
            share = min(request.num_needed, 1 + request.num_lookahead_tokens, budget)
            if share == 0 or self.kv.reserve(
                request.request_id, request.num_computed_tokens + share
            ):
                if share:
                    granted[request.request_id] = share
                    budget -= share
                index += 1
                continue
            victim = self._running.pop()  # may be `request` itself, which ends the loop
            self._preempt(victim)
            preempted_ids.append(victim.request_id)

        # 2. Catch-up chunks, oldest first; a chunk shrinks to what KV holds, never preempts.
        for request in self._running:
            if budget == 0:
                break
            num_granted = granted.get(request.request_id, 0)
            extra = min(request.num_needed - num_granted, budget)
            while extra > 0 and not self.kv.reserve(
                request.request_id, request.num_computed_tokens + num_granted + extra
            ):
                extra //= 2
            if extra > 0:
                granted[request.request_id] = num_granted + extra
                budget -= extra

        # 3. Admissions in FIFO order, unless this step had to preempt (that would thrash).
        while (
            not preempted_ids
            and self._waiting
            and budget > 0
            and len(self._running) < self.config.max_num_seqs
        ):
            request = self._waiting[0]
            chunk = min(request.num_needed, budget)
            if not self.kv.reserve(request.request_id, request.num_computed_tokens + chunk):
                break  # back-pressure: the head of the queue waits for KV room
            self._running.append(self._waiting.popleft())
            granted[request.request_id] = chunk
            budget -= chunk

        # 4. Commit: the chunks count as computed from now on.
        items = []
        for request in self._running:
            num_tokens = granted.get(request.request_id, 0)
            if num_tokens == 0:
                continue
            start = request.num_computed_tokens
            end = start + num_tokens
            items.append(
                ScheduledItem(
                    request_id=request.request_id,
                    start_position=start,
                    num_tokens=num_tokens,
                    num_lookahead_tokens=max(0, end - request.num_tokens),
                    produces_token=end >= request.num_tokens,
                )
            )
            request.num_computed_tokens = end
        return ScheduledStep(items=tuple(items), preempted_ids=tuple(preempted_ids))

    def _preempt(self, request: _Request) -> None:
        """Drop the request's KV cache and put it back at the head of the queue."""
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_lookahead_tokens = 0
        self._waiting.appendleft(request)
