"""The MTP speculative lane on a tiny random llama with a generic head: greedy output equal to plain
decoding, verify-pass logits equal to step-by-step ones, caches equal to plain decoding's after every
cycle, and sampled output distributed as plain decoding's (chi-square against exact enumeration)."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence

import inference  # noqa: F401  (BLAS before mlx)
from inference.mtp_decode import MTPDecoder, Trunk, UnsupportedModelError, decode_plain
from inference.mtp_head import HiddenSource, MTPHead, make_generic_head
from inference.sampling import SamplingParams, compute_probs

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, make_prompt_cache

from tests.fixtures.tiny_llama import write_tiny_llama
from tests.unit.test_speculative import chi_square_p_value, skip_residual

PROMPT = [277, 297, 292, 223, 304, 261, 319, 288]
GREEDY = SamplingParams(temperature=0.0, seed=3)
SAMPLED = SamplingParams(temperature=1.0, top_k=2, top_p=0.9)


@pytest.fixture(scope="module")
def trunk(tmp_path_factory: pytest.TempPathFactory) -> Trunk:
    """A tiny llama with its own lm_head: greedy decoding wanders instead of repeating one token."""
    folder = write_tiny_llama(tmp_path_factory.mktemp("mtp") / "untied", tie_word_embeddings=False)
    model, _ = mlx_lm.load(str(folder))
    model.lm_head.weight = model.lm_head.weight * 4  # sharper choices, no near-ties at T=0
    return Trunk(model)


def make_echo(
    head: MTPHead, seed: int = 1, *, block_scale: float = 0.5, hidden_scale: float = 0.5
) -> MTPHead:
    """Make `head` draft well on these random trunks. Their residual stream is dominated by the
    (scaled) embedding of the current token, so logits ~ lm_head(norm(embed(x))): what a head whose
    fc passes the embedding of x_{t+1} through computes. The hidden half stays small, not zero,
    so which trunk hidden feeds the head still matters."""
    mx.random.seed(seed)
    size = head.fc.weight.shape[0]
    noise = hidden_scale * mx.random.normal((size, size)) / math.sqrt(size)
    head.fc.weight = mx.concatenate([mx.eye(size), noise], axis=1).astype(head.fc.weight.dtype)
    for layer in head.layers:
        layer.self_attn.o_proj.weight = layer.self_attn.o_proj.weight * block_scale
        layer.mlp.down_proj.weight = layer.mlp.down_proj.weight * block_scale
    return head


def random_head(model: nn.Module, source: HiddenSource = "post_norm") -> MTPHead:
    mx.random.seed(1)
    return make_generic_head(model, hidden_source=source)


def echo_head(model: nn.Module, source: HiddenSource = "post_norm") -> MTPHead:
    return make_echo(random_head(model, source))


class PlainReference:
    """Plain decoding's trunk cache and hiddens, advanced one token per forward pass."""

    def __init__(self, trunk: Trunk, source: HiddenSource, prompt_ids: Sequence[int]) -> None:
        self.trunk = trunk
        self.source = source
        self.cache = make_prompt_cache(trunk.model)
        hiddens, _ = trunk.forward(prompt_ids, self.cache, source)
        self.hiddens = [hiddens]
        self.num_tokens = len(prompt_ids)

    def advance(self, token_ids: Sequence[int]) -> mx.array:
        """Feed token_ids[num_tokens:] one at a time; returns (1, len(token_ids), H) hiddens."""
        for token in token_ids[self.num_tokens :]:
            self.hiddens.append(self.trunk.forward([token], self.cache, self.source)[0])
        self.num_tokens = len(token_ids)
        return mx.concatenate(self.hiddens, axis=1)


def assert_caches_equal(got: list, want: list, atol: float = 1e-5) -> None:
    """KV caches equal up to their offsets; recurrent (ArraysCache) states equal outright."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert type(g) is type(w)
        if isinstance(w, KVCache):
            assert g.offset == w.offset
            for g_array, w_array in ((g.keys, w.keys), (g.values, w.values)):
                np.testing.assert_allclose(
                    np.array(g_array[..., : g.offset, :]),
                    np.array(w_array[..., : w.offset, :]),
                    atol=atol,
                )
        else:
            for g_array, w_array in zip(g.cache, w.cache, strict=True):
                np.testing.assert_allclose(np.array(g_array), np.array(w_array), atol=atol)


def reference_head_cache(
    head: MTPHead, trunk: Trunk, token_ids: Sequence[int], hiddens: mx.array, num_pairs: int
) -> list[KVCache]:
    """The head's cache after reading pairs (h_i, x_{i+1}) for i < num_pairs in one pass."""
    cache = head.make_cache()
    head(trunk.embed(token_ids[1 : num_pairs + 1]), hiddens[:, :num_pairs], cache)
    return cache


