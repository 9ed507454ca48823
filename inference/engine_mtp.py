"""The engine's MTP lane: draft-verify cycles for a request running alone, inside the batch loop.

When at most `mtp_max_requests` requests are in the engine (a lone user), each of them that
allows it (see `allows`) drafts D tokens with the model's MTP head before
a step; the scheduler gives it a chunk of 1 + D tokens ([x_n, d_1..d_D], `set_lookahead`), the
runner returns the logits and final hiddens of those D + 1 positions, and `verify` applies the
Leviathan-Chen rule (speculative.py) to commit k + 1 tokens. Rejected drafts roll back: the slot
is trimmed, the scheduler un-counts them, the head's cache drops its recursive entries. A step
with D = 0 is a plain step that still feeds the head. On a GPU the drafts are drawn on the
device and enter the verify chunk as lazy inputs (the runner's `pending`), so a cycle waits once,
for its verdict; on a CPU the host draws them (`draws_on_device`).

Pairs the head reads, (h_i, x_{i+1}), come from the trunk as it runs: every hidden of a lone
request's prefill chunks and decode steps (RunOutput.captured / .hiddens) waits in `pending`
until the next draft. When more requests arrive the lane closes: the request decodes one token per
step in the batch and its head state goes stale; when it is alone again, one plain step gives the
head a fresh pair and drafting resumes (the head's earlier context is lost, which costs
acceptance, never exactness). A prefix-cache hit skips the prefill whose hiddens the head
reads: the head's KV over prompts it read is kept (`head_prefix_store.py`) and a request whose
prompt starts the same way gets it back at its first draft. Switching lanes keeps the output distribution: every committed
token, in either lane, is an exact sample of the model given the tokens before it.

`DepthPolicy` picks D per step: a fixed depth as configured (`rag tune` measures which), or
adaptively from measured acceptance and measured step costs (the expected tokens per second of
D = 0..max), so speculation that does not pay falls back to plain decoding, probing now and then.
Costs are periods, completion to completion, so they compare what the request would really get:
a cycle waits for its verdict before the next draft, while plain steps run ahead of their tokens
(pipelined, as in the batch). `plain_ahead` lets the engine pipeline the steps it will not draft.

Ignores: scheduling, stop conditions and delivery (engine.py), and how heads are made (mtp_head.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from inference.backend import SpeculationStats
from inference.engine_requests import RequestState
from inference.head_prefix_store import HeadPrefixStore
from inference.mtp_decode import MAX_DEPTH, AcceptFn, Trunk, draft_distribution, draft_probs
from inference.mtp_head import MTPHead
from inference.sampling import compute_probs, sample
from inference.speculative import (
    Purpose,
    Verdict,
    accept_drafts,
    draw,
    keyed_uniform,
    make_cycle_uniforms,
)

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# Pairs waiting for the head; past this the head restarts from the newest. A whole RAG prompt
# must fit: answers copy from the context, which a head that read it drafts well (greedy D1
# acceptance on six ~600-token RAG prompts 0.46 with a 512 limit, 0.53 with the whole prompt).
MAX_PENDING = 8192
# Plain steps between probes of depth 1 while speculation does not pay: FIRST_PROBE after it
# last paid or a draft last stood, doubling up to PROBE_EVERY while probes fail (early
# estimates rest on few cycles; an unlucky start must not keep the lane plain for long).
FIRST_PROBE = 4
PROBE_EVERY = 32
YARDSTICK_STEPS = 4  # pipelined plain steps timed before the first draft: the cost to beat
_DECAY = 0.97  # per observation: acceptance and costs follow the recent text and load
_PRIOR = (1.0, 2.0)  # pseudo-counts (accepted, reached): an untried depth looks 50% likely


class DepthPolicy:
    """Chooses the draft depth: argmax over D of expected tokens per cycle / measured cost."""

    def __init__(self, max_depth: int, *, fixed_depth: int | None = None) -> None:
        if not 1 <= max_depth <= MAX_DEPTH:
            raise ValueError(f"max_depth must be in 1..{MAX_DEPTH}, got {max_depth}")
        if fixed_depth is not None and not 1 <= fixed_depth <= max_depth:
            raise ValueError(f"fixed depth must be in 1..{max_depth}, got {fixed_depth}")
        self.max_depth = max_depth
        self.fixed_depth = fixed_depth
        self._accepted = [_PRIOR[0]] * max_depth  # draft j stood ...
        self._reached = [_PRIOR[1]] * max_depth  # ... of cycles that verified draft j
        self._step_s: dict[int, float] = {}  # tokens in a lone step -> its period, s (EMA)
        self._step_n: dict[int, int] = {}  # observations per width
        self._head_s: float | None = None  # one head step (EMA)
        self._head_n = 0
        self._plain_streak = 0
        self._probe_interval = FIRST_PROBE
        self._plain_timed = 0  # plain periods observed

    def observe_cycle(self, depth: int, num_accepted: int) -> None:
        for j in range(self.max_depth):
            self._accepted[j] *= _DECAY
            self._reached[j] *= _DECAY
        for j in range(min(depth, num_accepted + 1)):
            self._reached[j] += 1
            self._accepted[j] += j < num_accepted
        if num_accepted:  # a draft stood: the estimate may be stale, look again soon
            self._probe_interval = FIRST_PROBE

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """A lone step's period: completion of the step before to its own, drafting included."""
        count = self._step_n[num_tokens] = self._step_n.get(num_tokens, 0) + 1
        if count == 1:
            return  # the first at a width pays one-off costs: lazy loads, kernel compiles
        self._step_s[num_tokens] = _ema(self._step_s.get(num_tokens), seconds, count - 1)
        self._plain_timed += num_tokens == 1

    def observe_head(self, num_steps: int, seconds: float) -> None:
        if num_steps:
            self._head_n += 1
            if self._head_n > 1:  # the first call pays one-off costs, as above
                self._head_s = _ema(self._head_s, seconds / num_steps, self._head_n - 1)

    def acceptance(self) -> list[float]:
        """Estimated P(draft j stands | draft j - 1 stood), j = 1..max_depth."""
        return [a / r for a, r in zip(self._accepted, self._reached, strict=True)]

    def expected_rate(self, depth: int) -> float | None:
        """Expected tokens per second at this depth; None until a plain step was timed."""
        plain = self._step_s.get(1)
        if plain is None:
            return None
        tokens, reach = 1.0, 1.0
        for rate in self.acceptance()[:depth]:
            reach *= rate
            tokens += reach
        period = self._step_s.get(depth + 1)
        if period is None:  # untimed: assumed cheap, so it gets tried and timed
            head = (self._head_s if self._head_s is not None else 0.05 * plain) * depth
            period = plain * (1 + 0.05 * depth) + head
        return tokens / period

    def plain_ahead(self) -> bool:
        """The next step will not draft, so it may be launched before this one's tokens are
        known (pipelined): while the yardstick is timed, and while plain decoding wins between
        probes. A True counts toward the next probe."""
        if self.fixed_depth is not None:
            return False
        if self._plain_timed < YARDSTICK_STEPS:
            return True
        if self._best_depth(self.max_depth) or self._plain_streak + 1 >= self._probe_interval:
            return False
        self._plain_streak += 1
        return True

    def choose(self, room: int) -> int:
        """The depth of the next step (0: plain); room = tokens the request may still produce.
        A fixed depth is used as it is (`rag tune` measured it); else the best measured one."""
        limit = min(self.fixed_depth or self.max_depth, room - 1)
        if limit < 1:
            return 0
        if self.fixed_depth is not None:
            return limit
        if self._step_s.get(1) is None:
            return 0  # time a plain step first: it is the yardstick
        best = self._best_depth(limit)
        if best == 0:
            self._plain_streak += 1
            if self._plain_streak >= self._probe_interval:  # conditions change: look again
                self._plain_streak = 0
                self._probe_interval = min(2 * self._probe_interval, PROBE_EVERY)
                return 1
        else:
            self._plain_streak = 0
            self._probe_interval = FIRST_PROBE
        return best

    def _best_depth(self, limit: int) -> int:
        best, best_rate = 0, self.expected_rate(0) or 0.0
        for depth in range(1, limit + 1):
            rate = self.expected_rate(depth) or 0.0
            if rate > best_rate:
                best, best_rate = depth, rate
        return best


