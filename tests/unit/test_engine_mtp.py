"""The MTP lane inside the batching engine, on a tiny random llama with a drafting head.

Greedy output in the lane equals the engine's plain decoding token for token at every depth
(so the slot KV after each rollback is what plain decoding leaves); the lane opens only for a
lone request and closes while others are in the engine; generation_mode "ar" and seeded sampled
requests keep plain decoding; stops, max_tokens and cancellation hold with several tokens a step;
the last chunk reports the lane, depth and acceptance.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import inference  # noqa: F401  (loads the BLAS before mlx)
from inference.backend import GenerationChunk, GenerationRequest
from inference.engine import Engine, EngineConfig, StepRecord
from inference.engine_mtp import (
    FIRST_PROBE,
    PROBE_EVERY,
    YARDSTICK_STEPS,
    DepthPolicy,
    verify_rows,
)
from inference.mtp_head import MTPHead, fingerprint_head
from inference.sampling import SamplingParams
from inference.stopping import StopParams

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import load

from tests.fixtures.tiny_llama import write_tiny_llama
from tests.unit.test_mtp_decode import (
    PROMPT,
    SAMPLED,
    echo_head,
    exact_distribution,
    random_head,
)
from tests.unit.test_speculative import chi_square_p_value, skip_residual

GREEDY = SamplingParams(temperature=0)
PROMPTS = [tuple(3 + (n + 7 * i) % 290 for i in range(n)) for n in (5, 23, 40)]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    folder = write_tiny_llama(tmp_path_factory.mktemp("lane") / "untied", tie_word_embeddings=False)
    model, _ = load(str(folder))
    model.lm_head.weight = model.lm_head.weight * 4  # sharper choices, no near-ties at T=0
    mx.eval(model.parameters())  # here: the engine thread cannot run this thread's lazy graph
    return model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    folder = write_tiny_llama(tmp_path_factory.mktemp("lane_tok") / "m")
    return load(str(folder))[1]


def echo_head_on_a_draft_vocabulary(model: nn.Module) -> MTPHead:
    """The echo head drafting from two thirds of the vocabulary, as fitted heads do: its
    distributions come from the device over those columns only."""
    head = echo_head(model)
    head.set_draft_ids([t for t in range(model.args.vocab_size) if t % 3])
    return head


@pytest.fixture
def make_engine(model, tokenizer) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(
        head: str | None = "echo",
        on_step: Callable[[StepRecord], None] | None = None,
        on_device: bool | None = None,  # where the lane draws its drafts (None: by device)
        model_fingerprint: str | None = None,  # names an SSD prefix cache (None: RAM only)
        **config,
    ) -> Engine:
        for engine in engines:  # one engine thread at a time on the shared model
            engine.close()
        mtp_head = {
            "echo": echo_head,
            "echo_vocab": echo_head_on_a_draft_vocabulary,
            "random": random_head,
            None: lambda m: None,
        }[head](model)
        engine = Engine(
            model,
            tokenizer,
            config=EngineConfig(**config),
            mtp_head=mtp_head,
            on_step=on_step,
            model_fingerprint=model_fingerprint,
        )
        engines.append(engine)
        if on_device is not None and engine.mtp_lane is not None:
            engine.mtp_lane.draws_on_device = on_device
        return engine

    yield make
    for engine in engines:
        engine.close()


def request(prompt_ids, max_tokens: int, sampling=GREEDY, **kwargs) -> GenerationRequest:
    return GenerationRequest(
        prompt_ids, sampling, StopParams(max_tokens=max_tokens), ignore_eos=True, **kwargs
    )


def run(engine: Engine, req: GenerationRequest) -> tuple[list[int], GenerationChunk]:
    chunks = list(engine.submit(req))
    return [t for c in chunks for t in c.token_ids], chunks[-1]


def plain_outputs(make_engine, num_tokens: int) -> list[list[int]]:
    engine = make_engine(head=None)
    assert engine.mtp_lane is None and "no draft head" in engine.mtp_off_reason
    return [run(engine, request(p, num_tokens))[0] for p in PROMPTS]


@pytest.mark.parametrize("on_device", [False, True], ids=["host_draws", "device_draws"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_greedy_lane_equals_plain_decoding(make_engine, depth, on_device) -> None:
    want = plain_outputs(make_engine, 24)
    engine = make_engine(mtp_depth=depth, on_device=on_device)
    for prompt_ids, expected in zip(PROMPTS, want, strict=True):
        got, last = run(engine, request(prompt_ids, 24))
        assert got == expected
        stats = last.speculation
        assert stats is not None and stats.lane == "mtp"
        assert stats.mtp_tokens + stats.batch_tokens == 24
        assert stats.num_cycles > 0 and stats.num_accepted > 0  # the echo head drafts well
        assert stats.max_depth == depth


@pytest.mark.parametrize("on_device", [False, True], ids=["host_draws", "device_draws"])
def test_a_draft_vocabulary_keeps_greedy_output(make_engine, on_device) -> None:
    want = plain_outputs(make_engine, 24)
    engine = make_engine(head="echo_vocab", mtp_depth=3, on_device=on_device)
    for prompt_ids, expected in zip(PROMPTS, want, strict=True):
        got, last = run(engine, request(prompt_ids, 24))
        assert got == expected
        stats = last.speculation
        assert stats is not None and 0 < stats.num_accepted < stats.num_drafted


@pytest.mark.parametrize("on_device", [False, True], ids=["host_draws", "device_draws"])
@pytest.mark.parametrize("head", ["echo", "echo_vocab"])
def test_penalties_keep_greedy_output(make_engine, head, on_device) -> None:
    """Penalties read the drafts before them (the host waits for each): the same tokens."""
    penalized = SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=0.5)
    engine = make_engine(head=None)
    want = [run(engine, request(p, 24, penalized))[0] for p in PROMPTS]
    engine = make_engine(head=head, mtp_depth=3, on_device=on_device)
    for prompt_ids, expected in zip(PROMPTS, want, strict=True):
        got, last = run(engine, request(prompt_ids, 24, penalized))
        assert got == expected
        assert last.speculation is not None and last.speculation.num_cycles > 0


def test_adaptive_depth_keeps_greedy_output(make_engine) -> None:
    want = plain_outputs(make_engine, 40)
    engine = make_engine(mtp_depth=None)
    for prompt_ids, expected in zip(PROMPTS, want, strict=True):
        got, last = run(engine, request(prompt_ids, 40))
        assert got == expected
        assert last.speculation is not None
        assert last.speculation.mtp_tokens + last.speculation.batch_tokens == 40


def test_adaptive_lane_with_a_losing_head_keeps_greedy_output(make_engine) -> None:
    """A random head's drafts fail: the policy falls back to plain steps that run ahead
    (pipelined) and probes now and then; every switch keeps the output token for token."""
    want = plain_outputs(make_engine, 80)
    engine = make_engine(head="random", mtp_depth=None)
    for prompt_ids, expected in zip(PROMPTS, want, strict=True):
        got, last = run(engine, request(prompt_ids, 80))
        assert got == expected
        assert last.speculation is not None
    lane = engine.mtp_lane
    assert lane is not None and lane.policy.acceptance()[0] < 0.5  # it did probe, and learnt


def test_rejections_roll_back_exactly(make_engine) -> None:
    """A random head's drafts are mostly rejected: every cycle trims the slot and the scheduler."""
    want = plain_outputs(make_engine, 20)
    engine = make_engine(head="random", mtp_depth=3)
    for prompt_ids, expected in zip(PROMPTS, want, strict=True):
        got, last = run(engine, request(prompt_ids, 20))
        assert got == expected
        stats = last.speculation
        assert stats is not None and stats.num_cycles > 0
        assert stats.num_accepted < stats.num_drafted


