"""Scheduler tests: exact chunks per step for budgets, interleaving, FIFO, preemption and abort."""

from __future__ import annotations

from inference.scheduler import (
    CountingKVCapacity,
    ScheduledItem,
    ScheduledStep,
    Scheduler,
    SchedulerConfig,
)

import pytest


def make_scheduler(
    max_num_seqs: int = 4, max_num_batched_tokens: int = 8, kv_tokens: int = 10_000
) -> tuple[Scheduler, CountingKVCapacity]:
    kv = CountingKVCapacity(kv_tokens)
    config = SchedulerConfig(max_num_seqs, max_num_batched_tokens)
    return Scheduler(config, kv), kv


def chunks(step: ScheduledStep) -> list[tuple[str, int, int]]:
    """(request_id, start_position, num_tokens) per item."""
    return [(i.request_id, i.start_position, i.num_tokens) for i in step.items]


def step_and_sample(scheduler: Scheduler) -> ScheduledStep:
    """One engine step: schedule, then one sampled token for every chunk that produces one."""
    step = scheduler.schedule()
    for item in step.items:
        if item.produces_token:
            scheduler.record_output(item.request_id, 1)
    return step


# -- config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_num_seqs": 0},
        {"max_num_seqs": -1},
        {"max_num_batched_tokens": 0},
        {"max_num_seqs": 2.5},
        {"max_num_seqs": 8, "max_num_batched_tokens": 4},
    ],
)
def test_config_rejects_bad_limits(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(**kwargs)


def test_config_is_frozen() -> None:
    config = SchedulerConfig()
    with pytest.raises(AttributeError):
        config.max_num_seqs = 3  # type: ignore[misc]


# -- one request ---------------------------------------------------------------------------


def test_long_prompt_is_chunked_then_decodes_one_token_per_step() -> None:
    scheduler, _ = make_scheduler(max_num_batched_tokens=4)
    scheduler.add_request("a", 10)
    steps = [step_and_sample(scheduler) for _ in range(5)]
    assert [chunks(s) for s in steps] == [
        [("a", 0, 4)],
        [("a", 4, 4)],
        [("a", 8, 2)],
        [("a", 10, 1)],
        [("a", 11, 1)],
    ]
    assert [s.items[0].produces_token for s in steps] == [False, False, True, True, True]
    assert all(s.items[0].num_lookahead_tokens == 0 for s in steps)


def test_request_without_recorded_output_is_not_scheduled() -> None:
    scheduler, _ = make_scheduler()
    scheduler.add_request("a", 3)
    assert chunks(scheduler.schedule()) == [("a", 0, 3)]
    # The runner has not reported the sampled token yet: nothing is left to compute.
    assert scheduler.schedule().items == ()
    scheduler.record_output("a", 1)
    assert chunks(scheduler.schedule()) == [("a", 3, 1)]


def test_step_properties() -> None:
    step = ScheduledStep(
        items=(ScheduledItem("a", 0, 3, 0, True), ScheduledItem("b", 7, 1, 0, True)),
    )
    assert step.num_tokens == 4
    assert step.request_ids == ("a", "b")
    assert step.preempted_ids == ()


# -- interleaving -------------------------------------------------------------------------


def test_long_prompt_arriving_mid_stream_never_stalls_decodes() -> None:
    scheduler, _ = make_scheduler(max_num_seqs=4, max_num_batched_tokens=8)
    scheduler.add_request("a", 2)
    scheduler.add_request("b", 3)
    assert chunks(step_and_sample(scheduler)) == [("a", 0, 2), ("b", 0, 3)]
    scheduler.add_request("long", 20)
    steps = [step_and_sample(scheduler) for _ in range(4)]
    # Every step: one decode token each for a and b, the other 6 tokens go to the long prompt.
    assert [chunks(s) for s in steps] == [
        [("a", 2, 1), ("b", 3, 1), ("long", 0, 6)],
        [("a", 3, 1), ("b", 4, 1), ("long", 6, 6)],
        [("a", 4, 1), ("b", 5, 1), ("long", 12, 6)],
        [("a", 5, 1), ("b", 6, 1), ("long", 18, 2)],
    ]
    assert [s.items[2].produces_token for s in steps] == [False, False, False, True]
    assert chunks(step_and_sample(scheduler)) == [("a", 6, 1), ("b", 7, 1), ("long", 20, 1)]


def test_older_prompt_catching_up_gets_budget_before_new_admissions() -> None:
    scheduler, _ = make_scheduler(max_num_seqs=4, max_num_batched_tokens=8)
    scheduler.add_request("first", 12)
    scheduler.add_request("second", 5)
    assert chunks(step_and_sample(scheduler)) == [("first", 0, 8)]
    # first's remaining 4 tokens come before second's admission, which gets what is left.
    assert chunks(step_and_sample(scheduler)) == [("first", 8, 4), ("second", 0, 4)]
    assert chunks(step_and_sample(scheduler)) == [("first", 12, 1), ("second", 4, 1)]


def test_two_prompts_catching_up_share_budget_oldest_first() -> None:
    scheduler, _ = make_scheduler(max_num_seqs=4, max_num_batched_tokens=8)
    scheduler.add_request("a", 10)
    assert chunks(step_and_sample(scheduler)) == [("a", 0, 8)]
    scheduler.add_request("b", 10)
    # Pass 1 gives a 1 token; pass 2 tops a up to its need (2) before b is admitted with 6.
    assert chunks(step_and_sample(scheduler)) == [("a", 8, 2), ("b", 0, 6)]
    # a decodes (1), b catches up on its last 4 tokens.
    assert chunks(step_and_sample(scheduler)) == [("a", 10, 1), ("b", 6, 4)]


def test_budget_left_by_decodes_admits_a_prompt_one_token_at_a_time() -> None:
    scheduler, _ = make_scheduler(max_num_seqs=4, max_num_batched_tokens=4)
    for request_id in "abc":
        scheduler.add_request(request_id, 1)
    step_and_sample(scheduler)
    scheduler.add_request("e", 3)
    decodes = [("a", 1, 1), ("b", 1, 1), ("c", 1, 1)]
    assert chunks(step_and_sample(scheduler)) == [*decodes, ("e", 0, 1)]
    step = step_and_sample(scheduler)
    assert chunks(step)[3] == ("e", 1, 1)
    step = step_and_sample(scheduler)
    assert chunks(step)[3] == ("e", 2, 1)
    assert step.items[3].produces_token


# -- admission ----------------------------------------------------------------------------


def test_admission_is_fifo_and_capped_by_max_num_seqs() -> None:
    scheduler, _ = make_scheduler(max_num_seqs=2, max_num_batched_tokens=16)
    for request_id in ("a", "b", "c", "d"):
        scheduler.add_request(request_id, 2)
    assert chunks(step_and_sample(scheduler)) == [("a", 0, 2), ("b", 0, 2)]
    assert scheduler.waiting_ids == ("c", "d")
    scheduler.finish("b")
    assert chunks(step_and_sample(scheduler)) == [("a", 2, 1), ("c", 0, 2)]
    scheduler.finish("a")
    assert chunks(step_and_sample(scheduler)) == [("c", 2, 1), ("d", 0, 2)]
    assert scheduler.waiting_ids == ()


def test_back_pressure_keeps_queue_order_when_kv_is_full() -> None:
    scheduler, kv = make_scheduler(max_num_seqs=4, max_num_batched_tokens=16, kv_tokens=10)
    scheduler.add_request("a", 6)
    assert chunks(step_and_sample(scheduler)) == [("a", 0, 6)]
    scheduler.add_request("big", 6)  # 7 + 6 > 10: must wait
    scheduler.add_request("small", 1)  # would fit, but must not overtake "big"
    assert chunks(step_and_sample(scheduler)) == [("a", 6, 1)]
    assert scheduler.waiting_ids == ("big", "small")
    assert kv.num_free_blocks == 3
    scheduler.finish("a")
    assert kv.num_free_blocks == 10
    assert chunks(step_and_sample(scheduler)) == [("big", 0, 6), ("small", 0, 1)]


def test_cached_prefix_is_skipped_and_last_prompt_token_always_runs() -> None:
    scheduler, kv = make_scheduler()
    scheduler.add_request("hit", 6, num_cached_tokens=4)
    scheduler.add_request("full-hit", 3, num_cached_tokens=3)
    assert chunks(scheduler.schedule()) == [("hit", 4, 2), ("full-hit", 2, 1)]
    assert kv.num_blocks_of("hit") == 6
    assert scheduler.num_computed_tokens("full-hit") == 3


def test_add_request_rejects_bad_input() -> None:
    scheduler, _ = make_scheduler()
    scheduler.add_request("a", 1)
    with pytest.raises(ValueError, match="already"):
        scheduler.add_request("a", 1)
    with pytest.raises(ValueError):
        scheduler.add_request("b", 0)
    with pytest.raises(ValueError):
        scheduler.add_request("c", 3, num_cached_tokens=-1)
    with pytest.raises(ValueError):
        scheduler.set_lookahead("a", -1)
    with pytest.raises(ValueError):
        scheduler.record_output("a", -1)


# -- preemption ---------------------------------------------------------------------------


def test_kv_pressure_preempts_the_newest_request_first() -> None:
    scheduler, kv = make_scheduler(max_num_seqs=4, max_num_batched_tokens=16, kv_tokens=3)
    for request_id in ("a", "b", "c"):
        scheduler.add_request(request_id, 1)
    assert chunks(step_and_sample(scheduler)) == [("a", 0, 1), ("b", 0, 1), ("c", 0, 1)]
    assert kv.num_free_blocks == 0
    scheduler.add_request("d", 1)
    # a needs a 2nd slot: c (newest) is preempted; b then needs one more and is the newest.
    step = step_and_sample(scheduler)
    assert chunks(step) == [("a", 1, 1)]
    assert step.preempted_ids == ("c", "b")
    # Preempted requests go back ahead of later arrivals, in their original order.
    assert scheduler.waiting_ids == ("b", "c", "d")
    assert scheduler.running_ids == ("a",)
    assert kv.num_blocks_of("b") == kv.num_blocks_of("c") == 0


def test_preempted_request_recomputes_prompt_and_output_when_resumed() -> None:
    scheduler, kv = make_scheduler(max_num_seqs=4, max_num_batched_tokens=16, kv_tokens=8)
    scheduler.add_request("a", 3)
    scheduler.add_request("b", 4)
    step_and_sample(scheduler)  # a: 3, b: 4 -> 7 used, each sampled one token
    step = step_and_sample(scheduler)  # a needs its 4th slot: fits (8); b's 5th does not
    assert chunks(step) == [("a", 3, 1)]
    assert step.preempted_ids == ("b",)
    scheduler.finish("a")
    # b has 4 prompt tokens + 1 output token to recompute from position 0.
    step = step_and_sample(scheduler)
    assert chunks(step) == [("b", 0, 5)]
    assert step.items[0].produces_token
    assert kv.num_blocks_of("b") == 5


def test_request_preempts_itself_when_it_is_the_newest() -> None:
    scheduler, _ = make_scheduler(max_num_seqs=4, max_num_batched_tokens=16, kv_tokens=6)
    scheduler.add_request("a", 2)
    scheduler.add_request("b", 4)
    step_and_sample(scheduler)
    # a's 3rd token fits? 2 + 4 = 6 used, no: a preempts b, then fits.
    step = step_and_sample(scheduler)
    assert chunks(step) == [("a", 2, 1)]
    assert step.preempted_ids == ("b",)
    scheduler.finish("a")
    scheduler.add_request("c", 1)
    step = step_and_sample(scheduler)
    assert chunks(step) == [("b", 0, 5), ("c", 0, 1)]
    # b needs a 6th slot, c (the newest) holds the last one: c yields.
    step = step_and_sample(scheduler)
    assert chunks(step) == [("b", 5, 1)]
    assert step.preempted_ids == ("c",)
    # Now b is the only one running and the newest: at capacity it preempts itself.
    step = step_and_sample(scheduler)
    assert chunks(step) == []
    assert step.preempted_ids == ("b",)
    assert scheduler.waiting_ids == ("b", "c")


def test_no_admissions_in_a_step_that_preempted() -> None:
    scheduler, _ = make_scheduler(max_num_seqs=4, max_num_batched_tokens=16, kv_tokens=4)
    scheduler.add_request("a", 2)
    scheduler.add_request("b", 2)
    step_and_sample(scheduler)
    scheduler.add_request("c", 1)
    step = step_and_sample(scheduler)
    assert step.preempted_ids == ("b",)
    assert "c" not in step.request_ids
    assert scheduler.waiting_ids == ("b", "c")


def test_admission_needs_its_whole_first_chunk_to_fit() -> None:
    scheduler, _ = make_scheduler(max_num_seqs=4, max_num_batched_tokens=16, kv_tokens=10)
    scheduler.add_request("a", 30)
    # min(need, budget) = 16 tokens do not fit 10: back-pressure rather than a sliver of a chunk.
    assert scheduler.schedule().items == ()
    assert scheduler.waiting_ids == ("a",)


def test_catch_up_chunk_halves_until_it_fits() -> None:
    scheduler, kv = make_scheduler(max_num_seqs=4, max_num_batched_tokens=8, kv_tokens=13)
    scheduler.add_request("a", 30)
    assert chunks(scheduler.schedule()) == [("a", 0, 8)]
    # 1 (pass 1) + 7 wanted: 8 + 1 + 7 > 13; 7 -> 3 fits (8 + 1 + 3 = 12).
    assert chunks(scheduler.schedule()) == [("a", 8, 4)]
    assert kv.num_free_blocks == 1


def test_catch_up_chunk_shrinks_instead_of_preempting() -> None:
    scheduler, kv = make_scheduler(max_num_seqs=4, max_num_batched_tokens=8, kv_tokens=13)
    scheduler.add_request("b", 2)
    step_and_sample(scheduler)
    scheduler.add_request("a", 10)
    assert chunks(step_and_sample(scheduler)) == [("b", 2, 1), ("a", 0, 7)]
    # b decodes (4 slots), a gets its pass-1 token (8 slots): 12 of 13 used. a wants 2 more:
    # 2 does not fit, 1 does; b is not preempted for a catch-up chunk.
    step = step_and_sample(scheduler)
    assert chunks(step) == [("b", 3, 1), ("a", 7, 2)]
    assert step.preempted_ids == ()
    assert kv.num_free_blocks == 0


def test_block_capacity_rounds_up_to_whole_blocks() -> None:
    kv = CountingKVCapacity(num_blocks=3, block_size=4)
    scheduler = Scheduler(SchedulerConfig(4, 16), kv)
    scheduler.add_request("a", 5)
    scheduler.add_request("b", 5)  # 2 blocks each: b must wait
    assert chunks(step_and_sample(scheduler)) == [("a", 0, 5)]
    assert kv.num_blocks_of("a") == 2
    assert scheduler.waiting_ids == ("b",)
    for position in (5, 6, 7):  # tokens 6-8 fit a's second block
        assert chunks(step_and_sample(scheduler)) == [("a", position, 1)]
    assert kv.num_blocks_of("a") == 2
    assert chunks(step_and_sample(scheduler)) == [("a", 8, 1)]
    assert kv.num_blocks_of("a") == 3


def test_counting_capacity_contract() -> None:
    kv = CountingKVCapacity(num_blocks=4, block_size=2)
    assert kv.reserve("a", 3)
    assert kv.num_free_blocks == 2
    assert not kv.reserve("b", 5)  # 3 blocks > 2 free: nothing changes
    assert kv.num_free_blocks == 2 and kv.num_blocks_of("b") == 0
    assert kv.reserve("a", 1)  # shrinking frees the second block
    assert kv.num_free_blocks == 3
    kv.free("a")
    kv.free("unknown")
    assert kv.num_free_blocks == 4
    with pytest.raises(ValueError):
        CountingKVCapacity(4, block_size=0)


# -- finish and abort ---------------------------------------------------------------------


def test_abort_removes_running_and_waiting_requests_and_frees_kv() -> None:
    scheduler, kv = make_scheduler(max_num_seqs=1, kv_tokens=100)
    scheduler.add_request("a", 4)
    scheduler.add_request("b", 4)
    step_and_sample(scheduler)
    assert kv.num_free_blocks == 96
    assert scheduler.abort("b")
    assert scheduler.waiting_ids == ()
    assert scheduler.abort("a")
    assert scheduler.running_ids == ()
    assert kv.num_free_blocks == 100
    assert not scheduler.abort("a")
    assert scheduler.schedule().items == ()


def test_finish_frees_a_seat_for_the_next_step_and_unknown_id_raises() -> None:
    scheduler, _ = make_scheduler(max_num_seqs=1)
    scheduler.add_request("a", 2)
    scheduler.add_request("b", 2)
    step_and_sample(scheduler)
    scheduler.finish("a")
    assert chunks(scheduler.schedule()) == [("b", 0, 2)]
    with pytest.raises(KeyError):
        scheduler.finish("a")
    with pytest.raises(KeyError):
        scheduler.record_output("a", 1)


# -- speculative lookahead ----------------------------------------------------------------


def test_lookahead_tokens_are_verified_and_rejected_ones_roll_back() -> None:
    scheduler, kv = make_scheduler(max_num_seqs=4, max_num_batched_tokens=8)
    scheduler.add_request("a", 4)
    step_and_sample(scheduler)  # prompt done, first token sampled: 5 tokens known
    scheduler.set_lookahead("a", 3)
    step = scheduler.schedule()
    assert chunks(step) == [("a", 4, 4)]  # the sampled token plus 3 drafts
    assert step.items[0].num_lookahead_tokens == 3
    assert step.items[0].produces_token
    assert kv.num_blocks_of("a") == 8
    # 1 draft accepted + 1 corrected token; the other 2 drafts roll back.
    scheduler.record_output("a", 2, num_rejected_tokens=2)
    assert scheduler.num_computed_tokens("a") == 6
    assert kv.num_blocks_of("a") == 6
    # The lookahead was used up: next step is a plain decode of the last sampled token.
    assert chunks(step_and_sample(scheduler)) == [("a", 6, 1)]


def test_lookahead_of_one_request_does_not_block_others() -> None:
    scheduler, _ = make_scheduler(max_num_seqs=4, max_num_batched_tokens=6)
    scheduler.add_request("a", 1)
    scheduler.add_request("b", 1)
    scheduler.add_request("c", 1)
    step_and_sample(scheduler)
    scheduler.set_lookahead("a", 4)
    # a takes 5 of 6 tokens in pass 1, b gets the last one, c waits for the next step.
    step = scheduler.schedule()
    assert chunks(step) == [("a", 1, 5), ("b", 1, 1)]
    assert [i.num_lookahead_tokens for i in step.items] == [4, 0]
    scheduler.record_output("a", 1, num_rejected_tokens=4)
    scheduler.record_output("b", 1)
    assert chunks(scheduler.schedule()) == [("a", 2, 1), ("b", 2, 1), ("c", 1, 1)]


def test_lookahead_on_a_request_still_catching_up_is_not_counted_as_drafts() -> None:
    scheduler, _ = make_scheduler(max_num_seqs=4, max_num_batched_tokens=4)
    scheduler.add_request("a", 10)
    scheduler.schedule()
    scheduler.set_lookahead("a", 2)
    step = scheduler.schedule()
    assert chunks(step) == [("a", 4, 4)]
    assert step.items[0].num_lookahead_tokens == 0
    assert not step.items[0].produces_token


# -- invariants under a random workload -----------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_keeps_invariants_and_finishes_everything(seed: int) -> None:
    import random

    rng = random.Random(seed)
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16)
    kv = CountingKVCapacity(num_blocks=16, block_size=4)  # 64 tokens: one longest request fits
    scheduler = Scheduler(config, kv)
    num_prompt = {f"r{i}": rng.randint(1, 40) for i in range(30)}
    max_output = {request_id: rng.randint(1, 20) for request_id in num_prompt}
    arrivals = sorted(num_prompt, key=lambda _: rng.random())
    num_output = dict.fromkeys(num_prompt, 0)
    computed: dict[str, int] = {}
    finished: set[str] = set()
    for _ in range(2_000):
        for _ in range(rng.randint(0, 2)):
            if arrivals:
                request_id = arrivals.pop()
                scheduler.add_request(request_id, num_prompt[request_id])
        caught_up = {
            r for r in scheduler.running_ids if computed.get(r) == num_prompt[r] + num_output[r] - 1
        }
        step = scheduler.schedule()
        assert step.num_tokens <= config.max_num_batched_tokens
        assert len(step.items) <= config.max_num_seqs
        assert 0 <= kv.num_free_blocks <= kv.num_blocks
        # A decoding request is never skipped unless it was preempted.
        assert caught_up - set(step.preempted_ids) <= set(step.request_ids)
        for request_id in step.preempted_ids:
            computed[request_id] = 0
        for item in step.items:
            assert item.start_position == computed.get(item.request_id, 0)
            computed[item.request_id] = item.start_position + item.num_tokens
            num_known = num_prompt[item.request_id] + num_output[item.request_id]
            assert computed[item.request_id] <= num_known
            assert item.produces_token == (computed[item.request_id] == num_known)
            if item.produces_token:
                scheduler.record_output(item.request_id, 1)
                num_output[item.request_id] += 1
                if num_output[item.request_id] == max_output[item.request_id]:
                    scheduler.finish(item.request_id)
                    finished.add(item.request_id)
        if len(finished) == len(num_prompt):
            break
    assert finished == set(num_prompt)
    assert kv.num_free_blocks == kv.num_blocks
