"""The prefix cache inside the engine: hits change no token, only what is computed.

Every test compares greedy tokens with an engine whose prefix cache is off; small blocks (16
tokens) keep the prompts short on the tiny random llama. A request that finishes while
decoding has fed every token it sampled (the engine feeds the last one in the step it launched
before seeing the stop), so its answer's tail covers its prompt and all its output; one that
stops at its first token has fed only its prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import inference  # noqa: F401  (loads the BLAS before mlx)
from inference.backend import GenerationChunk
from inference.engine import Engine, EngineConfig, GenerationRequest, StepRecord
from inference.kv_blocks import block_keys
from inference.model_fingerprint import fingerprint_model_dir
from inference.prefix_cache import PrefixCache, PrefixCacheConfig, unsupported_reason
from inference.sampling import SamplingParams
from inference.stopping import StopParams

import mlx.core as mx
import pytest
from mlx_lm.models import llama

from tests.fixtures.tiny_llama import write_tiny_llama

BLOCK = 16
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "untied", tie_word_embeddings=False)


@pytest.fixture
def make_engine(model_path: Path) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(on_step: Callable[[StepRecord], None] | None = None, **config: object) -> Engine:
        config = {
            "prefix_cache_block_size": BLOCK,
            "prefix_cache_ssd_bytes": 0,
            "max_num_batched_tokens": 32,
            **config,
        }
        engine = Engine.from_path(model_path, config=EngineConfig(**config), on_step=on_step)  # type: ignore[arg-type]
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def prompt(length: int, offset: int = 0) -> tuple[int, ...]:
    return tuple(3 + (offset + 7 * i) % 290 for i in range(length))


def request(prompt_ids, max_tokens: int = 8, **kwargs) -> GenerationRequest:
    return GenerationRequest(
        prompt_ids, GREEDY, StopParams(max_tokens=max_tokens), ignore_eos=True, **kwargs
    )


def run(engine: Engine, prompt_ids, max_tokens: int = 8, **kwargs) -> list[GenerationChunk]:
    return list(engine.submit(request(prompt_ids, max_tokens, **kwargs)))


def tokens(chunks: list[GenerationChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


@pytest.fixture
def reference(make_engine) -> Callable[..., list[int]]:
    """Greedy tokens with the prefix cache off."""
    engine = make_engine(prefix_cache_ram_bytes=0)
    return lambda prompt_ids, max_tokens=8: tokens(run(engine, prompt_ids, max_tokens))


def test_full_and_partial_hits_generate_the_same_tokens(make_engine, reference) -> None:
    records: list[StepRecord] = []
    engine = make_engine(records.append)
    base = prompt(5 * BLOCK + 3)
    first = run(engine, base)
    assert first[-1].usage.cached_tokens == 0
    assert tokens(first) == reference(base)

    # The same prompt again: 5 blocks and the tail found; only the last token runs.
    records.clear()
    again = run(engine, base, request_id="again")
    assert again[-1].usage.cached_tokens == 5 * BLOCK + 2
    assert tokens(again) == tokens(first)
    first_item = next(i for r in records for i in r.items if i.request_id == "again")
    assert (first_item.start_position, first_item.num_tokens) == (5 * BLOCK + 2, 1)

    # A prompt of exactly 4 full blocks: all found, yet its last token must run for logits.
    exact = base[: 4 * BLOCK]
    got = run(engine, exact, request_id="exact")
    assert got[-1].usage.cached_tokens == 4 * BLOCK - 1
    assert tokens(got) == reference(exact)

    # Shares 2 blocks and 5 tokens, then differs: 2 blocks and base's block 2 in part.
    partial = base[: 2 * BLOCK + 5] + prompt(40, offset=11)
    got = run(engine, partial)
    assert got[-1].usage.cached_tokens == 2 * BLOCK + 5
    assert tokens(got) == reference(partial)

    stats = engine.prefix_cache_stats()
    assert (stats.num_lookups, stats.num_hits, stats.num_misses) == (4, 3, 1)
    assert stats.num_hit_tokens == (5 * BLOCK + 2) + (4 * BLOCK - 1) + (2 * BLOCK + 5)
    # base: 5 blocks, its prompt's 3-token tail, its answer's 11-token tail (3 + 8 fed);
    # exact: its answer's 8-token tail; partial (77 + 8 fed = 85 tokens): blocks 2, 3 and 4
    # (0 and 1 are base's), its prompt's 13-token tail and its answer's 5-token tail.
    assert stats.ram_blocks == (5 + 2) + 1 + (3 + 2) and stats.enabled


def test_a_hit_counts_only_uncached_tokens_against_the_budget(make_engine) -> None:
    records: list[StepRecord] = []
    engine = make_engine(records.append, max_num_batched_tokens=32, max_num_seqs=4)
    base = prompt(6 * BLOCK + 4)
    run(engine, base, 2)
    records.clear()
    # Two requests with the cached prefix: each needs only its own 8 tokens, so both are
    # admitted in one 32-token step beside each other.
    handles = [
        engine.submit(request(base + prompt(8, offset=k), 2, request_id=f"r{k}")) for k in (1, 2)
    ]
    for handle in handles:
        assert list(handle)[-1].usage.cached_tokens == len(base)
    first = next(r for r in records if any(i.request_id == "r1" for i in r.items))
    assert {(i.request_id, i.start_position, i.num_tokens) for i in first.items} == {
        ("r1", len(base), 8),
        ("r2", len(base), 8),
    }


def test_concurrent_requests_share_a_prefix_while_it_is_computed(make_engine, reference) -> None:
    base = prompt(6 * BLOCK, offset=3)
    late: list = []
    usage: dict[str, int] = {}

    def on_step(record: StepRecord) -> None:
        # Once A's prefill has passed 4 blocks, B arrives with A's first 4 blocks + its own tail.
        done = [i for i in record.items if i.request_id == "A"]
        if not late and done and done[0].start_position + done[0].num_tokens >= 4 * BLOCK:
            late.append(engine.submit(request(base[: 4 * BLOCK] + prompt(9, 5), request_id="B")))

    engine = make_engine(on_step, max_num_batched_tokens=16)
    a = list(engine.submit(request(base, 30, request_id="A")))
    b = list(late[0])
    usage = {"A": a[-1].usage.cached_tokens, "B": b[-1].usage.cached_tokens}
    assert usage == {"A": 0, "B": 4 * BLOCK}
    assert tokens(a) == reference(base, 30)
    assert tokens(b) == reference(base[: 4 * BLOCK] + prompt(9, 5))


def test_eight_requests_arriving_together_compute_their_shared_prefix_once(
    make_engine, reference
) -> None:
    records: list[StepRecord] = []
    engine = make_engine(records.append, max_num_seqs=8, max_num_batched_tokens=32)
    # 4 shared blocks and 5 tokens into the fifth, where the prompts part.
    num_shared = 4 * BLOCK + 5
    shared = prompt(num_shared, offset=2)
    prompts = [shared + prompt(5, offset=100 + 13 * k) for k in range(8)]
    handles = [engine.submit(request(p, 6, request_id=f"r{k}")) for k, p in enumerate(prompts)]
    outputs = [list(h) for h in handles]

    # Tokens of the shared prefix scheduled over all requests and steps: each position once.
    computed = [0] * num_shared
    for record in records:
        for item in record.items:
            for position in range(item.start_position, item.start_position + item.num_tokens):
                if position < num_shared:
                    computed[position] += 1
    assert computed == [1] * num_shared
    cached = sorted(chunks[-1].usage.cached_tokens for chunks in outputs)
    assert cached == [0] + [num_shared] * 7
    assert [tokens(c) for c in outputs] == [reference(p, 6) for p in prompts]


def test_an_answer_is_cached_for_the_next_turn(make_engine, reference) -> None:
    records: list[StepRecord] = []
    engine = make_engine(records.append)
    first = prompt(3 * BLOCK + 5, offset=4)
    answer = tokens(run(engine, first, 20))
    # The next turn re-sends the conversation: prompt, answer, and a new message.
    second = first + tuple(answer) + prompt(7, offset=200)
    got = run(engine, second, 8, request_id="turn2")
    # Every token the first request fed is found: its prompt and all 20 answer tokens (the
    # 20th was fed by the step launched before its stop was seen).
    assert got[-1].usage.cached_tokens == len(first) + 20
    assert tokens(got) == reference(second)
    first_item = next(i for r in records for i in r.items if i.request_id == "turn2")
    assert first_item.start_position == len(first) + 20


def test_a_cancelled_request_leaves_its_prefix(make_engine, reference) -> None:
    records: list[StepRecord] = []

    def on_step(record: StepRecord) -> None:
        records.append(record)
        if len(records) == 3:  # three 16-token prefill chunks in
            handle.cancel()

    engine = make_engine(on_step, max_num_batched_tokens=16)
    long = prompt(10 * BLOCK, offset=1)
    handle = engine.submit(request(long))
    assert list(handle)[-1].finish_reason == "cancelled"
    got = run(engine, long)
    assert 3 * BLOCK <= got[-1].usage.cached_tokens < 10 * BLOCK
    assert tokens(got) == reference(long)


def test_preempted_requests_find_their_prefix_again(make_engine, reference) -> None:
    records: list[StepRecord] = []
    engine = make_engine(
        records.append, max_model_len=96, max_kv_tokens=96, max_num_batched_tokens=16
    )
    prompts = [prompt(2 * BLOCK + 3, offset=i) for i in range(3)]
    handles = [engine.submit(request(p, 40)) for p in prompts]
    outputs = [tokens(list(h)) for h in handles]
    assert any(r.preempted_ids for r in records)
    # A preempted request restarts from what is cached (its prompt's blocks and tail, its
    # answer's blocks), not from token 0; one caught mid-prefill has a block at least.
    restarts = []
    for n, record in enumerate(records):
        for request_id in record.preempted_ids:
            after = (i for r in records[n + 1 :] for i in r.items if i.request_id == request_id)
            restarts.append(next(after).start_position)
    assert restarts and min(restarts) >= BLOCK and max(restarts) >= 2 * BLOCK + 3
    assert outputs == [reference(p, 40) for p in prompts]


def test_ram_budget_evicts_old_prefixes(make_engine, reference) -> None:
    engine = make_engine()
    base = prompt(4 * BLOCK)  # whole blocks, and one token to generate: no tail is stored
    run(engine, base, 1)
    block_bytes = engine.prefix_cache_stats().ram_bytes // 4
    small = make_engine(prefix_cache_ram_bytes=6 * block_bytes)
    run(small, base, 1)
    other = prompt(4 * BLOCK, offset=50)
    run(small, other, 1)  # 4 more blocks: the LRU leaves of base go, its first two stay
    stats = small.prefix_cache_stats()
    assert (stats.ram_blocks, stats.ram_evictions) == (6, 2)
    got = run(small, base, 1)
    assert got[-1].usage.cached_tokens == 2 * BLOCK
    assert tokens(got) == reference(base, 1)


def test_cache_off_and_unsupported_models(make_engine, caplog) -> None:
    engine = make_engine(prefix_cache_ram_bytes=0)
    base = prompt(3 * BLOCK + 1)
    run(engine, base)
    assert run(engine, base)[-1].usage.cached_tokens == 0
    stats = engine.prefix_cache_stats()
    assert not stats.enabled and stats.disabled_reason == "prefix_cache_ram_bytes is 0"

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
    assert "RotatingKVCache" in (unsupported_reason(llama.Model(args)) or "")

    # Layers whose KV shapes differ cannot be stacked into a block: the cache turns itself off.
    cache = PrefixCache(PrefixCacheConfig(block_size=2), "fp")
    keys = [mx.zeros((2, 2, 4)), mx.zeros((1, 2, 4))]
    with caplog.at_level(logging.WARNING, logger="inference.prefix_cache"):
        assert cache.store("r", "k0", None, keys, keys, [1, 2]) is None
    assert not cache.enabled and "prefix cache off" in caplog.text
    assert cache.lookup("r", [1, 2], ["k0"]).num_tokens == 0


# -- the SSD tier ----------------------------------------------------------------------------------


def test_ssd_blocks_hit_after_a_restart(make_engine, reference, model_path, tmp_path) -> None:
    ssd = {"prefix_cache_ssd_bytes": 1 << 30, "prefix_cache_dir": tmp_path}
    base = prompt(5 * BLOCK + 3)
    first = make_engine(**ssd)
    want = tokens(run(first, base))
    first.close()  # finishes the queued writes

    second = make_engine(**ssd)
    got = run(second, base)
    # 5 blocks and the answer's tail (read on the reader thread): all but the last token.
    assert got[-1].usage.cached_tokens == 5 * BLOCK + 2
    assert tokens(got) == want == reference(base)
    stats = second.prefix_cache_stats()
    # The first engine wrote 5 blocks, its prompt's tail and its answer's tail.
    assert (stats.num_ssd_hit_tokens, stats.ssd_blocks, stats.ssd_corrupt) == (5 * BLOCK + 2, 7, 0)
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert folder.name == fingerprint_model_dir(model_path, "float32")


def test_ssd_reads_run_beside_other_requests(make_engine, reference, tmp_path) -> None:
    ssd = {"prefix_cache_ssd_bytes": 1 << 30, "prefix_cache_dir": tmp_path}
    base = prompt(6 * BLOCK + 3, offset=5)
    first = make_engine(**ssd)
    run(first, base, 1)
    first.close()

    records: list[StepRecord] = []
    second = make_engine(records.append, max_num_batched_tokens=16, **ssd)
    busy = second.submit(request(prompt(3 * BLOCK, offset=77), 12, request_id="busy"))
    hits = [second.submit(request(base, request_id=f"hit{k}")) for k in range(2)]
    results = [list(h) for h in hits]
    # Both found the blocks; they were read once (by the first to ask) and served both.
    assert [r[-1].usage.cached_tokens for r in results] == [len(base) - 1] * 2
    assert all(tokens(r) == reference(base) for r in results)
    assert tokens(list(busy)) == reference(prompt(3 * BLOCK, offset=77), 12)
    stats = second.prefix_cache_stats()
    assert stats.num_ssd_hit_tokens == len(base) - 1 and stats.ssd_corrupt == 0
    # The hits never ran a token of the cached prefix.
    starts = [i.start_position for r in records for i in r.items if i.request_id.startswith("hit")]
    assert min(starts) == len(base) - 1


def test_a_corrupt_ssd_block_is_a_miss(make_engine, reference, model_path, tmp_path) -> None:
    ssd = {"prefix_cache_ssd_bytes": 1 << 30, "prefix_cache_dir": tmp_path}
    base = prompt(5 * BLOCK + 3, offset=9)
    first = make_engine(**ssd)
    run(first, base)
    first.close()
    fingerprint = fingerprint_model_dir(model_path, "float32")
    third = block_keys(base, BLOCK, fingerprint)[2]
    (path,) = tmp_path.rglob(f"{third}.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0x40  # one flipped bit in the values
    path.write_bytes(bytes(raw))

    second = make_engine(**ssd)
    got = run(second, base)
    assert got[-1].usage.cached_tokens == 2 * BLOCK  # blocks 0 and 1; 2 is bad, 3 and 4 follow it
    assert tokens(got) == reference(base)
    assert second.prefix_cache_stats().ssd_corrupt == 1