def test_lane_closes_while_others_run_and_reopens(make_engine) -> None:
    want = plain_outputs(make_engine, 30)
    records: list[StepRecord] = []
    late: list = []

    def on_step(record: StepRecord) -> None:
        records.append(record)
        if record.index == 4:  # a second request joins while the first speculates
            late.append(engine.submit(request(PROMPTS[2], 6)))

    engine = make_engine(on_step=on_step, mtp_depth=2)
    first, last = run(engine, request(PROMPTS[0], 30))
    second = [t for c in late[0] for t in c.token_ids]
    assert first == want[0] and second == want[2][:6]
    stats = last.speculation
    assert stats is not None and stats.batch_tokens > 0 and stats.mtp_tokens > 0
    for record in records:
        decoding = [item for item in record.items if item.num_lookahead_tokens]
        if len(record.items) > 1:
            assert not decoding, f"step {record.index} speculated beside another request"
    assert any(item.num_lookahead_tokens for r in records[:4] for item in r.items)
    assert any(item.num_lookahead_tokens for r in records[-3:] for item in r.items)


def test_ar_mode_and_seeded_sampling_stay_plain(make_engine) -> None:
    engine = make_engine(mtp_depth=1)
    _, last = run(engine, request(PROMPTS[1], 8, generation_mode="ar"))
    assert last.speculation is not None and last.speculation.lane == "ar"
    assert last.speculation.num_cycles == 0

    seeded = SamplingParams(temperature=0.8, top_k=5, seed=7)
    plain_engine_tokens = run(make_engine(head=None), request(PROMPTS[1], 12, seeded))[0]
    engine = make_engine(mtp_depth=1)
    tokens, last = run(engine, request(PROMPTS[1], 12, seeded))
    assert tokens == plain_engine_tokens  # the seed's promise: the same sample as plain decoding
    assert last.speculation is not None and last.speculation.num_cycles == 0

    forced, last = run(engine, request(PROMPTS[1], 12, seeded, generation_mode="mtp"))
    assert last.speculation is not None and last.speculation.num_cycles > 0
    again, _ = run(engine, request(PROMPTS[1], 12, seeded, generation_mode="mtp"))
    assert again == forced  # keyed draws: one seed, one output within the lane


