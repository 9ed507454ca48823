"""Prefix cache: time to first token of RAG-shaped prompts, cold vs RAM hit vs SSD hit after restart.

Each prompt is a chat with a system message and ~2k tokens of retrieved passages, then a
question. Context k orders the passages its own way (rotation k), so contexts share no blocks
past the system message; the questions vary. One JSON line per case:

    engine cold_nocache   prefix cache off: every prompt computed (the baseline)
    engine cold           cache on, fresh SSD folder: each context misses and is stored
    engine ssd_hit        a new Engine on the same folder (a restart), another question on each
                          context: its blocks are read from SSD (and promoted into RAM)
    engine ram_hit        the restarted engine, a third question on each context: RAM hits
    engine next_turn      the restarted engine: a 24-token answer to the third question, then
                          the next turn (the chat so far + a follow-up): the answer's blocks hit
    engine burst          --burst requests on one new context submitted together to a fresh
                          engine: the shared prefix should be computed once (computed_tokens)
    mlx_lm cold           stream_generate on the whole prompt
    mlx_lm prompt_cache   mlx-lm's own prompt cache: the prompt's common prefix with the cold
                          prompt prefilled (untimed) into a make_prompt_cache() cache, as
                          mlx_lm.cache_prompt does; the question then generates from a copy

Every request generates one token (TTFT is the prefill). The cases interleave per context
(cold: nocache, cache, mlx-lm; hits: SSD, RAM, mlx-lm), so load from other processes on a
shared machine hits all of them alike; still, compare within one run only.

    .venv/bin/python benchmarks/prefix_cache.py                  # default chat model, ~minutes
    .venv/bin/python benchmarks/prefix_cache.py --burst 0        # without the burst case
    .venv/bin/python benchmarks/prefix_cache.py --contexts 2 --context-tokens 1024
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import inference  # noqa: F401  (loads the BLAS before mlx)
from inference.chat_model import default_chat_model, resolve_chat_model
from inference.engine import Engine, EngineConfig, GenerationRequest, StepRecord
from inference.sampling import SamplingParams
from inference.stopping import StopParams

import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.models.cache import make_prompt_cache

SYSTEM = (
    "You answer questions from the numbered passages below. Cite passages as [n]. If the "
    "passages do not contain the answer, say so."
)
PASSAGES = [
    "The harbour ferry leaves the north pier every forty minutes from dawn until midnight; "
    "tickets are sold at the kiosk beside the lighthouse and on board, cash only.",
    "SQLite keeps a whole database in one file. A write-ahead log lets readers continue while "
    "a writer appends pages; a checkpoint copies the log back into the database file.",
    "The observatory's dome rotates on forty steel wheels. In winter the track is heated so "
    "ice cannot form, and the shutter stays closed when the wind exceeds sixty kilometres an hour.",
    "Photosynthesis stores the energy of light in chemical bonds: chlorophyll absorbs red and "
    "blue light, splits water, and the Calvin cycle fixes carbon dioxide into sugars.",
    "A transformer predicts the next token from all previous ones. Its attention layers keep "
    "keys and values for every token, which is why a long prompt costs memory while decoding.",
    "The town library lends tools as well as books: drills, ladders and a sewing machine can "
    "be borrowed for a week with the same card, and late returns cost nothing.",
    "Expansion joints let a bridge deck grow and shrink with temperature. Without them the "
    "steel would buckle in summer heat or crack the abutments in a hard frost.",
    "TCP recovers from a lost packet by retransmitting it after a timeout or after three "
    "duplicate acknowledgements, and halves its congestion window when loss is detected.",
]
PREFILL_STEP = 2048  # mlx-lm's default prefill_step_size
QUESTIONS = [
    "How often does the harbour ferry leave?",
    "What does a checkpoint do in SQLite?",
    "Why is the observatory track heated?",
    "Which colours of light does chlorophyll absorb?",
    "Why does a long prompt cost memory?",
    "Can I borrow a ladder from the library?",
    "What are expansion joints for?",
    "What does TCP do after three duplicate acknowledgements?",
    "When does the dome shutter stay closed?",
    "Do late returns at the library cost anything?",
    "What happens to the congestion window on loss?",
    "What fixes carbon dioxide into sugars?",
]


def context(index: int, num_tokens: int, count_tokens) -> str:
    """Numbered passages, rotated by index, repeated up to about num_tokens tokens."""
    order = PASSAGES[index % len(PASSAGES) :] + PASSAGES[: index % len(PASSAGES)]
    parts: list[str] = []
    total = 0
    n = 0
    while total < num_tokens:
        passage = f"[{n + 1}] {order[n % len(order)]} (Source {index}-{n}.)"
        parts.append(passage)
        total += count_tokens(passage) + 2
        n += 1
    return "\n\n".join(parts)


def messages(ctx: str, question: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Passages:\n\n{ctx}\n\nQuestion: {question}"},
    ]


def ttft_engine(engine: Engine, prompt: Sequence[int]) -> tuple[float, int]:
    """Seconds from submit to the first token, and the prompt tokens the cache supplied."""
    request = GenerationRequest(
        tuple(prompt), SamplingParams(temperature=0), StopParams(max_tokens=1), ignore_eos=True
    )
    start = time.perf_counter()
    chunks = list(engine.submit(request))
    return time.perf_counter() - start, chunks[-1].usage.cached_tokens


def answer(engine: Engine, prompt: Sequence[int], max_tokens: int) -> list[int]:
    request = GenerationRequest(
        tuple(prompt), SamplingParams(temperature=0), StopParams(max_tokens=max_tokens)
    )
    return [t for chunk in engine.submit(request) for t in chunk.token_ids]


def burst(path: Path, config: EngineConfig, prompts: list[list[int]]) -> dict:
    """Submit prompts together to a fresh engine; TTFT of each and the prompt tokens computed."""
    records: list[StepRecord] = []
    engine = Engine.from_path(path, config=config, on_step=records.append)
    ttft_engine(engine, engine.apply_chat_template(messages("warm up", "ok?")))
    records.clear()
    times: list[float] = [0.0] * len(prompts)
    start = time.perf_counter()
    handles = [
        engine.submit(
            GenerationRequest(
                tuple(p),
                SamplingParams(temperature=0),
                StopParams(max_tokens=1),
                ignore_eos=True,
                request_id=f"burst{i}",
            )
        )
        for i, p in enumerate(prompts)
    ]

    def first_chunk(i: int) -> None:
        for _ in handles[i]:
            times[i] = time.perf_counter() - start
            break
        list(handles[i])

    threads = [threading.Thread(target=first_chunk, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine.close()
    lengths = {f"burst{i}": len(p) for i, p in enumerate(prompts)}
    computed = sum(
        min(item.num_tokens, lengths[item.request_id] - item.start_position)
        for record in records
        for item in record.items
        if item.start_position < lengths[item.request_id]
    )
    line = {
        "bench": "prefix_cache",
        "system": "engine",
        "case": "burst",
        "n": len(prompts),
        "ttft_p50_s": round(statistics.median(times), 3),
        "ttft_max_s": round(max(times), 3),
        "prompt_tokens": sum(lengths.values()),
        "shared_prefix_tokens": min(common_prefix(prompts[0], p) for p in prompts[1:]),
        "computed_tokens": computed,  # prompt tokens run through the model, all requests
    }
    print(json.dumps(line), flush=True)
    return line


def ttft_mlx(model, tokenizer, prompt: Sequence[int], prompt_cache=None) -> float:
    start = time.perf_counter()
    for _ in stream_generate(
        model, tokenizer, list(prompt), max_tokens=1, prompt_cache=prompt_cache
    ):
        break
    return time.perf_counter() - start


def report(system: str, case: str, times: list[float], prompts, cached: list[int]) -> dict:
    line = {
        "bench": "prefix_cache",
        "system": system,
        "case": case,
        "n": len(times),
        "ttft_p50_s": round(statistics.median(times), 3),
        "ttft_s": [round(t, 3) for t in times],
        "prompt_tokens_p50": int(statistics.median(len(p) for p in prompts)),
        "cached_tokens_p50": int(statistics.median(cached)) if cached else None,
    }
    print(json.dumps(line), flush=True)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder or name (default: the default chat model)")
    parser.add_argument("--contexts", type=int, default=3, help="samples per case")
    parser.add_argument("--context-tokens", type=int, default=2048)
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=EngineConfig.max_num_batched_tokens,
        help="the engine's prefill chunk (its default unless given)",
    )
    parser.add_argument("--no-mlx-lm", action="store_true", help="skip the mlx-lm baseline")
    parser.add_argument(
        "--burst", type=int, default=8, help="requests in the burst case (0: skip it)"
    )
    args = parser.parse_args()
    if args.contexts * 3 > len(QUESTIONS):
        parser.error(f"--contexts must be <= {len(QUESTIONS) // 3}")

    path = resolve_chat_model(args.model) if args.model else default_chat_model()
    cache_dir = Path(tempfile.mkdtemp(prefix="kv-bench-"))
    base = {"max_num_batched_tokens": args.max_num_batched_tokens, "prefix_cache_dir": cache_dir}

    def config(**overrides) -> EngineConfig:
        return EngineConfig(**{**base, **overrides})  # type: ignore[arg-type]

    model, tokenizer = load(str(path))  # mlx-lm's own copy, for its baseline
    plain = Engine.from_path(path, config=config(prefix_cache_ram_bytes=0))
    cached = Engine.from_path(path, config=config())
    n = args.contexts
    contexts = [context(k, args.context_tokens, plain.count_tokens) for k in range(n)]
    prompts = [
        [
            plain.apply_chat_template(messages(ctx, QUESTIONS[k + i * n]))
            for k, ctx in enumerate(contexts)
        ]
        for i in range(3)
    ]  # prompts[i][k]: question set i on context k
    warm_up = plain.apply_chat_template(messages("warm up", "ok?"))

    # 1. Cold, interleaved per context: no cache, cache (stores the context), mlx-lm.
    for engine in (plain, cached):
        ttft_engine(engine, warm_up)  # MLX kernels and buffers, so no sample pays for them
    if not args.no_mlx_lm:
        ttft_mlx(model, tokenizer, warm_up)
    cold_nocache, cold, mlx_cold = [], [], []
    for prompt in prompts[0]:
        cold_nocache.append(ttft_engine(plain, prompt))
        cold.append(ttft_engine(cached, prompt))
        if not args.no_mlx_lm:
            mlx_cold.append(ttft_mlx(model, tokenizer, prompt))
    plain.close()
    cached.close()  # finishes the SSD writes

    # 2. Hits after a restart, interleaved per context: SSD, then RAM, then mlx-lm's cache.
    started = time.perf_counter()
    restarted = Engine.from_path(path, config=config())
    start_s = time.perf_counter() - started
    ttft_engine(restarted, warm_up)
    ssd, ram, mlx_hits, mlx_cached = [], [], [], []
    for k in range(n):
        ssd.append(ttft_engine(restarted, prompts[1][k]))
        ram.append(ttft_engine(restarted, prompts[2][k]))
        if not args.no_mlx_lm:
            shared = common_prefix(prompts[0][k], prompts[2][k])
            prompt_cache = make_prompt_cache(model)
            for start in range(0, shared, PREFILL_STEP):  # what mlx_lm.cache_prompt does
                chunk = prompts[2][k][start : min(shared, start + PREFILL_STEP)]
                model(mx.array(chunk)[None], cache=prompt_cache)
                mx.eval([c.state for c in prompt_cache])
            mlx_hits.append(
                ttft_mlx(model, tokenizer, prompts[2][k][shared:], copy.deepcopy(prompt_cache))
            )
            mlx_cached.append(shared)
    # 3. The next turn of each chat: the answer's blocks were cached when it finished.
    turns = []
    for k, ctx in enumerate(contexts):
        reply = restarted.decode(answer(restarted, prompts[2][k], 24))
        chat = [
            *messages(ctx, QUESTIONS[k + 2 * n]),
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "Say that again in one sentence."},
        ]
        prompt = restarted.apply_chat_template(chat)
        turns.append((prompt, ttft_engine(restarted, prompt)))
    stats = restarted.prefix_cache_stats()
    restarted.close()

    def times(pairs):
        return [t for t, _ in pairs]

    def hits(pairs):
        return [c for _, c in pairs]

    report("engine", "cold_nocache", times(cold_nocache), prompts[0], [])
    report("engine", "cold", times(cold), prompts[0], hits(cold))
    report("engine", "ssd_hit", times(ssd), prompts[1], hits(ssd))
    report("engine", "ram_hit", times(ram), prompts[2], hits(ram))
    report(
        "engine",
        "next_turn",
        times(t for _, t in turns),
        [p for p, _ in turns],
        hits(t for _, t in turns),
    )
    if not args.no_mlx_lm:
        report("mlx_lm", "cold", mlx_cold, prompts[0], [])
        report("mlx_lm", "prompt_cache", mlx_hits, prompts[2], mlx_cached)
    line = {
        "bench": "prefix_cache",
        "system": "engine",
        "case": "restart",
        "engine_start_s": round(start_s, 3),  # load + fingerprint + SSD index
        "block_size": stats.block_size,
        "ssd_blocks": stats.ssd_blocks,
        "ssd_bytes": stats.ssd_bytes,
        "ssd_hit_tokens": stats.num_ssd_hit_tokens,
        "hit_tokens": stats.num_hit_tokens,
    }
    print(json.dumps(line), flush=True)
    shutil.rmtree(cache_dir, ignore_errors=True)

    # 4. A burst of requests on one new context (index n: no block of it is cached anywhere).
    if args.burst > 1:
        ctx = context(n, args.context_tokens, plain.count_tokens)
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.burst)]
        burst_prompts = [plain.apply_chat_template(messages(ctx, q)) for q in questions]
        burst_config = config(max_num_seqs=max(args.burst, 16), prefix_cache_ssd_bytes=0)
        burst(path, burst_config, burst_prompts)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


if __name__ == "__main__":
    main()
