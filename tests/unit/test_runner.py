"""The runner and its slot KV cache on a tiny random llama, driven by the real scheduler.

Token-for-token equality at temperature 0 against mlx-lm's own greedy generation, with requests
of mixed prompt lengths joining and leaving mid-batch, chunked prefill and several passes per step;
then the cache seams the prefix cache and the MTP lane will use (load / read / trim).
"""

from __future__ import annotations

import random

import inference  # noqa: F401  (loads the BLAS before mlx)
from inference.runner import ModelRunner, RunnerConfig, UnsupportedModelError, plan_passes
from inference.scheduler import (
    CountingKVCapacity,
    ScheduledItem,
    ScheduledStep,
    Scheduler,
    SchedulerConfig,
)

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models import llama

from tests.fixtures.tiny_llama import write_tiny_llama


@pytest.fixture(scope="module")
def untied_model(tmp_path_factory: pytest.TempPathFactory):
    """A tiny llama with its own lm_head: greedy outputs vary more than with tied embeddings."""
    path = write_tiny_llama(tmp_path_factory.mktemp("models") / "untied", tie_word_embeddings=False)
    model, _ = load(str(path))
    return model


def mlx_lm_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    steps = generate_step(
        mx.array(prompt), model, max_tokens=num_tokens, sampler=lambda x: mx.argmax(x, axis=-1)
    )
    return [int(token) for token, _ in steps]


def run_greedy(
    model,
    prompts: dict[str, list[int]],
    num_tokens: int,
    *,
    arrivals: dict[str, int] | None = None,
    max_num_seqs: int = 4,
    budget: int = 16,
    pass_cost_tokens: int = 4,
) -> tuple[dict[str, list[int]], list[int]]:
    """Greedy-decode prompts through scheduler + runner; returns outputs and passes per step."""
    arrivals = arrivals or dict.fromkeys(prompts, 0)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs, budget), CountingKVCapacity(100_000))
    runner = ModelRunner(model, RunnerConfig(max_num_seqs, pass_cost_tokens))
    tokens = {rid: list(p) for rid, p in prompts.items()}
    outputs: dict[str, list[int]] = {rid: [] for rid in prompts}
    passes_per_step = []
    step_index = 0
    while any(len(out) < num_tokens for out in outputs.values()):
        for rid, arrival in arrivals.items():
            if arrival == step_index:
                scheduler.add_request(rid, len(prompts[rid]))
        step = scheduler.schedule()
        step_index += 1
        if not step.items:
            continue
        out = runner.execute(step, tokens)
        passes_per_step.append(out.num_passes)
        if out.logits is None:
            mx.eval(runner.cache.arrays())
            continue
        sampled = mx.argmax(out.logits, axis=-1)
        mx.eval(sampled, runner.cache.arrays())
        for rid, position, token in zip(
            out.request_ids, out.positions, sampled.tolist(), strict=True
        ):
            assert position == len(tokens[rid])
            tokens[rid].append(token)
            outputs[rid].append(token)
            scheduler.record_output(rid, 1)
            if len(outputs[rid]) == num_tokens:
                scheduler.finish(rid)
                runner.release(rid)
    return outputs, passes_per_step


def random_prompts(num: int, seed: int = 0) -> dict[str, list[int]]:
    rng = random.Random(seed)
    return {
        f"r{i}": [rng.randrange(3, 300) for _ in range(rng.choice([1, 3, 9, 17, 30, 45]))]
        for i in range(num)
    }


def test_batched_equals_mlx_lm_greedy_with_joins_and_leaves(untied_model) -> None:
    prompts = random_prompts(7)
    num_tokens = 10
    # Requests arrive every other step; 4 slots, so later ones wait for earlier ones to leave.
    arrivals = {rid: 2 * i for i, rid in enumerate(prompts)}
    outputs, passes = run_greedy(untied_model, prompts, num_tokens, arrivals=arrivals)
    for rid, prompt in prompts.items():
        assert outputs[rid] == mlx_lm_greedy(untied_model, prompt, num_tokens), rid
    assert max(passes) >= 2  # decodes and prefill chunks did share steps


def test_batched_equals_single_sequence(untied_model) -> None:
    prompts = random_prompts(5, seed=1)
    batched, _ = run_greedy(untied_model, prompts, 8, budget=24)
    for rid, prompt in prompts.items():
        alone, _ = run_greedy(untied_model, {rid: prompt}, 8, max_num_seqs=1, budget=64)
        assert batched[rid] == alone[rid], rid