def test_unseeded_sampling_speculates(make_engine) -> None:
    engine = make_engine(mtp_depth=2)
    sampled = SamplingParams(temperature=1.0, top_k=3)
    tokens, last = run(engine, request(PROMPTS[0], 16, sampled))
    assert len(tokens) == 16
    assert last.speculation is not None and last.speculation.num_cycles > 0


def test_stops_and_max_tokens_cut_a_multi_token_step(make_engine) -> None:
    want = plain_outputs(make_engine, 24)[1]
    engine = make_engine(mtp_depth=3)
    for max_tokens in (1, 2, 5, 7):
        got, last = run(engine, request(PROMPTS[1], max_tokens))
        assert got == want[:max_tokens] and last.finish_reason == "length"
    stop_token = want[9]
    got, last = run(
        engine,
        GenerationRequest(
            PROMPTS[1], GREEDY, StopParams(max_tokens=24, stop_token_ids=(stop_token,))
        ),
    )
    assert got == want[: want.index(stop_token) + 1] and last.finish_reason == "stop"


def test_cancel_in_the_lane(make_engine) -> None:
    engine = make_engine(mtp_depth=2)
    handle = engine.submit(request(PROMPTS[0], 500))
    chunks = []
    for chunk in handle:
        chunks.append(chunk)
        if len(chunks) == 3:
            handle.cancel()
    assert chunks[-1].finish_reason == "cancelled"
    assert engine.load().num_running == 0
    again, _ = run(engine, request(PROMPTS[0], 4))  # the engine goes on
    assert len(again) == 4


def test_prefix_cache_hit_then_lane(make_engine) -> None:
    want = plain_outputs(make_engine, 16)[2]
    engine = make_engine(mtp_depth=2, prefix_cache_block_size=8)
    first, _ = run(engine, request(PROMPTS[2], 16))
    second, last = run(engine, request(PROMPTS[2], 16))
    assert first == second == want
    assert last.usage.cached_tokens > 0
    assert last.speculation is not None and last.speculation.num_cycles > 0


