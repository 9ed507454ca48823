"""Sampling tests: each transform on hand-made logits, seeded draws, batch independence, statistics."""

from __future__ import annotations

import math

import inference  # noqa: F401  (BLAS before mlx)
from inference.sampling import (
    SamplingParams,
    compute_logprobs,
    compute_probs,
    make_seed,
    sample,
    seeded_uniforms,
    top_k_ids,
)

import mlx.core as mx
import numpy as np
import pytest

PROBS = [0.1, 0.2, 0.3, 0.4]  # a distribution whose logits are log(PROBS)


def probs_of(
    logits: list[float] | list[list[float]],
    params: SamplingParams | list[SamplingParams],
    prompt_ids: list[int] | None = None,
    output_ids: list[int] | None = None,
) -> np.ndarray:
    """compute_probs on one row (or several rows sharing a history), as float64 numpy."""
    rows = logits if isinstance(logits[0], list) else [logits]
    all_params = params if isinstance(params, list) else [params] * len(rows)
    probs = compute_probs(
        mx.array(rows),
        all_params,
        [prompt_ids or []] * len(rows),
        [output_ids or []] * len(rows),
    )
    assert probs.dtype == mx.float32
    result = np.array(probs, dtype=np.float64)
    return result if isinstance(logits[0], list) else result[0]


def softmax(values: list[float]) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


LOG_PROBS = [math.log(p) for p in PROBS]


# -- params ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": math.inf},
        {"top_k": -1},
        {"top_k": 2.0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_p": math.nan},
        {"min_p": -0.1},
        {"min_p": 1.1},
        {"repetition_penalty": 0.0},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3.0},
        {"logit_bias": {1: 101.0}},
        {"logit_bias": {-1: 1.0}},
        {"seed": 1.5},
        {"num_top_logprobs": 3},  # without logprobs=True
        {"logprobs": True, "num_top_logprobs": 21},
    ],
)
def test_params_reject_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_params_are_immutable() -> None:
    bias = {3: 1.0}
    params = SamplingParams(logit_bias=bias)
    bias[4] = 2.0  # the caller's dict is copied
    assert dict(params.logit_bias) == {3: 1.0}
    with pytest.raises(TypeError):
        params.logit_bias[5] = 1.0  # type: ignore[index]
    with pytest.raises(AttributeError):
        params.temperature = 0.5  # type: ignore[misc]


def test_make_seed_gives_distinct_non_negative_ints() -> None:
    seeds = {make_seed() for _ in range(10)}
    assert len(seeds) == 10
    assert all(0 <= s < 2**63 for s in seeds)


# -- each transform --------------------------------------------------------------------------


def test_plain_softmax_in_fp32() -> None:
    np.testing.assert_allclose(probs_of(LOG_PROBS, SamplingParams()), PROBS, atol=1e-7)


def test_bf16_logits_give_fp32_probs_that_sum_to_one() -> None:
    logits = mx.array([LOG_PROBS], dtype=mx.bfloat16)
    probs = compute_probs(logits, [SamplingParams()], [[]], [[]])
    assert probs.dtype == mx.float32
    assert abs(float(probs.sum()) - 1) < 1e-6


def test_temperature_divides_logits() -> None:
    logits = [1.0, 2.0, 3.0]
    np.testing.assert_allclose(
        probs_of(logits, SamplingParams(temperature=2.0)), softmax([0.5, 1.0, 1.5]), atol=1e-7
    )
    np.testing.assert_allclose(
        probs_of(logits, SamplingParams(temperature=0.5)), softmax([2.0, 4.0, 6.0]), atol=1e-7
    )


def test_temperature_zero_is_one_hot_at_the_first_argmax() -> None:
    assert probs_of([1.0, 3.0, 2.0], SamplingParams(temperature=0)).tolist() == [0, 1, 0]
    assert probs_of([3.0, 1.0, 3.0], SamplingParams(temperature=0)).tolist() == [1, 0, 0]


def test_top_k_keeps_the_k_largest() -> None:
    expected = [0, 0, 3 / 7, 4 / 7]
    np.testing.assert_allclose(probs_of(LOG_PROBS, SamplingParams(top_k=2)), expected, atol=1e-7)
    # top_k >= vocab is a no-op
    np.testing.assert_allclose(probs_of(LOG_PROBS, SamplingParams(top_k=9)), PROBS, atol=1e-7)


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    # Sorted: 0.4, 0.3, 0.2, 0.1; mass before each: 0, 0.4, 0.7, 0.9.
    np.testing.assert_allclose(
        probs_of(LOG_PROBS, SamplingParams(top_p=0.6)), [0, 0, 3 / 7, 4 / 7], atol=1e-7
    )
    np.testing.assert_allclose(
        probs_of(LOG_PROBS, SamplingParams(top_p=0.75)), [0, 2 / 9, 3 / 9, 4 / 9], atol=1e-7
    )
    np.testing.assert_allclose(
        probs_of(LOG_PROBS, SamplingParams(top_p=0.05)), [0, 0, 0, 1], atol=1e-7
    )