def test_one_pass_when_padding_is_cheap(untied_model) -> None:
    # Two short prompts of similar length and a decode share one padded pass.
    prompts = {"a": [5, 6, 7, 8], "b": [9, 10, 11]}
    outputs, passes = run_greedy(untied_model, prompts, 3, pass_cost_tokens=64, budget=32)
    assert set(passes) == {1}
    for rid, prompt in prompts.items():
        assert outputs[rid] == mlx_lm_greedy(untied_model, prompt, 3)


def test_plan_passes_pads_only_when_cheaper_than_a_pass() -> None:
    def item(rid: str, n: int) -> ScheduledItem:
        return ScheduledItem(rid, 0, n, 0, True)

    decodes = [item(f"d{i}", 1) for i in range(15)]
    groups = plan_passes([item("p", 240), *decodes, item("v", 2)], pass_cost_tokens=16)
    # 15 decodes padded to 2 tokens cost 15 < 16: one pass; the prefill chunk runs alone.
    assert [sorted(i.request_id for i in g) for g in groups] == [
        sorted([*(d.request_id for d in decodes), "v"]),
        ["p"],
    ]
    groups = plan_passes([item("a", 30), item("b", 33), item("c", 300)], pass_cost_tokens=16)
    assert [[i.request_id for i in g] for g in groups] == [["a", "b"], ["c"]]


def test_release_moves_top_slot_and_keeps_its_kv(untied_model) -> None:
    prompts = {"a": [5, 6, 7], "b": [8, 9, 10, 11], "c": [12, 13]}
    runner = ModelRunner(untied_model, RunnerConfig(4))
    scheduler = Scheduler(SchedulerConfig(4, 64), CountingKVCapacity(1000))
    for rid, prompt in prompts.items():
        scheduler.add_request(rid, len(prompt))
    runner.execute(scheduler.schedule(), prompts)
    mx.eval(runner.cache.arrays())
    before = runner.cache.read("c", 0, 2)
    mx.eval(before)
    assert runner.cache.slot_of("c") == 2
    runner.release("a")
    assert runner.cache.slot_of("c") == 0 and runner.cache.slot_of("b") == 1
    after = runner.cache.read("c", 0, 2)
    for x, y in zip(before[0] + before[1], after[0] + after[1], strict=True):
        assert mx.array_equal(x, y).item()


def test_prefix_load_and_trim_seams(untied_model) -> None:
    """A prefix's KV copied into a new request's slot decodes exactly like recomputing it."""
    prefix = [20, 21, 22, 23, 24, 25]
    expected = mlx_lm_greedy(untied_model, prefix, 4)
    runner = ModelRunner(untied_model, RunnerConfig(2))
    scheduler = Scheduler(SchedulerConfig(2, 64), CountingKVCapacity(1000))
    scheduler.add_request("src", len(prefix))
    runner.execute(scheduler.schedule(), {"src": prefix})
    mx.eval(runner.cache.arrays())

    # Load all but the last prompt token into a fresh slot, as a prefix cache would.
    keys, values = runner.cache.read("src", 0, len(prefix) - 1)
    runner.cache.allocate("dst")
    runner.cache.load("dst", keys, values)
    scheduler.add_request("dst", len(prefix), num_cached_tokens=len(prefix) - 1)
    scheduler.finish("src")
    runner.release("src")
    tokens = {"dst": list(prefix)}
    outputs = []
    for _ in range(4):
        out = runner.execute(scheduler.schedule(), tokens)
        token = mx.argmax(out.logits, axis=-1).tolist()[0]
        tokens["dst"].append(token)
        outputs.append(token)
        scheduler.record_output("dst", 1)
    assert outputs == expected

    # Trim the last two tokens (rejected drafts) and recompute them: same tokens again.
    assert runner.cache.trim("dst", 2) == 2
    assert runner.cache.length("dst") == len(prefix) + 1
    # Recompute outputs[1:3] at positions 7 and 8; the last one predicts outputs[3] again.
    step = ScheduledStep((ScheduledItem("dst", len(prefix) + 1, 2, 0, True),))
    out = runner.execute(step, tokens)
    assert mx.argmax(out.logits, axis=-1).tolist() == [outputs[-1]]


def test_sliding_window_models_are_refused() -> None:
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=16,
        num_hidden_layers=2,
        intermediate_size=32,
        num_attention_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=32,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=4,
    )
    with pytest.raises(UnsupportedModelError, match="RotatingKVCache"):
        ModelRunner(llama.Model(args))
