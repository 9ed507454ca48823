"""Acceptance rule: exact table cases, then the output distribution of whole speculative cycles on a
synthetic Markov chain against its exact enumeration (chi-square), with broken rules caught."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Sequence

import inference  # noqa: F401  (BLAS before mlx)
from inference.sampling import seeded_uniforms
from inference.speculative import (
    CycleUniforms,
    Purpose,
    Verdict,
    accept_drafts,
    draw,
    keyed_uniform,
    make_cycle_uniforms,
    residual_probs,
)

import numpy as np
import pytest

AcceptFn = Callable[[np.ndarray, np.ndarray, Sequence[int], CycleUniforms], Verdict]


def uniforms(accept: list[float], residual: list[float] | None = None, bonus: float = 0.5):
    residual = residual if residual is not None else [0.5] * len(accept)
    return CycleUniforms(np.array(accept), np.array(residual), bonus)


def chi_square_p_value(observed: np.ndarray, expected_probs: np.ndarray) -> float:
    """Goodness-of-fit p-value of counts against probabilities (cells with probability 0 must be
    empty); the chi-square survival function in closed form for integer degrees of freedom."""
    observed = np.asarray(observed, np.float64)
    expected_probs = np.asarray(expected_probs, np.float64)
    impossible = expected_probs <= 0
    assert observed[impossible].sum() == 0, "a draw landed on a probability-0 outcome"
    expected = expected_probs[~impossible] * observed.sum()
    statistic = float(np.sum((observed[~impossible] - expected) ** 2 / expected))
    dof = int((~impossible).sum()) - 1
    half = statistic / 2
    if dof % 2 == 0:
        terms = [half**i / math.factorial(i) for i in range(dof // 2)]
        return math.exp(-half) * sum(terms)
    terms = [half ** (i - 0.5) / math.gamma(i + 0.5) for i in range(1, (dof - 1) // 2 + 1)]
    return math.erfc(math.sqrt(half)) + math.exp(-half) * sum(terms)


# -- the table ---------------------------------------------------------------------------------


def test_equal_distributions_always_accept_and_give_the_bonus():
    p = np.array([[0.2, 0.3, 0.5]] * 3, np.float32)
    verdict = accept_drafts(p, p[:2], [0, 2], uniforms([0.999, 0.999], bonus=0.1))
    assert verdict == Verdict(num_accepted=2, token_id=0, resampled=False)


def test_target_zero_always_rejects_and_draws_the_residual():
    p = np.array([[0.0, 0.5, 0.5], [1 / 3] * 3], np.float32)
    q = np.array([[0.9, 0.05, 0.05]], np.float32)
    # u = 0 is the most lenient coin; p / q = 0 still rejects.
    verdict = accept_drafts(p, q, [0], uniforms([0.0], [0.2]))
    assert verdict == Verdict(num_accepted=0, token_id=1, resampled=True)


@pytest.mark.parametrize(
    ("u_accept", "accepted"),
    [(0.0, True), (0.66, True), (2 / 3, False), (0.7, False), (0.999, False)],
)
def test_coin_is_strict_u_below_p_over_q(u_accept: float, accepted: bool):
    p = np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], np.float64)
    q = np.array([[0.25, 0.75, 0.0]], np.float64)  # drafted token 1: p / q = 2 / 3
    verdict = accept_drafts(p, q, [1], uniforms([u_accept], [0.99], bonus=0.3))
    if accepted:
        assert verdict == Verdict(1, 2, False)
    else:  # residual (0.25, 0, 0) -> token 0 whatever the draw
        assert verdict == Verdict(0, 0, True)


@pytest.mark.parametrize(("u_residual", "token"), [(0.0, 1), (0.59, 1), (0.61, 2), (0.999, 2)])
def test_residual_is_normalised_positive_part(u_residual: float, token: int):
    p = np.array([[0.1, 0.5, 0.4], [1.0, 0.0, 0.0]])
    q = np.array([[0.6, 0.2, 0.2]])  # (p - q)+ = (0, 0.3, 0.2) -> (0, 0.6, 0.4)
    np.testing.assert_allclose(residual_probs(p[0], q[0]), [0.0, 0.6, 0.4])
    verdict = accept_drafts(p, q, [0], uniforms([0.5], [u_residual]))  # p / q = 1 / 6: reject
    assert verdict == Verdict(0, token, True)


def test_first_rejection_ends_the_cycle():
    p = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    q = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    verdict = accept_drafts(p, q, [1, 1, 1], uniforms([0.9, 0.0, 0.0]))
    assert verdict == Verdict(num_accepted=1, token_id=0, resampled=True)


def test_one_hot_distributions_reproduce_greedy_decoding():
    # Temperature 0: both sides are one-hot; a draft stands iff it is the target's argmax.
    eye = np.eye(4, dtype=np.float32)
    p = eye[[2, 3, 1, 0]]
    for drafts, want in [([2, 3, 1], Verdict(3, 0, False)), ([2, 0, 1], Verdict(1, 3, True))]:
        q = eye[drafts]
        for u in (0.0, 0.5, 0.999):
            got = accept_drafts(p, q, drafts, uniforms([u] * 3, [u] * 3, bonus=u))
            assert got == want


def test_shapes_are_checked_and_impossible_drafts_refused():
    p = np.full((2, 3), 1 / 3)
    with pytest.raises(ValueError, match=r"want target \(D\+1, V\)"):
        accept_drafts(p, p, [0], uniforms([0.5]))
    with pytest.raises(AssertionError, match="draft probability 0"):
        accept_drafts(p, np.array([[0.0, 0.5, 0.5]]), [0], uniforms([0.5]))


def test_draw_is_inverse_cdf_and_never_picks_zero_weight():
    weights = np.array([0.0, 0.25, 0.0, 0.75, 0.0, 0.0])
    assert [draw(weights, u) for u in (0.0, 0.249, 0.25, 0.999999)] == [1, 1, 3, 3]
    assert draw(np.array([0.0, 0.0, 2.0]), 0.0) == 2  # unnormalised weights are fine
    assert draw(weights, np.nextafter(1.0, 0.0)) == 3


def test_uniforms_are_keyed_by_seed_position_and_purpose():
    cycle = make_cycle_uniforms(seed=7, first_position=10, depth=3)
    again = make_cycle_uniforms(seed=7, first_position=10, depth=3)
    np.testing.assert_array_equal(cycle.accept, again.accept)
    assert cycle.accept[1] == keyed_uniform(7, 11, Purpose.ACCEPT)
    assert cycle.residual[2] == keyed_uniform(7, 12, Purpose.RESIDUAL)
    assert cycle.bonus == keyed_uniform(7, 13, Purpose.BONUS)
    # Plain decoding's stream stays apart from the speculative ones.
    assert keyed_uniform(7, 11, Purpose.SAMPLE) == seeded_uniforms([7], [11]).item()
    values = {keyed_uniform(7, 11, purpose) for purpose in Purpose}
    assert len(values) == len(Purpose)
    assert keyed_uniform(8, 11, Purpose.ACCEPT) != cycle.accept[1]


# -- whole cycles on a Markov chain, against exact enumeration -----------------------------------

# Target and draft next-token tables over 4 tokens; zeros play the part of top-k / top-p cuts.
TARGET = np.array(
    [
        [0.50, 0.30, 0.20, 0.00],
        [0.10, 0.00, 0.60, 0.30],
        [0.25, 0.25, 0.25, 0.25],
        [0.00, 0.70, 0.00, 0.30],
    ]
)
DRAFT = np.array(
    [
        [0.30, 0.30, 0.10, 0.30],
        [0.40, 0.10, 0.40, 0.10],
        [0.10, 0.20, 0.30, 0.40],
        [0.05, 0.90, 0.05, 0.00],
    ]
)
NUM_TOKENS = 3


def skip_residual(p, q, draft_ids, u):
    """Broken: on a rejection, resample from p instead of (p - q)+."""
    verdict = accept_drafts(p, q, draft_ids, u)
    if verdict.resampled:
        j = verdict.num_accepted
        return Verdict(j, draw(p[j], float(u.residual[j])), True)
    return verdict


def coin_against_p(p, q, draft_ids, u):
    """Broken: accept with probability p instead of p / q."""
    for j, token_id in enumerate(draft_ids):
        if not u.accept[j] < p[j, token_id]:
            return Verdict(j, draw(residual_probs(p[j], q[j]), float(u.residual[j])), True)
    return Verdict(len(draft_ids), draw(p[-1], u.bonus), False)


def reuse_accept_coin(p, q, draft_ids, u):
    """Broken: the residual draw reuses the (rejecting, hence not uniform) accept coin."""
    return accept_drafts(p, q, draft_ids, CycleUniforms(u.accept, u.accept, u.bonus))


def run_chain(accept: AcceptFn, depth: int, rng: np.random.Generator) -> tuple[int, ...]:
    """Speculative decoding of the chain from token 0 until NUM_TOKENS tokens are committed."""
    tokens = [0]
    while len(tokens) <= NUM_TOKENS:
        drafts: list[int] = []
        for _ in range(depth):
            drafts.append(draw(DRAFT[(tokens + drafts)[-1]], rng.random()))
        q = DRAFT[[(tokens + drafts)[-1 - depth + j] for j in range(depth)]]
        p = TARGET[[(tokens + drafts)[-1 - depth + j] for j in range(depth + 1)]]
        u = CycleUniforms(rng.random(depth), rng.random(depth), rng.random())
        verdict = accept(p, q, drafts, u)
        tokens += [*drafts[: verdict.num_accepted], verdict.token_id]
    return tuple(tokens[1 : NUM_TOKENS + 1])


def chain_p_value(accept: AcceptFn, depth: int, num_draws: int = 6_000) -> float:
    rng = np.random.default_rng(depth)
    counts = Counter(run_chain(accept, depth, rng) for _ in range(num_draws))
    outcomes = list(itertools.product(range(4), repeat=NUM_TOKENS))
    exact = [TARGET[0, a] * TARGET[a, b] * TARGET[b, c] for a, b, c in outcomes]
    return chi_square_p_value(np.array([counts[o] for o in outcomes]), np.array(exact))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_cycles_reproduce_the_target_distribution(depth: int):
    assert chain_p_value(accept_drafts, depth) > 1e-3


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("broken", [skip_residual, coin_against_p, reuse_accept_coin])
def test_broken_rules_are_caught(broken: AcceptFn, depth: int):
    assert chain_p_value(broken, depth, num_draws=3_000) < 1e-6


def test_chi_square_p_value_matches_known_quantiles():
    # chi2(1) at 3.841 and chi2(4) at 9.488 are the 5% points.
    for dof, x in [(1, 3.841459), (4, 9.487729), (7, 14.06714)]:
        probs = np.full(dof + 1, 1 / (dof + 1))
        n = 1000 * (dof + 1)
        # Counts whose statistic is x: shift two cells by +-d with 2 d^2 / 1000 = x.
        d = math.sqrt(x * 1000 / 2)
        counts = np.full(dof + 1, 1000.0)
        counts[0] += d
        counts[1] -= d
        assert counts.sum() == pytest.approx(n)
        assert chi_square_p_value(counts, probs) == pytest.approx(0.05, abs=1e-4)