def test_top_k_applies_before_top_p() -> None:
    logits = [math.log(p) for p in (0.05, 0.15, 0.3, 0.5)]
    # top_p alone: mass before 0.3 is 0.5 < 0.6, so two tokens stay.
    np.testing.assert_allclose(
        probs_of(logits, SamplingParams(top_p=0.6)), [0, 0, 0.375, 0.625], atol=1e-7
    )
    # top_k=2 first renormalizes to (0.375, 0.625): mass before 0.375 is 0.625 >= 0.6.
    np.testing.assert_allclose(
        probs_of(logits, SamplingParams(top_k=2, top_p=0.6)), [0, 0, 0, 1], atol=1e-7
    )


def test_min_p_drops_tokens_below_a_fraction_of_the_top() -> None:
    # 0.6 * 0.4 = 0.24: 0.3 and 0.4 stay.
    np.testing.assert_allclose(
        probs_of(LOG_PROBS, SamplingParams(min_p=0.6)), [0, 0, 3 / 7, 4 / 7], atol=1e-7
    )
    # min_p acts after temperature: at T=2 the probs are sqrt-flattened to ~(.16,.22,.27,.32).
    flat = softmax([x / 2 for x in LOG_PROBS])
    kept = np.where(flat >= 0.6 * flat.max(), flat, 0)
    np.testing.assert_allclose(
        probs_of(LOG_PROBS, SamplingParams(min_p=0.6, temperature=2.0)),
        kept / kept.sum(),
        atol=1e-7,
    )


def test_repetition_penalty_over_prompt_and_output_hf_style() -> None:
    logits = [2.0, -1.0, 0.5, 1.0]
    params = SamplingParams(repetition_penalty=2.0)
    # token 0 (prompt, positive) is divided, token 1 (output, negative) multiplied.
    expected = softmax([1.0, -2.0, 0.5, 1.0])
    np.testing.assert_allclose(probs_of(logits, params, [0], [1, 1]), expected, atol=1e-7)


def test_presence_and_frequency_penalties_over_output_only_openai_style() -> None:
    logits = [1.0, 1.0, 1.0, 1.0]
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    # token 0 is only in the prompt: untouched; 2 appears twice, 3 once.
    expected = softmax([1.0, 1.0, 1.0 - 0.5 - 0.5, 1.0 - 0.5 - 0.25])
    np.testing.assert_allclose(probs_of(logits, params, [0], [2, 3, 2]), expected, atol=1e-7)
    negative = SamplingParams(presence_penalty=-1.0)  # negative values encourage repeats
    np.testing.assert_allclose(
        probs_of(logits, negative, [], [1]), softmax([1, 2, 1, 1]), atol=1e-7
    )


def test_logit_bias_adds_to_raw_logits_and_ignores_ids_beyond_vocab() -> None:
    params = SamplingParams(logit_bias={1: 2.0, 0: -100.0, 99: 5.0})
    expected = softmax([1.0 - 100, 1.0 + 2.0, 1.0, 1.0])
    np.testing.assert_allclose(probs_of([1.0] * 4, params), expected, atol=1e-7)


def test_bias_applies_before_repetition_penalty() -> None:
    params = SamplingParams(logit_bias={0: 1.0}, repetition_penalty=2.0)
    # (1 + 1) / 2 = 1.0; penalty first would give 1 / 2 + 1 = 1.5.
    expected = softmax([1.0, 0.0])
    np.testing.assert_allclose(probs_of([1.0, 0.0], params, [0], []), expected, atol=1e-7)


def test_penalties_also_steer_greedy_decoding() -> None:
    params = SamplingParams(temperature=0, frequency_penalty=1.0)
    assert probs_of([2.0, 1.5], params, [], [0]).tolist() == [0, 1]


def test_caller_logits_are_not_modified() -> None:
    logits = mx.array([[1.0, 2.0, 3.0]])
    compute_probs(logits, [SamplingParams(logit_bias={0: 5.0})], [[]], [[]])
    assert logits.tolist() == [[1.0, 2.0, 3.0]]


def test_rows_do_not_depend_on_their_batch() -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((6, 64)) * 3).astype(np.float32).tolist()
    params = [
        SamplingParams(top_k=5),
        SamplingParams(top_k=9, top_p=0.8),
        SamplingParams(top_p=0.7, min_p=0.05),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, repetition_penalty=1.3),
        SamplingParams(top_k=5, presence_penalty=1.0, logit_bias={3: 4.0}),
    ]
    batch = probs_of(logits, params, [1, 2, 3], [3, 4])
    for row in range(6):
        alone = probs_of(logits[row], params[row], [1, 2, 3], [3, 4])
        assert np.array_equal(alone, batch[row]), row
        assert abs(batch[row].sum() - 1) < 1e-6