def check_cycles_against_plain(
    trunk: Trunk, head: MTPHead, depth: int, params: SamplingParams, num_cycles: int
) -> set[int]:
    """Run cycles and, after each, compare every cache with plain decoding's; returns the
    accepted counts seen."""
    source = head.config.hidden_source
    decoder = MTPDecoder(trunk, head, params, depth)
    decoder.prefill(PROMPT)
    reference = PlainReference(trunk, source, PROMPT)
    seen = set()
    for _ in range(num_cycles):
        seen.add(decoder.step().num_accepted)
        n = len(decoder.token_ids) - 1  # x_n is committed but not yet through the trunk
        hiddens = reference.advance(decoder.token_ids[:n])
        assert_caches_equal(decoder.trunk_cache, reference.cache)
        num_pairs = n - decoder.num_pending
        np.testing.assert_allclose(
            np.array(decoder.pending_hiddens), np.array(hiddens[:, num_pairs:n]), atol=1e-5
        )
        want = reference_head_cache(head, trunk, decoder.token_ids, hiddens, num_pairs)
        assert_caches_equal(decoder.head_cache, want, atol=1e-4)
    return seen


def exact_distribution(
    model: nn.Module, prompt_ids: Sequence[int], params: SamplingParams, num_tokens: int
) -> dict[tuple[int, ...], float]:
    """Plain decoding's distribution over its first num_tokens tokens, by enumeration."""
    outcomes: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(num_tokens):
        grown: dict[tuple[int, ...], float] = {}
        for prefix, mass in outcomes.items():
            logits = model(mx.array([[*prompt_ids, *prefix]]))[0, -1:]
            probs = np.array(compute_probs(logits, [params], [prompt_ids], [list(prefix)]))[0]
            for token in np.nonzero(probs)[0]:
                grown[(*prefix, int(token))] = mass * float(probs[token])
        outcomes = grown
    return outcomes


def sampled_p_value(
    trunk: Trunk, head: MTPHead, depth: int, *, num_draws: int, accept=None
) -> float:
    """Chi-square p-value of the lane's first depth + 1 tokens over seeds 0..num_draws-1."""
    num_tokens = depth + 1  # token 1 from prefill, then every draft position of the first cycle
    kwargs = {"accept": accept} if accept else {}
    counts = Counter(
        tuple(
            MTPDecoder(
                trunk, head, dataclasses.replace(SAMPLED, seed=seed), depth, **kwargs
            ).generate(PROMPT, num_tokens)
        )
        for seed in range(num_draws)
    )
    exact = exact_distribution(trunk.model, PROMPT, SAMPLED, num_tokens)
    outcomes = sorted(exact.keys() | counts.keys())
    observed = np.array([counts[o] for o in outcomes])
    return chi_square_p_value(observed, np.array([exact.get(o, 0.0) for o in outcomes]))


# -- tests -------------------------------------------------------------------------------------


def test_plain_reference_is_mlx_lm_greedy(trunk: Trunk):
    steps = generate_step(mx.array(PROMPT), trunk.model, max_tokens=12)
    assert decode_plain(trunk.model, PROMPT, GREEDY, 12) == [int(t) for t, _ in steps]


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize(
    ("make_head", "source"),
    [(random_head, "post_norm"), (echo_head, "post_norm"), (echo_head, "pre_norm")],
)
def test_greedy_output_is_plain_decoding_token_for_token(trunk, make_head, source, depth):
    want = decode_plain(trunk.model, PROMPT, GREEDY, 24)
    decoder = MTPDecoder(trunk, make_head(trunk.model, source), GREEDY, depth)
    assert list(decoder.generate(PROMPT, 24)) == want
    if make_head is echo_head:  # drafts did stand, so accepted paths were exercised
        assert decoder.stats.accepted_at[0] > 0


def assert_verify_pass_equals_step_by_step(trunk: Trunk, source: HiddenSource) -> None:
    """Logits, hiddens and caches of one pass over 4 tokens equal those of 4 single steps."""
    tokens = [5, 17, 200, 64]
    one_pass, step_by_step = make_prompt_cache(trunk.model), make_prompt_cache(trunk.model)
    trunk.forward(PROMPT, one_pass, source)
    trunk.forward(PROMPT, step_by_step, source)
    hiddens, logits = trunk.forward(tokens, one_pass, source)
    steps = [trunk.forward([t], step_by_step, source) for t in tokens]
    step_hiddens = mx.concatenate([h for h, _ in steps], axis=1)
    step_logits = mx.concatenate([lg for _, lg in steps], axis=1)
    np.testing.assert_allclose(np.array(logits), np.array(step_logits), atol=1e-4)
    np.testing.assert_allclose(np.array(hiddens), np.array(step_hiddens), atol=1e-4)
    # And the split trunk gives the model's own logits.
    whole = trunk.model(mx.array([[*PROMPT, *tokens]]))[:, -len(tokens) :]
    np.testing.assert_allclose(np.array(whole), np.array(logits), atol=1e-4)
    assert_caches_equal(one_pass, step_by_step)


