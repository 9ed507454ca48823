"""The engine end to end on a tiny random llama: its thread, streams, stops and cancellation.

Scheduling is asserted on the engine's step records (which requests each step served), never on
wall time; requests that must arrive "mid-stream" are submitted from the step callback, so the
step they join is exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import inference  # noqa: F401  (loads the BLAS before mlx)
from inference.backend import GenerationBackend, GenerationChunk
from inference.engine import (
    ContextLengthError,
    Engine,
    EngineClosedError,
    EngineConfig,
    GenerationRequest,
    StepRecord,
)
from inference.runner import ModelRunner, RunnerConfig
from inference.sampling import SamplingParams, compute_probs, sample
from inference.scheduler import CountingKVCapacity, Scheduler, SchedulerConfig
from inference.stopping import StopParams

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step

from tests.fixtures.tiny_llama import write_tiny_llama

GREEDY = SamplingParams(temperature=0)
SAMPLED = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=1234)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama with its own lm_head: greedy outputs vary more than with tied embeddings."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "untied", tie_word_embeddings=False)


@pytest.fixture
def make_engine(model_path: Path) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(on_step: Callable[[StepRecord], None] | None = None, **config: int) -> Engine:
        engine = Engine.from_path(model_path, config=EngineConfig(**config), on_step=on_step)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def prompt(length: int, offset: int = 0) -> tuple[int, ...]:
    return tuple(3 + (offset + 7 * i) % 290 for i in range(length))


def request(prompt_ids, max_tokens: int, sampling=GREEDY, **kwargs) -> GenerationRequest:
    return GenerationRequest(
        prompt_ids, sampling, StopParams(max_tokens=max_tokens), ignore_eos=True, **kwargs
    )


def token_ids(chunks: list[GenerationChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def mlx_lm_greedy(model_path: Path, prompts: list[tuple[int, ...]], num_tokens: int):
    model, _ = load(str(model_path))
    sampler = lambda x: mx.argmax(x, axis=-1)  # noqa: E731
    return [
        [
            int(t)
            for t, _ in generate_step(mx.array(p), model, max_tokens=num_tokens, sampler=sampler)
        ]
        for p in prompts
    ]


def test_batched_equals_single_and_mlx_lm_with_joins_and_leaves(make_engine, model_path) -> None:
    prompts = [prompt(n, offset=n) for n in (3, 40, 11, 25, 1, 60)]
    max_tokens = [12, 4, 12, 9, 12, 6]  # the 4- and 6-token requests leave mid-batch
    late: dict[int, object] = {}

    def on_step(record: StepRecord) -> None:
        if record.index == 3:  # the last three join while the first three are decoding
            for i in (3, 4, 5):
                late[i] = engine.submit(request(prompts[i], max_tokens[i]))

    engine = make_engine(on_step, max_num_seqs=4, max_num_batched_tokens=24)
    handles = {i: engine.submit(request(prompts[i], max_tokens[i])) for i in (0, 1, 2)}
    batched = {i: token_ids(list(h)) for i, h in handles.items()}
    batched |= {i: token_ids(list(h)) for i, h in late.items()}  # type: ignore[call-overload]

    single_engine = make_engine(max_num_seqs=1)
    reference = mlx_lm_greedy(model_path, prompts, max(max_tokens))
    for i, p in enumerate(prompts):
        alone = token_ids(list(single_engine.submit(request(p, max_tokens[i]))))
        assert batched[i] == alone == reference[i][: max_tokens[i]], i


def test_seeded_sampling_ignores_batch_composition(make_engine) -> None:
    params = [SAMPLED, SamplingParams(temperature=0.7, repetition_penalty=1.3, seed=5)]
    engine = make_engine(max_num_seqs=8, max_num_batched_tokens=32)
    alone = [token_ids(list(engine.submit(request(prompt(9), 16, p)))) for p in params]

    crowd = [
        engine.submit(request(prompt(n, n), 16, SamplingParams(temperature=1.0, seed=n)))
        for n in (30, 5, 17)
    ]
    together = [engine.submit(request(prompt(9), 16, p)) for p in params]
    assert [token_ids(list(h)) for h in together] == alone
    for h in crowd:
        list(h)
    other_seed = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=99)
    assert token_ids(list(engine.submit(request(prompt(9), 16, other_seed)))) != alone[0]


def reference_sampling(model_path: Path, prompt_ids, params: SamplingParams, num_tokens: int):
    """One request, one step at a time, no overlap: the plain loop the engine must reproduce."""
    model, _ = load(str(model_path))
    runner = ModelRunner(model, RunnerConfig(1))
    scheduler = Scheduler(SchedulerConfig(1, 64), CountingKVCapacity(4096))
    scheduler.add_request("r", len(prompt_ids))
    tokens, outputs = list(prompt_ids), []
    while len(outputs) < num_tokens:
        out = runner.execute(scheduler.schedule(), {"r": tokens})
        if out.logits is None:
            continue
        probs = compute_probs(out.logits, [params], [prompt_ids], [outputs])
        token = sample(probs, [params.seed], out.positions).item()
        tokens.append(token)
        outputs.append(token)
        scheduler.record_output("r", 1)
    return outputs


def test_overlapped_steps_sample_like_a_plain_loop(make_engine, model_path) -> None:
    # Penalties read the output so far: the engine must sample step t+1 after step t's token
    # is known, though it launched step t+1's forward pass before.
    params = SamplingParams(
        temperature=0.8,
        top_k=30,
        repetition_penalty=1.3,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        seed=3,
    )
    engine = make_engine(max_num_batched_tokens=16)
    got = token_ids(list(engine.submit(request(prompt(40), 20, params))))
    assert got == reference_sampling(model_path, prompt(40), params, 20)


def test_preempted_requests_recompute_and_match(make_engine) -> None:
    # KV for 64 tokens, three requests needing 45 each: the newest is preempted, recomputed later.
    records: list[StepRecord] = []
    engine = make_engine(
        records.append, max_model_len=64, max_kv_tokens=64, max_num_batched_tokens=16
    )
    prompts = [prompt(15, offset=i) for i in range(3)]
    handles = [engine.submit(request(p, 30)) for p in prompts]
    outputs = [token_ids(list(h)) for h in handles]
    assert any(r.preempted_ids for r in records)
    single = make_engine(max_num_seqs=1)
    assert outputs == [token_ids(list(single.submit(request(p, 30)))) for p in prompts]


def test_logprobs_of_the_sampled_token(make_engine) -> None:
    engine = make_engine()
    params = SamplingParams(temperature=0, logprobs=True, num_top_logprobs=3)
    chunks = list(engine.submit(request(prompt(7), 4, params)))
    for c in chunks:
        (lp,) = c.logprobs
        # Greedy: the sampled token is the most likely one, and logprobs are <= 0.
        assert lp.token_id == c.token_ids[0] == lp.top_ids[0]
        assert len(lp.top_ids) == 3 and 0 >= lp.logprob == lp.top_logprobs[0]


def test_stop_string_across_tokens(make_engine) -> None:
    engine = make_engine()
    full = "".join(c.text for c in engine.submit(request(prompt(12), 24)))
    stop = next(
        full[i : i + 3] for i in range(len(full) // 2, len(full)) if "\ufffd" not in full[i : i + 3]
    )
    chunks = list(
        engine.submit(
            GenerationRequest(prompt(12), GREEDY, StopParams(max_tokens=24, stop=(stop,)))
        )
    )
    assert "".join(c.text for c in chunks) == full[: full.index(stop)]
    assert (chunks[-1].finish_reason, chunks[-1].stop_reason) == ("stop", stop)


def test_stop_token_and_eos(make_engine) -> None:
    engine = make_engine()
    ids = token_ids(list(engine.submit(request(prompt(12), 10))))
    stop_id = ids[4]
    first = ids.index(stop_id)
    chunks = list(
        engine.submit(
            GenerationRequest(
                prompt(12), GREEDY, StopParams(max_tokens=10, stop_token_ids=[stop_id])
            )
        )
    )
    assert token_ids(chunks) == ids[: first + 1]
    assert (chunks[-1].finish_reason, chunks[-1].stop_reason, chunks[-1].text) == (
        "stop",
        stop_id,
        "",
    )
    # Without ignore_eos the model's EOS ids stop it.
    assert engine.eos_token_ids == (2,)


def test_max_tokens_and_context_length(make_engine) -> None:
    engine = make_engine(max_model_len=32)
    chunks = list(engine.submit(request(prompt(10), 5)))
    assert len(chunks) == 5 and chunks[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens == 10
    # No max_tokens: the context's room (32 - 28 = 4 tokens) is the limit.
    chunks = list(engine.submit(GenerationRequest(prompt(28), GREEDY, ignore_eos=True)))
    assert len(chunks) == 4 and chunks[-1].finish_reason == "length"
    with pytest.raises(ContextLengthError):
        engine.submit(request(prompt(32), 1))


def test_cancel_leaves_the_batch_at_the_next_step(make_engine) -> None:
    records: list[StepRecord] = []
    cancelled_at: list[int] = []

    def on_step(record: StepRecord) -> None:
        records.append(record)
        num_long = sum(long_handle.request_id in r.sampled for r in records)
        if not cancelled_at and num_long == 3:
            long_handle.cancel()  # as a client disconnect would, from another thread
            cancelled_at.append(record.index)

    engine = make_engine(on_step)
    long_handle = engine.submit(request(prompt(8), 1000))
    other = engine.submit(request(prompt(5), 30))
    chunks = list(long_handle)
    assert chunks[-1].finish_reason == "cancelled" and len(token_ids(chunks)) == 3
    assert len(token_ids(list(other))) == 30
    # Step k+1 was already launched when step k's callback cancelled: its token is dropped, and
    # no step scheduled after that includes the request.
    later = [r for r in records if r.index > cancelled_at[0]]
    assert later and all(long_handle.request_id not in r.sampled for r in later)
    assert all(item.request_id != long_handle.request_id for r in later[1:] for item in r.items)


def test_long_prompt_prefill_does_not_stall_other_streams(make_engine) -> None:
    records: list[StepRecord] = []
    joined: list = []

    def on_step(record: StepRecord) -> None:
        records.append(record)
        if record.index == 2:
            joined.append(engine.submit(request(prompt(300, 1), 2, request_id="long")))

    engine = make_engine(on_step, max_num_seqs=4, max_num_batched_tokens=16)
    stream = engine.submit(request(prompt(6), 100, request_id="stream"))
    assert len(token_ids(list(stream))) == 100
    assert len(token_ids(list(joined[0]))) == 2

    prefill_steps = [
        r for r in records if any(i.request_id == "long" and not i.produces_token for i in r.items)
    ]
    assert len(prefill_steps) >= 300 // 16 - 1  # chunked: ~15 tokens a step beside the decode
    assert all("stream" in r.sampled for r in prefill_steps)


def test_async_streams_keep_the_event_loop_free(make_engine) -> None:
    engine = make_engine(max_num_seqs=4)
    sync_ids = [token_ids(list(engine.submit(request(prompt(n, n), 20)))) for n in (4, 9, 14)]

    async def main() -> tuple[list[list[int]], int, list[str]]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0)

        async def collect(n: int) -> list[int]:
            return token_ids([c async for c in engine.submit(request(prompt(n, n), 20))])

        tick_task = asyncio.create_task(ticker())
        results = await asyncio.gather(*(collect(n) for n in (4, 9, 14)))

        # Leaving `async with` early cancels the request.
        async with engine.submit(request(prompt(4), 1000)) as stream:
            async for _ in stream:
                break
        reasons = [c.finish_reason async for c in stream]
        done.set()
        await tick_task
        return list(results), ticks, reasons

    results, ticks, reasons = asyncio.run(main())
    assert results == sync_ids
    assert ticks > 60  # the loop ran freely while 60 tokens were computed on the engine thread
    assert reasons[-1] == "cancelled"


def test_close_ends_open_streams_and_refuses_new_ones(make_engine) -> None:
    engine = make_engine()
    handle = engine.submit(request(prompt(4), 1000))
    next(iter(handle))
    engine.close()
    with pytest.raises(EngineClosedError):
        list(handle)
    with pytest.raises(EngineClosedError):
        engine.submit(request(prompt(4), 1))


def test_chat_template_and_backend_protocol(make_engine) -> None:
    engine = make_engine()
    ids = engine.apply_chat_template([{"role": "user", "content": "Paris?"}])
    text = engine._decoder.decode(ids, skip_special_tokens=False)
    assert text == "<|im_start|>user\nParis?<|im_end|>\n<|im_start|>assistant\n"
    assert engine.count_tokens("Paris") == len(engine.encode("Paris")) > 0
    assert isinstance(engine, GenerationBackend)
    assert engine.model_name == "untied" and engine.max_model_len == 2048