def _ema(old: float | None, new: float, count: int) -> float:
    """A running mean over the first observations (the first one, often a warm-up, does not
    linger), then an exponential average that follows the recent ones."""
    if old is None:
        return new
    weight = max(1 - _DECAY, 1 / count)
    return old + weight * (new - old)


@dataclass
class _Drafting:
    """One request's head state and counters."""

    head_cache: list
    pending: mx.array | None = None  # (1, m, H) trunk hiddens h_i, i = start .. start + m - 1
    pending_start: int = 0
    stale: bool = False  # the head missed pairs (the request ran in the batch)
    prompt_stored: bool = False  # the head's context over its prompt went to the store
    # Hiddens h_0 .. of positions the head read from the store, not from pending (a hit).
    stored_hiddens: mx.array | None = None
    # This step's drafts; drawn on the device they stay lazy and feed the verify pass before
    # the host sees them (one wait per cycle, at the verdict).
    draft_tokens: mx.array | None = None  # (D,) int32
    draft_probs: mx.array | np.ndarray | None = None  # (D, columns) their fp32 distributions
    draft_columns: np.ndarray | None = None  # token ids of those columns; None: all of V
    mtp_tokens: int = 0
    batch_tokens: int = 0
    max_depth: int = 0
    num_cycles: int = 0
    num_drafted: int = 0
    accepted_by_depth: list[int] = field(default_factory=lambda: [0] * MAX_DEPTH)

    @property
    def pending_end(self) -> int:
        return self.pending_start + (0 if self.pending is None else self.pending.shape[1])

    @property
    def num_drafts(self) -> int:
        return 0 if self.draft_tokens is None else self.draft_tokens.shape[0]

    def clear_drafts(self) -> None:
        self.draft_tokens = self.draft_probs = self.draft_columns = None