@pytest.mark.parametrize("source", ["pre_norm", "post_norm"])
def test_verify_pass_equals_step_by_step(trunk: Trunk, source: HiddenSource):
    assert_verify_pass_equals_step_by_step(trunk, source)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_caches_equal_plain_decodings_after_every_cycle(trunk: Trunk, depth: int):
    params = SamplingParams(temperature=1.0, top_k=3, seed=11)
    seen = check_cycles_against_plain(trunk, echo_head(trunk.model, "pre_norm"), depth, params, 8)
    assert 0 in seen and depth in seen  # rejected at once, and all stood (bonus)


def test_partial_acceptance_rolls_back_mid_cycle(trunk: Trunk):
    params = SamplingParams(temperature=1.0, top_k=3, seed=2)
    seen = check_cycles_against_plain(trunk, echo_head(trunk.model), 3, params, 12)
    assert seen & {1, 2}


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_sampled_tokens_follow_plain_decodings_distribution(trunk: Trunk, depth: int):
    assert sampled_p_value(trunk, echo_head(trunk.model), depth, num_draws=240) > 1e-3


def test_broken_acceptance_rule_is_caught(trunk: Trunk):
    # Resampling a rejected position from p instead of (p - q)+ over-weights the drafts' tokens.
    head = echo_head(trunk.model)
    assert sampled_p_value(trunk, head, 3, num_draws=240, accept=skip_residual) < 1e-6


def test_exact_head_on_a_bigram_trunk_is_always_accepted(tmp_path_factory):
    # With attention and MLP outputs zeroed the trunk's next token depends on the current one
    # only, which an echo head without noise computes exactly: every draft at every depth stands.
    folder = write_tiny_llama(tmp_path_factory.mktemp("mtp") / "bigram", tie_word_embeddings=False)
    model, _ = mlx_lm.load(str(folder))
    for layer in model.layers:
        layer.self_attn.o_proj.weight = mx.zeros_like(layer.self_attn.o_proj.weight)
        layer.mlp.down_proj.weight = mx.zeros_like(layer.mlp.down_proj.weight)
    head = make_echo(random_head(model), hidden_scale=0.0)
    for depth in (1, 2, 3):
        decoder = MTPDecoder(model, head, GREEDY, depth)
        assert list(decoder.generate(PROMPT, 17)) == decode_plain(model, PROMPT, GREEDY, 17)
        assert decoder.stats.acceptance_by_depth == [1.0] * depth
        assert decoder.stats.tokens_per_cycle == depth + 1


def test_generate_stops_at_max_tokens_and_counts_acceptance(trunk: Trunk):
    decoder = MTPDecoder(trunk, echo_head(trunk.model), GREEDY, 3)
    assert len(list(decoder.generate(PROMPT, 10))) == 10
    stats = decoder.stats
    assert stats.num_cycles >= 3
    assert stats.acceptance_by_depth == sorted(stats.acceptance_by_depth, reverse=True)
    assert 1 <= stats.tokens_per_cycle <= 4


def test_bad_arguments_are_refused(trunk: Trunk):
    head = random_head(trunk.model)
    with pytest.raises(ValueError, match=r"depth must be in 1\.\.3, got 4"):
        MTPDecoder(trunk, head, GREEDY, 4)
    decoder = MTPDecoder(trunk, head, GREEDY, 1)
    with pytest.raises(ValueError, match="at least one token"):
        decoder.prefill([])
    decoder.prefill(PROMPT)
    with pytest.raises(RuntimeError, match="once"):
        decoder.prefill(PROMPT)


class _SoftCapped(nn.Module):
    """A model whose logits are not lm_head(final hidden)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model
        self.model = model.model
        self.lm_head = model.lm_head

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        return 30 * mx.tanh(self.inner(inputs, cache=cache) / 30)


def test_models_with_post_processed_logits_are_refused(trunk: Trunk):
    with pytest.raises(UnsupportedModelError, match="lm_head"):
        Trunk(_SoftCapped(trunk.model))