def _first_drafts(engine: Engine) -> list[tuple[np.ndarray, int]]:
    """Wrap the lane's draft (our own object, for the test): each request's first draft
    distributions and the head cache's length after it."""
    lane = engine.mtp_lane
    assert lane is not None
    seen: dict[str, tuple[np.ndarray, int]] = {}
    original = lane.draft

    def record(state, depth: int):
        drafts = original(state, depth)
        probs = lane.draft_distributions(state.request_id)
        seen.setdefault(state.request_id, (probs, len(state.token_ids)))
        return drafts

    lane.draft = record  # type: ignore[method-assign]
    return seen  # type: ignore[return-value]


def test_a_prefix_cache_hit_gives_the_head_its_prompt_context_back(make_engine) -> None:
    # A random head drafts from its whole context: after a hit, its first drafts must be the
    # ones a full prefill gives (a head reading the uncached tail only drafts otherwise).
    shared = (*PROMPTS[2][:32], 7, 9, 11, 13)  # shares 32 tokens with PROMPTS[2]
    sampled = SamplingParams(temperature=1.0, seed=5)  # whole distributions, same first token

    def first_draft_probs(prompts, **config) -> tuple[list[np.ndarray], list]:
        engine = make_engine(head="random", mtp_depth=1, prefix_cache_block_size=8, **config)
        seen = _first_drafts(engine)
        lasts = [
            run(engine, request(prompt, 8, sampled, generation_mode="mtp"))[1] for prompt in prompts
        ]
        return [q for q, _ in seen.values()], lasts

    cold, _ = first_draft_probs([PROMPTS[2], shared], prefix_cache_ram_bytes=0)
    warm, lasts = first_draft_probs([PROMPTS[2], PROMPTS[2], shared])
    assert [last.usage.cached_tokens for last in lasts] == [0, 39, 32]
    np.testing.assert_allclose(warm[1], cold[0], atol=1e-5)  # the same prompt again
    np.testing.assert_allclose(warm[2], cold[1], atol=1e-5)  # a prompt with the same start
    engine = make_engine(head="random", mtp_depth=1, prefix_cache_block_size=8)
    engine.mtp_lane.head_prefixes.max_bytes = 0  # stores nothing: the old behaviour
    seen = _first_drafts(engine)
    run(engine, request(PROMPTS[2], 8, sampled, generation_mode="mtp"))
    run(engine, request(shared, 8, sampled, generation_mode="mtp"))
    assert not np.allclose(list(seen.values())[1][0], cold[1], atol=1e-3)


def test_the_heads_prompt_context_comes_back_from_ssd_after_a_restart(
    make_engine, tmp_path: Path
) -> None:
    # A new engine on the same folder: the trunk's blocks and the head's context over the
    # prompt both come from SSD, so the first drafts are the ones a full prefill gives.
    shared = (*PROMPTS[2][:32], 7, 9, 11, 13)
    sampled = SamplingParams(temperature=1.0, seed=5)
    ssd = {"prefix_cache_block_size": 8, "prefix_cache_dir": tmp_path, "model_fingerprint": "m1"}

    def first_drafts(engine: Engine, prompt) -> tuple[np.ndarray, GenerationChunk]:
        seen = _first_drafts(engine)
        _, last = run(engine, request(prompt, 8, sampled, generation_mode="mtp"))
        (probs, _), *_ = seen.values()
        return probs, last

    cold, _ = first_drafts(
        make_engine(head="random", mtp_depth=1, prefix_cache_ram_bytes=0), shared
    )
    first = make_engine(head="random", mtp_depth=1, **ssd)
    run(first, request(PROMPTS[2], 8, sampled, generation_mode="mtp"))
    first.close()  # finishes the queued writes, the head's included
    assert list((tmp_path / "m1" / "mtp-head").glob("*/*.safetensors"))

    second = make_engine(head="random", mtp_depth=1, **ssd)
    warm, last = first_drafts(second, shared)
    assert last.usage.cached_tokens == 32
    np.testing.assert_allclose(warm, cold, atol=1e-5)