def reference_probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The transforms written out plainly in float64 (no penalties)."""
    if p.temperature == 0:
        return np.eye(len(logits))[np.argmax(logits)]
    x = logits.astype(np.float64) / p.temperature
    order = np.argsort(-x)
    if 0 < p.top_k < len(x):
        x[order[p.top_k :]] = -np.inf
    probs = softmax(x.tolist())
    sorted_probs = probs[order]
    mass_before = np.cumsum(sorted_probs) - sorted_probs
    probs[order[mass_before >= p.top_p]] = 0
    probs[probs < p.min_p * probs.max()] = 0
    return probs / probs.sum()


@pytest.mark.parametrize("prefilter", [4, 1024])
def test_matches_a_plain_reference_on_random_logits(
    prefilter: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # prefilter=4 sends top_p rows through the candidate prefilter and its full-sort fallback.
    monkeypatch.setattr("inference.sampling.TOP_P_PREFILTER", prefilter)
    rng = np.random.default_rng(3)
    param_grid = [
        SamplingParams(temperature=t, top_k=k, top_p=tp, min_p=mp)
        for t in (0.0, 0.6, 1.3)
        for k in (0, 1, 5, 64)
        for tp in (1.0, 0.9, 0.3)
        for mp in (0.0, 0.2)
    ]
    for scale in (0.5, 4.0):  # flat logits need the full sort, peaked ones do not
        logits = (rng.standard_normal((len(param_grid), 48)) * scale).astype(np.float32)
        got = compute_probs(
            mx.array(logits), param_grid, [[]] * len(param_grid), [[]] * len(param_grid)
        )
        got = np.array(got, dtype=np.float64)
        for row, p in enumerate(param_grid):
            np.testing.assert_allclose(got[row], reference_probs(logits[row], p), atol=2e-6)


def test_top_p_prefilter_suffices_for_peaked_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("inference.sampling.TOP_P_PREFILTER", 4)
    sorted_vocab = []
    real_sort = mx.sort
    monkeypatch.setattr(
        "inference.sampling.mx.sort",
        lambda a, axis=-1: sorted_vocab.append(a.shape[-1]) or real_sort(a, axis=axis),
    )
    logits = np.zeros((2, 32), np.float32)
    logits[:, :3] = [[9.0, 8.0, 7.0], [8.0, 8.5, 6.0]]  # the top 4 hold > 99% of the mass
    params = [SamplingParams(top_p=0.9), SamplingParams(top_p=0.5, temperature=2.0)]
    got = np.array(compute_probs(mx.array(logits), params, [[]] * 2, [[]] * 2), np.float64)
    for row in range(2):
        np.testing.assert_allclose(got[row], reference_probs(logits[row], params[row]), atol=2e-6)
    assert sorted_vocab == [4]  # only the candidates were sorted, never all 32


def test_history_ids_beyond_the_vocab_are_ignored() -> None:
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0)
    expected = softmax([1.0, 1.0 / 2 - 1.0, 1.0])
    np.testing.assert_allclose(probs_of([1.0] * 3, params, [7], [1, 9]), expected, atol=1e-7)


# -- drawing ---------------------------------------------------------------------------------


def test_seeded_uniforms_are_deterministic_in_range_and_stream_separated() -> None:
    positions = list(range(1000))
    u = np.array(seeded_uniforms([7] * 1000, positions))
    assert np.array_equal(u, np.array(seeded_uniforms([7] * 1000, positions)))
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.03
    other_stream = np.array(seeded_uniforms([7] * 1000, positions, stream=1))
    other_seed = np.array(seeded_uniforms([8] * 1000, positions))
    assert not np.array_equal(u, other_stream)
    assert not np.array_equal(u, other_seed)
    assert len(set(u.tolist())) > 990


def test_temperature_zero_samples_the_argmax_whatever_the_seed() -> None:
    rng = np.random.default_rng(1)
    logits = mx.array(rng.standard_normal((16, 100)).astype(np.float32))
    greedy = [SamplingParams(temperature=0)] * 16
    probs = compute_probs(logits, greedy, [[]] * 16, [[]] * 16)
    expected = np.argmax(np.array(logits), axis=-1)
    for seed in (0, 1, 12345):
        tokens = sample(probs, [seed] * 16, list(range(16)))
        assert np.array(tokens).tolist() == expected.tolist()


def test_same_seed_same_tokens_regardless_of_batch() -> None:
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((5, 200)).astype(np.float32)
    params = [SamplingParams(temperature=1.0, top_k=50)] * 5
    probs = compute_probs(mx.array(logits), params, [[]] * 5, [[]] * 5)
    seeds, positions = [11, 22, 33, 44, 55], [3, 9, 9, 0, 100]
    batch = np.array(sample(probs, seeds, positions)).tolist()
    assert batch == np.array(sample(probs, seeds, positions)).tolist()
    for row in range(5):
        alone = compute_probs(mx.array(logits[row : row + 1]), params[:1], [[]], [[]])
        assert np.array(sample(alone, [seeds[row]], [positions[row]])).tolist() == [batch[row]]
    # Reordering the batch reorders the tokens and nothing else.
    order = [4, 2, 0, 3, 1]
    shuffled = sample(
        probs[mx.array(order)], [seeds[i] for i in order], [positions[i] for i in order]
    )
    assert np.array(shuffled).tolist() == [batch[i] for i in order]


def test_different_seeds_give_different_streams() -> None:
    probs = mx.full((1, 1000), 1 / 1000)
    draws = {
        seed: [int(sample(probs, [seed], [p]).item()) for p in range(10)] for seed in (1, 2, 3)
    }
    assert draws[1] != draws[2] != draws[3]


def test_sampled_frequencies_match_probabilities() -> None:
    num_draws = 20_000
    probs = mx.array([[0.1, 0.2, 0.0, 0.3, 0.4]] * num_draws)
    tokens = np.array(sample(probs, [42] * num_draws, list(range(num_draws))))
    counts = np.bincount(tokens, minlength=5)
    assert counts[2] == 0  # zero-probability tokens are never drawn
    expected = np.array([0.1, 0.2, 0.3, 0.4]) * num_draws
    observed = counts[[0, 1, 3, 4]]
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    assert chi_square < 16.27  # 3 degrees of freedom, p = 0.001


def test_truncated_distribution_only_yields_kept_tokens() -> None:
    num_draws = 4_000
    logits = mx.array([LOG_PROBS] * num_draws)
    params = [SamplingParams(top_k=2)] * num_draws
    probs = compute_probs(logits, params, [[]] * num_draws, [[]] * num_draws)
    tokens = np.array(sample(probs, [5] * num_draws, list(range(num_draws))))
    counts = np.bincount(tokens, minlength=4)
    assert counts[0] == counts[1] == 0
    assert abs(counts[3] / num_draws - 4 / 7) < 0.03


def test_draw_never_lands_on_a_trailing_zero_probability_token() -> None:
    # The CDF's fp32 total can be a hair below 1; u close to 1 must still land on token 1.
    probs = mx.array([[0.3, 0.7, 0.0, 0.0]] * 2000)
    tokens = np.array(sample(probs, [9] * 2000, list(range(2000))))
    assert set(tokens.tolist()) <= {0, 1}


# -- logprobs ---------------------------------------------------------------------------------


def test_logprobs_are_raw_model_logprobs_with_sorted_top_n() -> None:
    logits = mx.array([LOG_PROBS, LOG_PROBS, [0.0, 0.0, 0.0, 5.0]])
    params = [
        SamplingParams(logprobs=True, num_top_logprobs=2, temperature=0.5, top_k=1),
        SamplingParams(),
        SamplingParams(logprobs=True),
    ]
    result = compute_logprobs(logits, [1, 0, 3], params)
    first, second, third = result
    assert second is None
    assert first is not None and third is not None
    assert first.token_id == 1
    assert first.logprob == pytest.approx(math.log(0.2), abs=1e-6)
    assert first.top_ids == (3, 2)
    assert first.top_logprobs == pytest.approx((math.log(0.4), math.log(0.3)), abs=1e-6)
    assert third.top_ids == () and third.top_logprobs == ()
    assert third.logprob == pytest.approx(5 - math.log(3 + math.exp(5)), abs=1e-6)


def test_logprobs_skipped_when_no_row_asks() -> None:
    assert compute_logprobs(mx.array([LOG_PROBS]), [0], [SamplingParams()]) == [None]


@pytest.mark.parametrize("top_k", [1, 20, 999])
def test_top_k_ids_are_mlx_argpartitions_choice(top_k: int) -> None:
    # On a CPU device NumPy picks them: the same set of ids as MLX's own argpartition.
    logits = mx.random.normal((3, 1000), key=mx.random.key(top_k)) * 4
    got = np.sort(np.array(top_k_ids(logits, top_k)), axis=1)
    first = 1000 - top_k
    want = np.sort(np.array(mx.argpartition(logits, first, axis=-1)[:, first:]), axis=1)
    np.testing.assert_array_equal(got, want)
    assert top_k_ids(logits, top_k).dtype == mx.int32
