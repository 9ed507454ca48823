"""Speculative acceptance: target and draft distributions -> how many drafts stand, and one token.

The Leviathan / Chen rule over one cycle of D drafted tokens d_0..d_{D-1}:

    p: (D + 1, V) target probabilities; p[j] is the target's distribution where d_j would sit,
       p[D] the one just past the last draft (the verify pass gives all D + 1 rows at once)
    q: (D, V) draft probabilities; d_j was drawn from q[j], so q[j, d_j] > 0

    for j in 0..D-1:
        accept d_j if u_accept[j] < p[j, d_j] / q[j, d_j]      strict: p = 0 never accepts
        else: draw from normalise((p[j] - q[j])+) with u_residual[j], and the cycle ends
    all D accepted: draw a bonus token from p[D] with u_bonus

Every committed token is then distributed exactly as the target's own sample. Probabilities come
in as fp32 (bf16 underflows on small ones); the ratio and the residual run in float64.

Uniforms are keyed by (seed, position, purpose) through `sampling.seeded_uniforms`, one stream per
purpose, so no draw is reused: a cycle reads only positions past everything already committed.

Ignores: models, caches, logits and the sampling transforms (the caller hands over finished
distributions, made by the same `compute_probs` as plain decoding for both p and q).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from inference.sampling import seeded_uniforms

import numpy as np


class Purpose(IntEnum):
    """The uniform stream a draw uses; SAMPLE is plain decoding's (what `sampling.sample` uses)."""

    SAMPLE = 0
    DRAFT = 1
    ACCEPT = 2
    RESIDUAL = 3
    BONUS = 4


@dataclass(frozen=True)
class CycleUniforms:
    """The uniforms one verify cycle may read: one accept coin and one residual draw per draft."""

    accept: np.ndarray  # (D,)
    residual: np.ndarray  # (D,)
    bonus: float


@dataclass(frozen=True)
class Verdict:
    """num_accepted drafts stand, then token_id: the residual draw or, if all stood, the bonus."""

    num_accepted: int
    token_id: int
    resampled: bool  # True: token_id replaced a rejected draft; False: the bonus token


def keyed_uniform(seed: int, position: int, purpose: Purpose) -> float:
    """One uniform in [0, 1) for the token that will sit at `position`."""
    return float(seeded_uniforms([seed], [position], stream=int(purpose)).item())


def make_cycle_uniforms(seed: int, first_position: int, depth: int) -> CycleUniforms:
    """Uniforms for drafts at first_position .. first_position + depth - 1, bonus just after."""
    positions = list(range(first_position, first_position + depth))
    seeds = [seed] * depth
    accept = np.array(seeded_uniforms(seeds, positions, stream=int(Purpose.ACCEPT)), np.float64)
    residual = np.array(seeded_uniforms(seeds, positions, stream=int(Purpose.RESIDUAL)), np.float64)
    return CycleUniforms(
        accept, residual, keyed_uniform(seed, first_position + depth, Purpose.BONUS)
    )


def draw(probs: np.ndarray, u: float) -> int:
    """Inverse-CDF draw from a (V,) non-negative weight vector (need not sum to 1)."""
    cdf = np.cumsum(np.asarray(probs, np.float64))
    total = cdf[-1]
    assert total > 0, "draw from an all-zero distribution"
    token = int(np.searchsorted(cdf, u * total, side="right"))
    # Rounding past the end: the last token that adds mass (a zero-weight token is never drawn).
    return min(token, int(np.searchsorted(cdf, total, side="left")))


def residual_probs(target: np.ndarray, draft: np.ndarray) -> np.ndarray:
    """normalise((p - q)+); p itself where that is all zero (then p == q and a reject is moot)."""
    residual = np.maximum(np.asarray(target, np.float64) - np.asarray(draft, np.float64), 0.0)
    total = residual.sum()
    if total <= 0:
        return np.asarray(target, np.float64) / np.sum(target, dtype=np.float64)
    return residual / total


def accept_drafts(
    target_probs: np.ndarray,
    draft_probs: np.ndarray,
    draft_ids: Sequence[int],
    uniforms: CycleUniforms,
) -> Verdict:
    """Apply the rule above; the cycle commits draft_ids[:num_accepted] then token_id."""
    depth = len(draft_ids)
    p = np.asarray(target_probs)
    q = np.asarray(draft_probs)
    if p.shape[0] != depth + 1 or q.shape[0] != depth or p.shape[1:] != q.shape[1:]:
        raise ValueError(
            f"want target (D+1, V) and draft (D, V) for D={depth} drafts, "
            f"got {p.shape} and {q.shape}"
        )
    for j, token_id in enumerate(draft_ids):
        p_j = float(p[j, token_id])
        q_j = float(q[j, token_id])
        assert q_j > 0, f"draft {j} (token {token_id}) has draft probability 0"
        if uniforms.accept[j] < p_j / q_j:
            continue
        token = draw(residual_probs(p[j], q[j]), float(uniforms.residual[j]))
        return Verdict(num_accepted=j, token_id=token, resampled=True)
    return Verdict(num_accepted=depth, token_id=draw(p[depth], uniforms.bonus), resampled=False)