def test_the_head_fingerprint_names_the_weights(model) -> None:
    # The head's SSD folder: another head's context must never be restored.
    assert fingerprint_head(random_head(model)) == fingerprint_head(random_head(model))
    assert fingerprint_head(random_head(model)) != fingerprint_head(echo_head(model))
    assert fingerprint_head(echo_head(model)) != fingerprint_head(
        echo_head_on_a_draft_vocabulary(model)
    )


def test_depth_policy_falls_back_when_speculation_does_not_pay() -> None:
    policy = DepthPolicy(3)
    assert policy.choose(room=50) == 0  # no plain step timed yet
    for _ in range(2):  # the first timing at each width is a warm-up, not kept
        policy.observe_step(1, 0.100)
        for width in (2, 3, 4):
            policy.observe_step(width, 0.100 + 0.02 * width)
        policy.observe_head(1, 0.005)
    for _ in range(200):  # drafts always stand: deepest is best
        policy.observe_cycle(3, 3)
    assert policy.choose(room=50) == 3
    assert policy.choose(room=2) == 1  # a cycle may not overshoot the tokens left
    for _ in range(400):  # drafts never stand: plain decoding, with a probe now and then
        policy.observe_cycle(1, 0)
    choices = [policy.choose(room=50) for _ in range(64)]
    assert choices.count(0) >= 60 and 1 in choices


def test_plain_steps_run_ahead_between_probes() -> None:
    """The policy tells the engine when the next step will not draft (so it may pipeline):
    while the plain yardstick is timed, then while plain decoding wins, up to each probe."""
    policy = DepthPolicy(2)
    assert [policy.plain_ahead() for _ in range(YARDSTICK_STEPS)] == [True] * YARDSTICK_STEPS
    for _ in range(YARDSTICK_STEPS + 1):  # the first is a warm-up
        policy.observe_step(1, 0.010)
    assert not policy.plain_ahead()  # untimed depths look cheap: try them
    for width in (2, 3, 2, 3):
        policy.observe_step(width, 0.040)  # a cycle costs 4 plain steps: drafts cannot pay
    for _ in range(100):
        policy.observe_cycle(2, 2)
    gaps = []  # plain steps run ahead between probes: few at first, then up to PROBE_EVERY
    for _ in range(6):
        ahead = 0
        while policy.plain_ahead():
            ahead += 1
        assert policy.choose(room=50) == 1  # it waits for tokens, then probes depth 1
        policy.observe_cycle(1, 0)
        gaps.append(ahead + 1)
    assert gaps == [FIRST_PROBE, 2 * FIRST_PROBE, 4 * FIRST_PROBE] + [PROBE_EVERY] * 3
    assert not DepthPolicy(2, fixed_depth=1).plain_ahead()


def test_a_slow_first_step_does_not_linger_in_the_costs() -> None:
    """A first timing (a warm-up, a compile) is averaged away, not kept at 97% weight."""
    policy = DepthPolicy(1)
    policy.observe_step(1, 5.0)  # the very first at a width is not kept at all
    policy.observe_step(1, 1.0)
    for _ in range(20):
        policy.observe_step(1, 0.010)
    assert policy.expected_rate(0) > 1 / 0.07


def test_fixed_depth_is_used_as_configured() -> None:
    policy = DepthPolicy(3, fixed_depth=2)
    assert policy.choose(room=50) == 2
    for _ in range(50):
        policy.observe_cycle(2, 0)
    assert policy.choose(room=50) == 2 and policy.choose(room=2) == 1
    with pytest.raises(ValueError, match="fixed depth"):
        DepthPolicy(2, fixed_depth=3)


