"""Sampling: logits -> the final fp32 distribution per request -> one token per request.

`compute_probs` is a pure function of (logits, params, token history): the runner samples from it,
and a speculative-decoding verifier can call it on the drafter's and the target's logits alike.
At temperature 0 the distribution is one-hot at the argmax, so sampling it is argmax exactly.
Transforms, in order (as vLLM v1 and Hugging Face apply them):

    logit_bias -> repetition penalty (prompt + output) -> presence / frequency penalties (output)
    -> temperature -> top_k -> top_p (over the top_k survivors) -> min_p -> softmax (fp32)

Rows with a top_k work on their k candidates only (no sort, softmax or mask over the vocabulary);
rows with top_p but no top_k sort the TOP_P_PREFILTER most likely tokens, and the whole vocabulary
only when those hold less than top_p of the mass. A token tied with the last kept one may fall on
either side of a top_k or top_p cut.

`sample` draws by inverse CDF with one uniform per row, hashed from (seed, position): the same seed
gives the same tokens whatever else is in the batch, and no RNG state is carried between steps.

Ignores: stop conditions, detokenization, which requests are batched together.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import mlx.core as mx
import numpy as np

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
TOP_P_PREFILTER = 1024  # candidates sorted first for top_p without top_k
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one request turns logits into a token (OpenAI / vLLM field meanings)."""

    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off; relative to the most likely token
    repetition_penalty: float = 1.0  # HF / CTRL style over prompt + output; 1 = off
    presence_penalty: float = 0.0  # OpenAI style over output tokens
    frequency_penalty: float = 0.0  # OpenAI style over output tokens
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None  # None: the engine draws one with make_seed() at admission
    logprobs: bool = False
    num_top_logprobs: int = 0

    def __post_init__(self) -> None:
        def check(ok: bool, what: str, got: object) -> None:
            if not ok:
                raise ValueError(f"{what}, got {got!r}")

        check(
            math.isfinite(self.temperature) and self.temperature >= 0,
            "temperature must be >= 0",
            self.temperature,
        )
        check(
            isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an int >= 0", self.top_k
        )
        check(0 < self.top_p <= 1, "top_p must be in (0, 1]", self.top_p)
        check(0 <= self.min_p <= 1, "min_p must be in [0, 1]", self.min_p)
        check(
            math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty must be > 0",
            self.repetition_penalty,
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check(-2 <= value <= 2, f"{name} must be in [-2, 2]", value)
        for token_id, bias in self.logit_bias.items():
            check(
                isinstance(token_id, int) and token_id >= 0,
                "logit_bias keys must be token ids",
                token_id,
            )
            check(-100 <= bias <= 100, "logit_bias values must be in [-100, 100]", bias)
        check(
            self.seed is None or isinstance(self.seed, int),
            "seed must be an int or None",
            self.seed,
        )
        check(
            isinstance(self.num_top_logprobs, int)
            and 0 <= self.num_top_logprobs <= MAX_TOP_LOGPROBS,
            f"num_top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]",
            self.num_top_logprobs,
        )
        check(
            self.logprobs or self.num_top_logprobs == 0,
            "num_top_logprobs needs logprobs=True",
            self.num_top_logprobs,
        )
        object.__setattr__(self, "logit_bias", MappingProxyType(dict(self.logit_bias)))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return bool(
            self.logit_bias
            or self.repetition_penalty != 1
            or self.presence_penalty
            or self.frequency_penalty
        )


def make_seed() -> int:
    """A fresh random seed for a request that did not ask for one."""
    return secrets.randbits(63)


# -- logits -> probabilities -------------------------------------------------------------------


def compute_probs(
    logits: mx.array,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
) -> mx.array:
    """(batch, vocab) logits of any float dtype -> (batch, vocab) fp32 probabilities.

    Row i uses params[i], and prompt_ids[i] / output_ids[i] for its penalties.
    """
    num_rows, vocab_size = logits.shape
    assert len(params) == len(prompt_ids) == len(output_ids) == num_rows
    logits = _apply_penalties(logits.astype(mx.float32), params, prompt_ids, output_ids)

    # Rows go by path, and top_k rows by k, so a row's result never depends on its batch.
    greedy_rows: list[int] = []
    dense_rows: list[int] = []
    top_k_rows: dict[int, list[int]] = {}
    for row, p in enumerate(params):
        if p.is_greedy:
            greedy_rows.append(row)
        elif 0 < p.top_k < vocab_size:
            top_k_rows.setdefault(p.top_k, []).append(row)
        else:
            dense_rows.append(row)

    if len(dense_rows) == num_rows:  # the common all-alike batch: no gather, no scatter
        return _dense_probs(logits, params)
    probs = mx.zeros((num_rows, vocab_size), dtype=mx.float32)
    if greedy_rows:
        row_idx = mx.array(greedy_rows)
        probs[row_idx, mx.argmax(logits[row_idx], axis=-1)] = 1.0
    for top_k, rows in top_k_rows.items():
        row_idx = mx.array(rows)
        group_logits = logits if len(rows) == num_rows else logits[row_idx]
        token_ids, token_probs = _top_k_probs(group_logits, top_k, [params[r] for r in rows])
        probs[mx.repeat(row_idx, top_k), token_ids.flatten()] = token_probs.flatten()
    if dense_rows:
        row_idx = mx.array(dense_rows)
        probs[row_idx] = _dense_probs(logits[row_idx], [params[r] for r in dense_rows])
    return probs


def _top_k_probs(
    logits: mx.array, top_k: int, params: Sequence[SamplingParams]
) -> tuple[mx.array, mx.array]:
    """(rows, vocab) -> the top_k token ids and their probabilities after top_p and min_p."""
    token_ids = top_k_ids(logits, top_k)
    values = mx.take_along_axis(logits, token_ids, axis=-1)
    values = values / mx.array([p.temperature for p in params])[:, None]
    order = mx.argsort(-values, axis=-1)  # descending: top_p needs the mass of a prefix
    token_ids = mx.take_along_axis(token_ids, order, axis=-1)
    probs = mx.softmax(mx.take_along_axis(values, order, axis=-1), axis=-1, precise=True)
    keep = _prefix_below(probs, [p.top_p for p in params])
    min_p = mx.array([p.min_p for p in params])[:, None]
    keep = keep & (probs >= min_p * probs[:, :1])
    probs = mx.where(keep, probs, 0.0)
    return token_ids, probs / mx.sum(probs, axis=-1, keepdims=True)


def top_k_ids(logits: mx.array, top_k: int) -> mx.array:
    """(rows, vocab) -> (rows, top_k) int32 ids of each row's top_k logits, in no set order.
    On a CPU device NumPy selects them: its argpartition is ~10x MLX's there (0.28 against
    2.9 ms for 3 x 49,152 logits), and the host waits for the logits anyway (MLX's CPU
    evaluation runs only a few operations ahead of the caller)."""
    vocab_size = logits.shape[1]
    first = vocab_size - top_k
    if mx.default_device() == mx.cpu:
        host = np.asarray(logits)
        return mx.array(np.argpartition(host, first, axis=-1)[:, first:].astype(np.int32))
    return mx.argpartition(logits, first, axis=-1)[:, first:]


def _dense_probs(logits: mx.array, params: Sequence[SamplingParams]) -> mx.array:
    """(rows, vocab) -> (rows, vocab) probabilities after temperature, top_p and min_p."""
    probs = mx.softmax(
        logits / mx.array([p.temperature for p in params])[:, None], axis=-1, precise=True
    )
    # Keep tokens whose probability reaches a per-row threshold (0 keeps everything).
    thresholds = mx.zeros((len(params),))
    nucleus_rows = [row for row, p in enumerate(params) if p.top_p < 1]
    if nucleus_rows:
        row_idx = mx.array(nucleus_rows)
        top_p = [params[row].top_p for row in nucleus_rows]
        thresholds[row_idx] = _top_p_thresholds(probs[row_idx], top_p)
    min_p = [p.min_p for p in params]
    if any(min_p):
        thresholds = mx.maximum(thresholds, mx.array(min_p) * mx.max(probs, axis=-1))
    if not nucleus_rows and not any(min_p):
        return probs
    probs = mx.where(probs >= thresholds[:, None], probs, 0.0)
    return probs / mx.sum(probs, axis=-1, keepdims=True)


def _top_p_thresholds(probs: mx.array, top_p: Sequence[float]) -> mx.array:
    """The probability of the last token each row's nucleus keeps."""
    vocab_size = probs.shape[1]
    candidates = None
    if vocab_size > TOP_P_PREFILTER:
        first = vocab_size - TOP_P_PREFILTER
        top = mx.argpartition(probs, first, axis=-1)[:, first:]
        candidates = mx.sort(mx.take_along_axis(probs, top, axis=-1), axis=-1)[:, ::-1]
        # The nucleus ends among the candidates only if they hold top_p of the mass (a host sync).
        if not mx.all(mx.cumsum(candidates, axis=-1)[:, -1] >= mx.array(top_p)).item():
            candidates = None
    if candidates is None:
        candidates = mx.sort(probs, axis=-1)[:, ::-1]
    num_kept = mx.sum(_prefix_below(candidates, top_p), axis=-1, keepdims=True)
    return mx.take_along_axis(candidates, num_kept - 1, axis=-1)[:, 0]


def _prefix_below(sorted_probs: mx.array, top_p: Sequence[float]) -> mx.array:
    """Mask of the smallest prefix whose mass reaches top_p (the first token always stays)."""
    mass_before = mx.cumsum(sorted_probs, axis=-1, inclusive=False)
    return mass_before < mx.array(top_p)[:, None]


def _apply_penalties(
    logits: mx.array,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
) -> mx.array:
    """Bias and penalties touch only the tokens seen or biased: one scatter of (row, token) pairs."""
    vocab_size = logits.shape[1]
    # Per penalized row, parallel columns: row, token id, bias, seen, count, and the three knobs.
    pieces: list[tuple[np.ndarray, ...]] = []
    for row, p in enumerate(params):
        if not p.has_penalties:
            continue
        out_ids, out_counts = np.unique(np.asarray(output_ids[row], np.int64), return_counts=True)
        bias_ids = np.fromiter(p.logit_bias, np.int64, len(p.logit_bias))
        prompt = np.asarray(prompt_ids[row], np.int64)
        touched = [bias_ids, out_ids]  # out_ids serve presence, frequency and repetition alike
        if p.repetition_penalty != 1:
            touched.append(prompt)
        token_ids = np.unique(np.concatenate(touched))
        token_ids = token_ids[token_ids < vocab_size]  # a padded vocab or a bad bias key
        counts = np.zeros(len(token_ids), np.float32)
        in_vocab = out_ids < vocab_size
        counts[np.searchsorted(token_ids, out_ids[in_vocab])] = out_counts[in_vocab]
        seen = counts > 0
        if p.repetition_penalty != 1:
            seen |= np.isin(token_ids, prompt)
        biases = np.zeros(len(token_ids), np.float32)
        for token_id, bias in p.logit_bias.items():
            if token_id < vocab_size:
                biases[np.searchsorted(token_ids, token_id)] = bias
        num = len(token_ids)
        pieces.append(
            (
                np.full(num, row),
                token_ids,
                biases,
                seen,
                counts,
                np.full(num, p.repetition_penalty, np.float32),
                np.full(num, p.presence_penalty, np.float32),
                np.full(num, p.frequency_penalty, np.float32),
            )
        )
    if not pieces:
        return logits
    rows, cols, biases, seen, counts, reps, presences, frequencies = (
        mx.array(np.concatenate(column)) for column in zip(*pieces, strict=True)
    )
    values = logits[rows, cols] + biases
    penalized = mx.where(values > 0, values / reps, values * reps)
    values = mx.where(seen, penalized, values)
    values = values - presences * (counts > 0) - frequencies * counts
    logits[rows, cols] = values
    return logits


# -- probabilities -> tokens ---------------------------------------------------------------


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a cheap, well-mixed 64-bit hash."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def seeded_uniforms(seeds: Sequence[int], positions: Sequence[int], *, stream: int = 0) -> mx.array:
    """One uniform in [0, 1) per row from (seed, position, stream) alone, as fp32.

    24 bits, the resolution of an fp32 CDF; stream separates independent draws at one position
    (a speculative verifier's acceptance test and its resample).
    """
    values = []
    for seed, position in zip(seeds, positions, strict=True):
        h = _mix64((_mix64((_mix64(stream & _MASK64) ^ seed) & _MASK64) ^ position) & _MASK64)
        values.append((h >> 40) / (1 << 24))
    return mx.array(values, dtype=mx.float32)


def sample(
    probs: mx.array, seeds: Sequence[int], positions: Sequence[int], *, stream: int = 0
) -> mx.array:
    """Draw one token per row by inverse CDF; positions[i] is where row i's token will sit, and
    stream the uniform stream (`seeded_uniforms`; a speculative drafter's is not plain decoding's).

    A one-hot row (temperature 0) always gives its hot index.
    """
    cdf = mx.cumsum(probs, axis=-1)
    totals = cdf[:, -1:]
    # Scale u by the row's total so fp32 rounding of the CDF cannot bias the draw.
    targets = seeded_uniforms(seeds, positions, stream=stream)[:, None] * totals
    tokens = mx.sum(cdf <= targets, axis=-1)
    # Where rounding still lands past the end: the last token that adds mass to the CDF.
    last = mx.sum(cdf < totals, axis=-1)
    return mx.minimum(tokens, last).astype(mx.int32)


# -- logprobs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities under the model's own distribution (raw logits, before any transform)."""

    token_id: int
    logprob: float
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


def compute_logprobs(
    logits: mx.array, token_ids: Sequence[int], params: Sequence[SamplingParams]
) -> list[TokenLogprobs | None]:
    """The sampled token's logprob and the top-n alternatives, for rows that asked (else None)."""
    rows = [row for row, p in enumerate(params) if p.logprobs]
    results: list[TokenLogprobs | None] = [None] * len(params)
    if not rows:
        return results
    row_idx = mx.array(rows)
    logprobs = logits[row_idx].astype(mx.float32)
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(logprobs, mx.array([token_ids[r] for r in rows])[:, None], axis=-1)
    num_top = max(params[r].num_top_logprobs for r in rows)
    top_id_lists: list[list[int]] = [[] for _ in rows]
    top_value_lists: list[list[float]] = [[] for _ in rows]
    if num_top:
        first = logprobs.shape[1] - num_top
        top_ids = mx.argpartition(logprobs, first, axis=-1)[:, first:]
        top_values = mx.take_along_axis(logprobs, top_ids, axis=-1)
        order = mx.argsort(-top_values, axis=-1)
        top_id_lists = mx.take_along_axis(top_ids, order, axis=-1).tolist()
        top_value_lists = mx.take_along_axis(top_values, order, axis=-1).tolist()
    chosen_list = chosen[:, 0].tolist()
    for i, row in enumerate(rows):
        num = params[row].num_top_logprobs
        results[row] = TokenLogprobs(
            token_id=token_ids[row],
            logprob=chosen_list[i],
            top_ids=tuple(top_id_lists[i][:num]),
            top_logprobs=tuple(top_value_lists[i][:num]),
        )
    return results
