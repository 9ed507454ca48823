"""Single-sequence MTP speculative decoding: an mlx-lm model (the trunk) drafts with its MTP head.

One cycle at depth D, with x_0..x_n committed and x_n not yet through the trunk:

  1. draft    head over the pending pairs (h_i, x_{i+1}), last one (h_{n-1}, x_n)
                -> q_1, d_1 ~ q_1                                  (d_1 will sit at n + 1)
              head on its own output and d_{j-1} -> q_j, d_j ~ q_j  (j = 2..D, at n + j)
  2. verify   trunk over [x_n, d_1 .. d_D] in one pass -> p_0..p_D, hiddens h_n..h_{n+D}
  3. accept   speculative.accept_drafts(p, q, d) -> k drafts stand, then a token t
  4. commit   x_{n+1..n+k} = d_1..d_k, x_{n+k+1} = t
  5. rollback trunk cache back to x_0..x_{n+k} (trim D - k; a recurrent cache is restored
              from its pre-verify snapshot and x_n..x_{n+k} replayed); head cache drops its D - 1
              recursive entries; the next pending pairs are (h_{n+i}, x_{n+i+1}) for i = 0..k

Between cycles the caches hold exactly what plain decoding of the committed tokens gives:

    trunk cache   x_0 .. x_{n-1}                       x_n waits to open the next verify pass
    head cache    (h_i, x_{i+1}) for i < n - m         the m pending pairs enter with step 1

p and q both come from `sampling.compute_probs` with the request's params, as plain decoding's do;
draws are keyed by (seed, position, purpose), so a seed fixes the whole output. At temperature 0
the output is plain greedy decoding's, token for token.

Ignores: batching, stop conditions, detokenization, context limits and fitting the head.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from inference.mtp_head import HiddenSource, MTPHead, text_model
from inference.sampling import SamplingParams, compute_probs, make_seed, sample
from inference.speculative import (
    CycleUniforms,
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
from mlx_lm.models.cache import ArraysCache, make_prompt_cache

MAX_DEPTH = 3
AcceptFn = Callable[[np.ndarray, np.ndarray, Sequence[int], CycleUniforms], Verdict]


class UnsupportedModelError(ValueError):
    """The model cannot run this lane (its forward is not embed -> layers -> norm -> lm_head,
    or it keeps a cache that can be neither trimmed nor snapshotted)."""


class Trunk:
    """An mlx-lm model split where the head taps it: embed, body (to a chosen hidden), lm_head."""

    def __init__(self, model: nn.Module) -> None:
        text = text_model(model)
        self.model = model
        self.body = text.model
        lm_head = getattr(text, "lm_head", None)
        self.lm_head = lm_head if lm_head is not None else self.body.embed_tokens.as_linear
        self._rows_memo: tuple[mx.array, mx.array] | None = None  # output_rows of the last ids
        probe = mx.array([[1, 2, 3]])
        expected, got = model(probe), self.lm_head(self.body(probe))
        if expected.shape != got.shape or not mx.allclose(expected, got, atol=1e-4).item():
            # e.g. soft-capped or scaled logits: the split would change the model's output.
            raise UnsupportedModelError(
                f"{type(model).__module__}: model(x) != lm_head(model.model(x)); "
                "the MTP lane needs logits = lm_head(final hidden)"
            )

    @property
    def vocab_size(self) -> int:
        return int(text_model(self.model).args.vocab_size)

    def embed(self, token_ids: Sequence[int] | mx.array) -> mx.array:
        """(1, L, H) embeddings of L token ids (host ints, or a lazy array of them)."""
        if isinstance(token_ids, mx.array):
            return self.body.embed_tokens(token_ids.reshape(1, -1))
        return self.body.embed_tokens(mx.array([list(token_ids)]))

    def output_rows(self, token_ids: mx.array) -> mx.array:
        """(V', H) dense rows of the output projection for token_ids: hidden @ rows.T gives
        those tokens' logits (dequantized when the projection is quantized)."""
        if self._rows_memo is not None and self._rows_memo[0] is token_ids:
            return self._rows_memo[1]
        projection = getattr(text_model(self.model), "lm_head", None)
        if projection is None:
            projection = self.body.embed_tokens  # tied embeddings
        if getattr(projection, "bias", None) is not None:
            raise UnsupportedModelError("a draft vocabulary needs an lm_head without bias")
        if hasattr(projection, "scales"):
            rows = mx.dequantize(
                projection.weight[token_ids],
                projection.scales[token_ids],
                None if projection.get("biases") is None else projection.biases[token_ids],
                group_size=projection.group_size,
                bits=projection.bits,
                mode=getattr(projection, "mode", "affine"),
            )
        else:
            rows = projection.weight[token_ids]
        self._rows_memo = (token_ids, rows)  # holding token_ids keeps the identity check sound
        return rows

    def draft_logits(self, hidden: mx.array, draft_ids: mx.array | None) -> mx.array:
        """(..., H) head outputs -> (..., V) logits; -inf outside draft_ids when it is given."""
        if draft_ids is None:
            return self.lm_head(hidden)
        sub = self.sub_logits(hidden, draft_ids)
        full = mx.full((*hidden.shape[:-1], self.vocab_size), -mx.inf, dtype=sub.dtype)
        full[..., draft_ids] = sub
        return full

    def sub_logits(self, hidden: mx.array, draft_ids: mx.array) -> mx.array:
        """(..., H) head outputs -> (..., V') logits of the draft_ids tokens only."""
        return hidden @ self.output_rows(draft_ids).T.astype(hidden.dtype)

    def forward(
        self, token_ids: Sequence[int], cache: list, source: HiddenSource
    ) -> tuple[mx.array, mx.array]:
        """(1, L) tokens through the trunk -> ((1, L, H) hiddens for the head, (1, L, V) logits)."""
        return self.forward_batch(mx.array([list(token_ids)]), cache, source)

    def forward_batch(
        self, inputs: mx.array, cache: list | None, source: HiddenSource
    ) -> tuple[mx.array, mx.array]:
        """(B, L) token ids -> ((B, L, H) hiddens for the head, (B, L, V) logits)."""
        if source == "post_norm":
            final = self.body(inputs, cache=cache)
            return final, self.lm_head(final)
        # Before the final norm: tap the norm's input for the length of this one call.
        norm = self.body.norm
        seen: list[mx.array] = []
        self.body.norm = _NormTap(norm, seen.append)
        try:
            final = self.body(inputs, cache=cache)
        finally:
            self.body.norm = norm
        return seen[0], self.lm_head(final)


def draft_distribution(
    trunk: Trunk,
    head: MTPHead,
    hidden: mx.array,
    params: SamplingParams,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
) -> np.ndarray:
    """(1, 1, H) head output -> (V,) fp32 draft probabilities q on the host (`draft_probs`,
    scattered to the whole vocabulary)."""
    probs, on_draft_vocab = draft_probs(trunk, head, hidden, params, prompt_ids, output_ids)
    if not on_draft_vocab:
        return np.array(probs)[0]
    q = np.zeros(trunk.vocab_size, np.float32)
    q[head.draft_ids_host] = np.array(probs)[0]
    return q


def draft_probs(
    trunk: Trunk,
    head: MTPHead,
    hidden: mx.array,
    params: SamplingParams,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
) -> tuple[mx.array, bool]:
    """(1, 1, H) head output -> lazy (1, columns) fp32 draft probabilities q, by the request's
    own sampling transform (compute_probs, as plain decoding), and whether the columns are the
    head's draft vocabulary (else the whole one). With a draft vocabulary and no penalties the
    transform runs on its V' logits alone: temperature, top_k, top_p and min_p never look at
    token ids, and the tokens outside would get probability 0 anyway, so q is the same to the
    bit, for ~1.3 ms less per head step on a CPU (no V-wide scatter and top-k). Penalties read
    token ids: they take the full-vocabulary path."""
    draft_ids = head.draft_ids
    if draft_ids is None or params.has_penalties:
        logits = trunk.draft_logits(hidden, draft_ids)[0]
        return compute_probs(logits, [params], [prompt_ids], [output_ids]), False
    sub = trunk.sub_logits(hidden, draft_ids)[0]
    return compute_probs(sub, [params], [prompt_ids], [output_ids]), True


class _NormTap(nn.Module):
    def __init__(self, norm: nn.Module, record: Callable[[mx.array], None]) -> None:
        super().__init__()
        self.norm = norm
        self.record = record

    def __call__(self, x: mx.array) -> mx.array:
        self.record(x)
        return self.norm(x)


@dataclass(frozen=True)
class CycleResult:
    """The tokens one cycle committed: the accepted drafts, then the residual or bonus token."""

    token_ids: tuple[int, ...]
    num_drafted: int
    num_accepted: int


@dataclass
class AcceptanceStats:
    """Counts over a generation: accepted_at[j] = cycles whose draft j + 1 stood."""

    depth: int
    num_cycles: int = 0
    num_resampled: int = 0
    accepted_at: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.accepted_at = self.accepted_at or [0] * self.depth

    def record(self, verdict: Verdict) -> None:
        self.num_cycles += 1
        self.num_resampled += verdict.resampled
        for j in range(verdict.num_accepted):
            self.accepted_at[j] += 1

    @property
    def acceptance_by_depth(self) -> list[float]:
        """Fraction of cycles whose draft j + 1 stood (so it falls with j)."""
        return [n / max(self.num_cycles, 1) for n in self.accepted_at]

    @property
    def tokens_per_cycle(self) -> float:
        return 1 + sum(self.accepted_at) / max(self.num_cycles, 1)


class MTPDecoder:
    """One sequence, decoded by draft-verify cycles: `prefill` once, then `step` per cycle."""

    def __init__(
        self,
        model: nn.Module | Trunk,
        head: MTPHead,
        params: SamplingParams,
        depth: int,
        *,
        accept: AcceptFn = accept_drafts,
    ) -> None:
        if not 1 <= depth <= MAX_DEPTH:
            raise ValueError(f"depth must be in 1..{MAX_DEPTH}, got {depth}")
        # A Trunk is checked once; pass one in to skip the check per decoder.
        self.trunk = model if isinstance(model, Trunk) else Trunk(model)
        self.head = head
        self.params = params
        self.depth = depth
        self.accept = accept
        self.seed = params.seed if params.seed is not None else make_seed()
        self.trunk_cache = make_prompt_cache(self.trunk.model)
        for cache in self.trunk_cache:
            if not cache.is_trimmable() and not isinstance(cache, ArraysCache):
                raise UnsupportedModelError(
                    f"{type(self.trunk.model).__module__}: cache {type(cache).__name__} can be neither "
                    "trimmed nor snapshotted"
                )
        self.head_cache = head.make_cache()
        self.stats = AcceptanceStats(depth)
        self.token_ids: list[int] = []
        self.num_prompt = 0
        self._pending: mx.array | None = None  # (1, m, H) hiddens of the pending pairs

    @property
    def source(self) -> HiddenSource:
        return self.head.config.hidden_source

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def pending_hiddens(self) -> mx.array | None:
        """(1, m, H) trunk hiddens h_{n-m}..h_{n-1} the head has yet to read (None before prefill)."""
        return self._pending

    @property
    def num_pending(self) -> int:
        return 0 if self._pending is None else self._pending.shape[1]

    def prefill(self, prompt_ids: Sequence[int]) -> int:
        """Run the prompt and sample the first token exactly as plain decoding does."""
        if self.token_ids:
            raise RuntimeError("prefill runs once per decoder")
        if not prompt_ids:
            raise ValueError("prompt_ids must hold at least one token, got none")
        self.token_ids = list(prompt_ids)
        self.num_prompt = len(prompt_ids)
        hiddens, logits = self.trunk.forward(prompt_ids, self.trunk_cache, self.source)
        probs = self._probs(logits[0, -1:], [[]])
        token = int(sample(probs, [self.seed], [self.num_prompt]).item())
        self.token_ids.append(token)
        self._pending = hiddens
        return token

    def step(self) -> CycleResult:
        """One draft-verify cycle; returns the tokens it committed (1 to depth + 1)."""
        assert self._pending is not None, "prefill first"
        n = len(self.token_ids) - 1  # position of x_n, the last committed token
        draft_ids, draft_probs = self._draft(n)

        # Verify [x_n, d_1..d_D] in one pass; p_j is the target where d_{j+1} would sit.
        verify_ids = [self.token_ids[-1], *draft_ids]
        snapshot = self._snapshot()
        hiddens, logits = self.trunk.forward(verify_ids, self.trunk_cache, self.source)
        histories = [self.output_ids + draft_ids[:j] for j in range(self.depth + 1)]
        target_probs = np.array(self._probs(logits[0], histories))
        uniforms = make_cycle_uniforms(self.seed, n + 1, self.depth)
        verdict = self.accept(target_probs, draft_probs, draft_ids, uniforms)
        self.stats.record(verdict)

        num_accepted = verdict.num_accepted
        committed = (*draft_ids[:num_accepted], verdict.token_id)
        if num_accepted < self.depth:
            hiddens = self._roll_back(snapshot, verify_ids[: num_accepted + 1], hiddens)
        for cache in self.head_cache:
            cache.trim(self.depth - 1)  # recursive entries read the head's own hidden, not h
        self._pending = hiddens[:, : num_accepted + 1]
        self.token_ids.extend(committed)
        return CycleResult(committed, self.depth, num_accepted)

    def generate(self, prompt_ids: Sequence[int], max_tokens: int) -> Iterator[int]:
        """Yield up to max_tokens new tokens (the last cycle may be cut short)."""
        if max_tokens < 1:
            return
        yield self.prefill(prompt_ids)
        num_out = 1
        while num_out < max_tokens:
            for token in self.step().token_ids[: max_tokens - num_out]:
                num_out += 1
                yield token

    # -- the cycle's parts ---------------------------------------------------------------------

    def _draft(self, n: int) -> tuple[list[int], np.ndarray]:
        """D tokens from the head: first over the pending pairs, then on its own output."""
        assert self._pending is not None
        num_pending = self._pending.shape[1]
        embeddings = self.trunk.embed(self.token_ids[-num_pending:])
        hidden = self.head(embeddings, self._pending, self.head_cache)[:, -1:]
        draft_ids: list[int] = []
        rows: list[np.ndarray] = []
        for j in range(self.depth):
            if j:
                hidden = self.head(self.trunk.embed(draft_ids[-1:]), hidden, self.head_cache)
            prompt = self.token_ids[: self.num_prompt]
            q = draft_distribution(
                self.trunk, self.head, hidden, self.params, prompt, self.output_ids + draft_ids
            )
            draft_ids.append(draw(q, keyed_uniform(self.seed, n + 1 + j, Purpose.DRAFT)))
            rows.append(q)
        return draft_ids, np.stack(rows)

    def _probs(self, logits: mx.array, histories: Sequence[Sequence[int]]) -> mx.array:
        """(R, V) logits -> (R, V) fp32 probabilities, row r with output history histories[r]."""
        rows = len(histories)
        prompt = self.token_ids[: self.num_prompt]
        return compute_probs(logits, [self.params] * rows, [prompt] * rows, histories)

    def _snapshot(self) -> list[tuple | None]:
        """Pre-verify state of the caches trim cannot roll back (recurrent / conv state)."""
        return [
            None if cache.is_trimmable() else tuple(_copy(s) for s in cache.state)
            for cache in self.trunk_cache
        ]

    def _roll_back(
        self, snapshot: list[tuple | None], kept_ids: Sequence[int], hiddens: mx.array
    ) -> mx.array:
        """Trunk cache back to the committed prefix plus kept_ids = [x_n, d_1..d_k], which the
        verify pass wrote; returns hiddens whose first k + 1 rows are those of kept_ids."""
        if all(state is None for state in snapshot):
            for cache in self.trunk_cache:
                cache.trim(self.depth + 1 - len(kept_ids))
            return hiddens
        # Recurrent state cannot be trimmed: restore it, rewind the rest, replay what stood.
        for cache, state in zip(self.trunk_cache, snapshot, strict=True):
            if state is None:
                cache.trim(self.depth + 1)
            else:
                cache.state = state
        replayed, _ = self.trunk.forward(kept_ids, self.trunk_cache, self.source)
        return replayed


def _copy(item):
    return list(item) if isinstance(item, list) else item


def iter_plain(
    model: nn.Module, prompt_ids: Sequence[int], params: SamplingParams
) -> Iterator[int]:
    """Reference autoregressive decoding with the same sampling path, one token per pass."""
    seed = params.seed if params.seed is not None else make_seed()
    cache = make_prompt_cache(model)
    token_ids = list(prompt_ids)
    inputs = token_ids
    while True:
        logits = model(mx.array([inputs]), cache=cache)[0, -1:]
        probs = compute_probs(logits, [params], [prompt_ids], [token_ids[len(prompt_ids) :]])
        token_ids.append(int(sample(probs, [seed], [len(token_ids)]).item()))
        inputs = token_ids[-1:]
        yield token_ids[-1]


def decode_plain(
    model: nn.Module, prompt_ids: Sequence[int], params: SamplingParams, max_tokens: int
) -> list[int]:
    """The first max_tokens tokens of `iter_plain`."""
    return list(itertools.islice(iter_plain(model, prompt_ids, params), max_tokens))