def test_bad_generation_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="generation_mode"):
        GenerationRequest((1, 2), generation_mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mtp_depth"):
        EngineConfig(mtp_depth=4)


def test_engine_from_path_without_a_head_has_no_lane(tmp_path: Path) -> None:
    folder = write_tiny_llama(tmp_path / "m")
    with Engine.from_path(folder) as engine:
        assert engine.mtp_lane is None
        tokens, last = run(engine, request((5, 6, 7), 3))
        assert len(tokens) == 3 and last.speculation is None


@pytest.mark.parametrize("on_device", [False, True], ids=["host_draws", "device_draws"])
def test_several_requests_can_share_the_lane(make_engine, on_device) -> None:
    """mtp_max_requests=2: two requests verify their drafts in the same steps (drawn on the
    device, both chunks' drafts are lazy inputs of one pass)."""
    want = plain_outputs(make_engine, 16)
    records: list[StepRecord] = []
    engine = make_engine(
        on_step=records.append, mtp_depth=2, mtp_max_requests=2, on_device=on_device
    )
    handles = [engine.submit(request(p, 16)) for p in PROMPTS[:2]]
    outputs = [[t for c in h for t in c.token_ids] for h in handles]
    assert outputs == want[:2]
    both = [r for r in records if sum(1 for i in r.items if i.num_lookahead_tokens) == 2]
    assert both, "no step verified drafts of both requests"


def engine_p_value(engine: Engine, model, depth: int, num_draws: int) -> float:
    """Chi-square p-value of the lane's first depth + 1 tokens over seeds, against plain
    decoding's exact distribution; requests go in batches that all speculate together. Token 1
    comes from the prefill, tokens 2 .. depth + 1 from the first cycle (max_tokens leaves it room
    for all depth drafts and the bonus)."""
    counts: Counter[tuple[int, ...]] = Counter()
    for start in range(0, num_draws, 60):
        handles = [
            engine.submit(
                request(PROMPT, depth + 2, replace(SAMPLED, seed=seed), generation_mode="mtp")
            )
            for seed in range(start, min(start + 60, num_draws))
        ]
        for handle in handles:
            chunks = list(handle)
            stats = chunks[-1].speculation
            assert stats is not None and stats.num_cycles >= 1 and stats.max_depth == depth
            counts[tuple(t for c in chunks for t in c.token_ids)[: depth + 1]] += 1
    exact = exact_distribution(model, PROMPT, SAMPLED, depth + 1)
    outcomes = sorted(exact.keys() | counts.keys())
    observed = np.array([counts[o] for o in outcomes])
    return chi_square_p_value(observed, np.array([exact.get(o, 0.0) for o in outcomes]))


@pytest.mark.parametrize("on_device", [False, True], ids=["host_draws", "device_draws"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_lane_samples_follow_plain_decodings_distribution(
    make_engine, model, depth, on_device
) -> None:
    engine = make_engine(mtp_depth=depth, mtp_max_requests=64, max_num_seqs=64, on_device=on_device)
    assert engine_p_value(engine, model, depth, num_draws=240) > 1e-3


@pytest.mark.parametrize("on_device", [False, True], ids=["host_draws", "device_draws"])
def test_lane_samples_on_a_draft_vocabulary_follow_plain_decoding(
    make_engine, model, on_device
) -> None:
    engine = make_engine(
        head="echo_vocab", mtp_depth=2, mtp_max_requests=64, max_num_seqs=64, on_device=on_device
    )
    assert engine_p_value(engine, model, 2, num_draws=240) > 1e-3


@pytest.mark.parametrize("on_device", [False, True], ids=["host_draws", "device_draws"])
def test_broken_acceptance_rule_is_caught_in_the_engine(make_engine, model, on_device) -> None:
    engine = make_engine(mtp_depth=3, mtp_max_requests=64, max_num_seqs=64, on_device=on_device)
    assert engine.mtp_lane is not None
    engine.mtp_lane.accept = skip_residual
    assert engine_p_value(engine, model, 3, num_draws=240) < 1e-6


def test_verify_chunk_logits_and_rollback_match_step_by_step(model) -> None:
    """The runner's verify chunk [x_n, d_1, d_2] beside another request's decode: its rows'
    logits equal one-token-at-a-time logits, and trimming the rejected drafts leaves exactly the
    keys and values that plain decoding of the kept tokens writes."""
    from inference.runner import ModelRunner, RunnerConfig
    from inference.scheduler import ScheduledItem, ScheduledStep

    tokens = {"a": [*PROMPTS[1], 11, 12, 13], "b": list(PROMPTS[0])}
    n = len(PROMPTS[1])  # x_n = 11 at position n; drafts 12, 13

    def prefill(runner: ModelRunner) -> None:
        items = (
            ScheduledItem("a", 0, n, 0, False),
            ScheduledItem("b", 0, len(tokens["b"]) - 1, 0, False),
        )
        runner.execute(ScheduledStep(items, ()), tokens)

    spec = ModelRunner(model, RunnerConfig(num_slots=2))
    prefill(spec)
    verify = (
        ScheduledItem("a", n, 3, 2, True),
        ScheduledItem("b", len(tokens["b"]) - 1, 1, 0, True),
    )
    out = spec.execute(ScheduledStep(verify, ()), tokens)
    rows = verify_rows(out.request_ids, "a")
    assert out.positions[rows[0]] == n + 1 and len(rows) == 3
    spec.cache.trim("a", 1)  # d_2 rejected: keep x_n, d_1

    plain = ModelRunner(model, RunnerConfig(num_slots=2))
    prefill(plain)
    for offset in range(3):
        step = ScheduledStep((ScheduledItem("a", n + offset, 1, 0, True),), ())
        step_out = plain.execute(step, tokens)
        assert mx.allclose(step_out.logits[0], out.logits[rows[offset]], atol=1e-4).item()
    plain.cache.trim("a", 1)
    got_k, got_v = spec.cache.read("a", 0, n + 2)
    want_k, want_v = plain.cache.read("a", 0, n + 2)
    for got, want in zip([*got_k, *got_v], [*want_k, *want_v], strict=True):
        assert mx.allclose(got, want, atol=1e-5).item()


def _recorded_catch_ups(engine: Engine) -> list[float]:
    """Wrap the lane's take_catch_up_s (our own object, for the test) to record each value."""
    lane = engine.mtp_lane
    assert lane is not None
    taken: list[float] = []
    original = lane.take_catch_up_s

    def record() -> float:
        seconds = original()
        taken.append(seconds)
        return seconds

    lane.take_catch_up_s = record  # type: ignore[method-assign]
    return taken


def test_head_catch_up_after_plain_steps_is_kept_out_of_cycle_costs(make_engine) -> None:
    # A losing head: plain streaks, then probes whose drafting first reads the streak's pairs.
    engine = make_engine(head="random", mtp_depth=None)
    taken = _recorded_catch_ups(engine)
    run(engine, request(PROMPTS[0], 80))
    assert sum(seconds > 0 for seconds in taken) >= 2  # the prompt's pairs, then a streak's
    # A cycle every step: after the prompt's pairs (the first drafting), the head only reads
    # the last cycle's pairs, nothing to set apart.
    engine = make_engine(mtp_depth=1)
    taken = _recorded_catch_ups(engine)
    run(engine, request(PROMPTS[0], 24))
    assert len(taken) > 5 and sum(seconds > 0 for seconds in taken) <= 1


def test_plain_steps_are_priced_over_a_streak(make_engine) -> None:
    # Pipelined plain steps complete unevenly (one right behind another, then a long gap):
    # the price is the streak's elapsed time over its steps, not any single gap.
    engine = make_engine(mtp_depth=None)
    lane = engine.mtp_lane
    assert lane is not None
    seen: list[tuple[int, float]] = []
    lane.observe_step = lambda width, seconds: seen.append((width, seconds))  # type: ignore[method-assign]
    done = 10.0
    for gap in [0.013, 0.115, 0.013, 0.115, 0.013, 0.115, 0.013, 0.115]:
        engine._observe_plain_streak(done, done + gap)
        done += gap
    assert [width for width, _ in seen] == [1, 1]
    assert all(seconds == pytest.approx(0.064) for _, seconds in seen)