@dataclass(frozen=True)
class LaneTotals:
    """An engine's lane since it started, for metrics (a snapshot; any thread may read it)."""

    mtp_tokens: int = 0  # committed by draft-verify cycles
    batch_tokens: int = 0  # decoded one per step, in the batch or plain in the lane
    num_cycles: int = 0
    num_drafted: int = 0
    accepted_by_depth: tuple[int, ...] = (0,) * MAX_DEPTH  # cycles whose draft j + 1 stood


@dataclass(frozen=True)
class CycleOutcome:
    """What one verified step committed for a request."""

    token_ids: tuple[int, ...]
    num_drafted: int
    num_rejected: int


class MTPLane:
    """Drafting state of the engine's requests and the lane's depth policy."""

    def __init__(
        self,
        model: nn.Module,
        head: MTPHead,
        *,
        max_requests: int = 1,
        fixed_depth: int | None = None,
        max_depth: int = MAX_DEPTH,
    ) -> None:
        if head.config.hidden_source != "post_norm":
            raise ValueError(
                "the engine's lane reads the trunk's final (post-norm) hiddens; "
                f"this head wants {head.config.hidden_source}"
            )
        self.trunk = Trunk(model)
        self._catch_up_s = 0.0  # head time on plain steps' pairs, not yet taken
        # Built on the caller's thread: lazy weights would be evaluated on the engine's, where
        # the caller's stream does not exist.
        mx.eval(head.parameters())
        self.head = head
        self.max_requests = max_requests
        self.policy = DepthPolicy(max_depth, fixed_depth=fixed_depth)
        self.accept: AcceptFn = accept_drafts  # the rule; tests swap in broken ones
        # Where drafts are drawn: on a GPU the host must not wait per head step; on a CPU the
        # host's draw is cheaper (measured: `_draw_on_host`). Tests set it either way.
        self.draws_on_device = mx.default_device().type == mx.DeviceType.gpu
        self.head_prefixes = HeadPrefixStore()
        self._drafting: dict[str, _Drafting] = {}
        self._totals = _Drafting([])  # the engine's counters, kept like a request's

    def totals(self) -> LaneTotals:
        t = self._totals
        return LaneTotals(
            t.mtp_tokens, t.batch_tokens, t.num_cycles, t.num_drafted, tuple(t.accepted_by_depth)
        )

    # -- which requests speculate ------------------------------------------------------------

    @staticmethod
    def allows(state: RequestState) -> bool:
        """Speculation may serve it. A seeded sampled request in "auto" mode keeps plain decoding:
        its seed promises one output whatever the load, and the lane draws another (equally
        distributed) sample; greedy output is the same in both lanes."""
        request = state.request
        sampling = request.sampling
        if sampling.logprobs or request.generation_mode == "ar":
            return False
        if request.generation_mode == "mtp":
            return True
        return sampling.temperature == 0 or sampling.seed is None

    def is_open(self, num_requests: int) -> bool:
        """The lane runs while the engine holds this few requests (load is low)."""
        return num_requests <= self.max_requests

    def _of(self, request_id: str) -> _Drafting:
        drafting = self._drafting.get(request_id)
        if drafting is None:
            drafting = self._drafting[request_id] = _Drafting(self.head.make_cache())
        return drafting

    # -- the head's input --------------------------------------------------------------------

    def add_hiddens(self, request_id: str, hiddens: mx.array, start: int) -> None:
        """Trunk hiddens (m, H) of positions start .. start + m - 1, computed in the lane."""
        drafting = self._of(request_id)
        hiddens = hiddens.reshape(1, -1, hiddens.shape[-1])
        if drafting.pending is not None and drafting.pending_end == start:
            drafting.pending = mx.concatenate([drafting.pending, hiddens], axis=1)
        else:  # a gap (prefix-cache hit, preemption, the batch): the head starts afresh
            if drafting.pending is not None or drafting.num_cycles or drafting.mtp_tokens:
                drafting.stale = True
            drafting.pending, drafting.pending_start = hiddens, start
        if drafting.pending.shape[1] > MAX_PENDING:
            drafting.pending = drafting.pending[:, -1:]
            drafting.pending_start = drafting.pending_end - 1
            drafting.stale = True

    def left_lane(self, request_id: str, num_tokens: int) -> None:
        """The request decoded a token in the batch: the head missed it."""
        self.count_plain(request_id, num_tokens)
        drafting = self._drafting[request_id]
        drafting.pending, drafting.stale = None, True

    def count_plain(self, request_id: str, num_tokens: int) -> None:
        self._of(request_id).batch_tokens += num_tokens
        self._totals.batch_tokens += num_tokens

    def can_draft(self, state: RequestState) -> bool:
        """The head holds a pair ending at the newest token: (h_{n-1}, x_n)."""
        drafting = self._drafting.get(state.request_id)
        n = len(state.token_ids) - 1
        return drafting is not None and drafting.pending is not None and drafting.pending_end == n

    # -- one cycle -----------------------------------------------------------------------------

    def draft(self, state: RequestState, depth: int) -> mx.array:
        """D drafts after x_n, lazy (D,) token ids: the head reads the pending pairs, then its
        own output."""
        started = time.perf_counter()
        drafting = self._drafting[state.request_id]
        assert drafting.pending is not None
        if drafting.stale:
            drafting.head_cache = self.head.make_cache()
            drafting.stale = False
        n = len(state.token_ids) - 1
        if drafting.head_cache[0].offset == 0 and drafting.pending_start > 0:
            self._restore_prompt_context(state, drafting)
        pair_tokens = state.token_ids[drafting.pending_start + 1 : n + 1]
        read = drafting.pending
        hidden = self.head(self.trunk.embed(pair_tokens), read, drafting.head_cache)
        hidden = hidden[:, -1:]
        if not drafting.prompt_stored and drafting.head_cache[0].offset == n:
            # The head has read every pair from position 0: its context over the prompt is
            # what a later request with the same start needs after a prefix-cache hit.
            if drafting.stored_hiddens is not None:
                read = mx.concatenate([drafting.stored_hiddens, read], axis=1)
            self.head_prefixes.store(state.request.prompt_ids, drafting.head_cache, read)
            drafting.prompt_stored, drafting.stored_hiddens = True, None
        caught_up_s = 0.0
        if len(pair_tokens) > MAX_DEPTH + 1:
            # Pairs left by plain steps, not by the last cycle: reading them is the price of
            # the plain steps, so it is timed apart and kept out of this cycle's cost (else
            # a probe after a plain streak looks dear, and the lane stays plain ever longer).
            mx.eval(hidden)
            caught_up_s = time.perf_counter() - started
            self._catch_up_s += caught_up_s
        drafting.pending = None
        drafting.pending_start = n
        if self.draws_on_device:
            self._draw_on_device(state, drafting, hidden, depth)
        else:
            self._draw_on_host(state, drafting, hidden, depth)
        self.policy.observe_head(depth, time.perf_counter() - started - caught_up_s)
        assert drafting.draft_tokens is not None
        return drafting.draft_tokens

    def _draw_on_device(
        self, state: RequestState, drafting: _Drafting, hidden: mx.array, depth: int
    ) -> None:
        """Each draft drawn where q is made (the same inverse-CDF draw as plain decoding, on
        the DRAFT stream): the host never waits between head steps, and the verify pass takes
        the drafts as lazy inputs, so a cycle waits once, for its verdict."""
        n = len(state.token_ids) - 1
        prompt = state.request.prompt_ids
        history = state.output_ids
        tokens: list[mx.array] = []
        rows: list[mx.array] = []
        on_draft_vocab = False
        for j in range(depth):
            if j:
                hidden = self.head(self.trunk.embed(tokens[-1]), hidden, drafting.head_cache)
                if state.sampling.has_penalties:  # they read the drafts so far: a wait
                    history = state.output_ids + [int(t.item()) for t in tokens]
            q, on_draft_vocab = draft_probs(
                self.trunk, self.head, hidden, state.sampling, prompt, history
            )
            index = sample(q, [state.seed], [n + 1 + j], stream=Purpose.DRAFT)
            draft_ids = self.head.draft_ids
            tokens.append(draft_ids[index] if on_draft_vocab and draft_ids is not None else index)
            rows.append(q)
        drafting.draft_tokens = mx.concatenate(tokens).astype(mx.int32)
        drafting.draft_probs = mx.concatenate(rows)
        drafting.draft_columns = self.head.draft_ids_host if on_draft_vocab else None
        mx.async_eval(drafting.draft_tokens, drafting.draft_probs)

    def _draw_on_host(
        self, state: RequestState, drafting: _Drafting, hidden: mx.array, depth: int
    ) -> None:
        """Each draft drawn by the host from q (a wait per head step): on a CPU device, where
        host and device are the same cores, this is the faster way (~5% per cycle)."""
        n = len(state.token_ids) - 1
        prompt = state.request.prompt_ids
        draft_ids: list[int] = []
        rows: list[np.ndarray] = []
        for j in range(depth):
            if j:
                embedded = self.trunk.embed(draft_ids[-1:])
                hidden = self.head(embedded, hidden, drafting.head_cache)
            q = draft_distribution(
                self.trunk, self.head, hidden, state.sampling, prompt, state.output_ids + draft_ids
            )
            draft_ids.append(draw(q, keyed_uniform(state.seed, n + 1 + j, Purpose.DRAFT)))
            rows.append(q)
        drafting.draft_tokens = mx.array(draft_ids, dtype=mx.int32)
        drafting.draft_probs = np.stack(rows)
        drafting.draft_columns = None

    def _restore_prompt_context(self, state: RequestState, drafting: _Drafting) -> None:
        """No head context before the pending pairs (a prefix-cache hit): a stored prompt's
        KV up to the hit, and the hit's last hidden, whose pair the head then reads."""
        start = drafting.pending_start
        restored = self.head_prefixes.restore(state.token_ids, start, drafting.head_cache)
        if restored is None or drafting.pending is None:
            return
        drafting.pending = mx.concatenate([restored[:, -1:], drafting.pending], axis=1)
        drafting.pending_start = start - 1
        drafting.stored_hiddens = restored[:, :-1]

    def take_catch_up_s(self) -> float:
        """Seconds the head spent on plain steps' pairs since the last call (see `draft`)."""
        seconds, self._catch_up_s = self._catch_up_s, 0.0
        return seconds

    def pending_drafts(self, request_id: str) -> mx.array:
        """The request's drafts for its verify chunk, lazy (D,) token ids."""
        drafts = self._drafting[request_id].draft_tokens
        assert drafts is not None, f"{request_id} has no drafts"
        return drafts

    def draft_distributions(self, request_id: str) -> np.ndarray:
        """(D, V) fp32 draft probabilities of the request's drafts (this waits for them)."""
        drafting = self._drafting[request_id]
        assert drafting.draft_probs is not None, f"{request_id} has no drafts"
        probs = np.asarray(drafting.draft_probs)
        if drafting.draft_columns is None:
            return probs
        full = np.zeros((probs.shape[0], self.trunk.vocab_size), np.float32)
        full[:, drafting.draft_columns] = probs
        return full

    def verify(
        self,
        state: RequestState,
        logits: mx.array,
        hiddens: mx.array | None,
        num_verified: int,
    ) -> CycleOutcome:
        """Accept or reject the drafts from the verify rows: logits (1 + k, V) at positions
        n + 1 .. n + 1 + k, k = num_verified drafts (the scheduler may have granted fewer)."""
        drafting = self._drafting[state.request_id]
        drafted = drafting.num_drafts
        assert drafting.draft_tokens is not None
        drafts = [int(t) for t in np.array(drafting.draft_tokens)[:num_verified]]
        n = len(state.token_ids) - 1
        histories = [state.output_ids + drafts[:j] for j in range(num_verified + 1)]
        prompt = state.request.prompt_ids
        target = np.array(
            compute_probs(
                logits, [state.sampling] * len(histories), [prompt] * len(histories), histories
            )
        )
        verdict: Verdict = self.accept(
            target,
            self.draft_distributions(state.request_id)[:num_verified],
            drafts,
            make_cycle_uniforms(state.seed, n + 1, num_verified),
        )
        k = verdict.num_accepted
        for cache in drafting.head_cache:
            cache.trim(drafted - 1)  # recursive entries read the head's own hidden, not h
        if hiddens is not None:
            drafting.pending, drafting.pending_start = hiddens[None, : k + 1], n
        drafting.clear_drafts()
        for counters in (drafting, self._totals):
            counters.num_cycles += 1
            counters.num_drafted += num_verified
            counters.max_depth = max(counters.max_depth, num_verified)
            for j in range(k):
                counters.accepted_by_depth[j] += 1
            counters.mtp_tokens += k + 1
        self.policy.observe_cycle(num_verified, k)
        return CycleOutcome((*drafts[:k], verdict.token_id), num_verified, num_verified - k)

    def abandon_drafts(self, request_id: str) -> None:
        """The drafted step did not run (preempted): the head's recursive entries go."""
        drafting = self._drafting.get(request_id)
        if drafting is None or not drafting.num_drafts:
            return
        drafting.clear_drafts()
        drafting.pending, drafting.stale = None, True

    # -- the end ---------------------------------------------------------------------------

    def stats(self, state: RequestState) -> SpeculationStats:
        drafting = self._drafting.get(state.request_id) or _Drafting([])
        return SpeculationStats(
            mtp_tokens=drafting.mtp_tokens,
            batch_tokens=drafting.batch_tokens,
            max_depth=drafting.max_depth,
            num_cycles=drafting.num_cycles,
            num_drafted=drafting.num_drafted,
            accepted_by_depth=tuple(drafting.accepted_by_depth[: drafting.max_depth]),
            generation_mode=state.request.generation_mode,
        )

    def forget(self, request_id: str) -> None:
        self._drafting.pop(request_id, None)

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        self.policy.observe_step(num_tokens, seconds)

    def plain_ahead(self) -> bool:
        return self.policy.plain_ahead()

    def choose_depth(self, state: RequestState) -> int:
        room = state.stop.params.max_tokens - len(state.output_ids)  # type: ignore[operator]
        return self.policy.choose(room)


def verify_rows(request_ids: Sequence[str], request_id: str) -> list[int]:
    """The rows of RunOutput that belong to request_id (a verify chunk's rows are adjacent)."""
    return [i for i, rid in enumerate(request_ids) if rid == request_id]
