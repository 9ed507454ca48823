"""One decode step over R rows, taken apart: our runner against mlx-lm's BatchKVCache, and sampling.

Where the engine's multi-row decode loses to mlx-lm's batch generation (issue 4, on the GPU),
this shows which part does: for R = 1, 4, 16 rows with contexts of mixed lengths it times, after
a warm-up, the median milliseconds of

    ours        ModelRunner.execute over the slot KV cache (scatter write, bool mask) + eval
    ours_equal  the same with every row at the same length
    ours_write  only the slot cache's write + fetch (views) for every layer (no model)
    mlx_lm      the model over mlx-lm's left-padded BatchKVCache (slice write, its mask) + eval
    sampling    compute_probs + sample for R rows (T 0.6, top_p 0.95, top_k 20)

One JSON line per (rows, part).

    .venv/bin/python benchmarks/decode_rows.py --random-shape smollm2-135m --dtype float32
    python3 benchmarks/decode_rows.py --random-shape qwen3-8b --dtype bfloat16     # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import inference  # noqa: F401  (loads the BLAS before mlx)
from inference.runner import ModelRunner, RunnerConfig
from inference.runner_cache import PassRows
from inference.sampling import SamplingParams, compute_probs, sample
from inference.scheduler import ScheduledItem, ScheduledStep

import mlx.core as mx
from mlx_lm.models import llama
from mlx_lm.models.cache import BatchKVCache

sys.path.insert(0, str(Path(__file__).parent))
from engine import SHAPES  # the same stand-in shapes as benchmarks/engine.py

PARAMS = SamplingParams(temperature=0.6, top_p=0.95, top_k=20, seed=0)


def timed(step: Callable[[], object], repeats: int) -> float:
    """Median ms of step(), evaluated, after two warm-up calls."""
    samples = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        mx.eval(step())
        if i >= 2:
            samples.append(1000 * (time.perf_counter() - start))
    return statistics.median(samples)


def context_lengths(rows: int, base: int, equal: bool) -> list[int]:
    return [base] * rows if equal else [base + 37 * i % 101 for i in range(rows)]


def ours(model, rows: int, base: int, equal: bool, repeats: int) -> float:
    runner = ModelRunner(model, RunnerConfig(num_slots=rows, pass_cost_tokens=8))
    lengths = context_lengths(rows, base, equal)
    ids = {f"r{i}": [1 + (7 * j + i) % 400 for j in range(n + 1)] for i, n in enumerate(lengths)}
    prefill = ScheduledStep(
        items=tuple(ScheduledItem(rid, 0, len(t) - 1, 0, False) for rid, t in ids.items()),
        preempted_ids=(),
    )
    runner.execute(prefill, ids)
    mx.eval(runner.cache.arrays())
    positions = {rid: len(t) - 1 for rid, t in ids.items()}

    def step() -> list[mx.array]:
        items = tuple(ScheduledItem(rid, positions[rid], 1, 0, True) for rid in ids)
        out = runner.execute(ScheduledStep(items=items, preempted_ids=()), ids)
        for rid in ids:
            runner.cache.trim(rid, 1)  # the same context every time
        return [out.logits, *runner.cache.arrays()]

    return timed(step, repeats)


def ours_write(model, rows: int, base: int, repeats: int) -> float:
    runner = ModelRunner(model, RunnerConfig(num_slots=rows))
    cache = runner.cache
    lengths = context_lengths(rows, base, equal=False)
    args = model.args
    heads, dim = (
        args.num_key_value_heads,
        args.head_dim or args.hidden_size // args.num_attention_heads,
    )
    dtype = model.layers[0].self_attn.q_proj.weight.dtype
    for i, n in enumerate(lengths):
        cache.allocate(f"r{i}")
        cache.expect(n + 1)
        zeros = [mx.zeros((heads, n, dim), dtype)] * cache.num_layers
        cache.load(f"r{i}", zeros, zeros)
    mx.eval(cache.arrays())
    pass_rows = PassRows(tuple(range(rows)), tuple(lengths), 1)
    new = mx.zeros((rows, heads, 1, dim), dtype)

    def step() -> list[mx.array]:
        outs = []
        for view in cache.views(pass_rows):
            outs.extend(view.update_and_fetch(new, new))  # fetched views: no read of the KV
        for request_id in range(rows):
            cache.trim(f"r{request_id}", 1)  # the same context every time
        return [*outs, *cache.arrays()]

    return timed(step, repeats)


def mlx_lm_batch(model, rows: int, base: int, repeats: int) -> float:
    lengths = context_lengths(rows, base, equal=False)
    longest = max(lengths)
    padding = [longest - n for n in lengths]
    prompts = mx.array(
        [[0] * p + [1 + j % 400 for j in range(n)] for p, n in zip(padding, lengths, strict=True)]
    )
    caches = [BatchKVCache(padding) for _ in model.layers]
    mx.eval(model(prompts, cache=caches))
    tokens = mx.ones((rows, 1), dtype=mx.int32)

    def step() -> mx.array:
        logits = model(tokens, cache=caches)
        for cache in caches:
            cache.trim(1)  # the same context every time
        return logits

    return timed(step, repeats)


def sampling(vocab: int, rows: int, repeats: int) -> float:
    logits = mx.random.normal((rows, vocab))
    mx.eval(logits)
    params = [PARAMS] * rows
    return timed(
        lambda: sample(
            compute_probs(logits, params, [[1]] * rows, [[]] * rows), [0] * rows, [5] * rows
        ),
        repeats,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random-shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--context", type=int, default=256, help="base context length per row")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(model_type="llama", **SHAPES[args.random_shape]))
    model.set_dtype(getattr(mx, args.dtype))
    mx.eval(model.parameters())
    common = {
        "bench": "decode_rows",
        "shape": args.random_shape,
        "dtype": args.dtype,
        "device": str(mx.default_device()),
        "context": args.context,
    }
    for rows in (int(r) for r in args.rows.split(",")):
        parts: dict[str, Callable[[int], float]] = {
            "ours": lambda r: ours(model, r, args.context, False, args.repeats),
            "ours_equal": lambda r: ours(model, r, args.context, True, args.repeats),
            "ours_write": lambda r: ours_write(model, r, args.context, args.repeats),
            "mlx_lm": lambda r: mlx_lm_batch(model, r, args.context, args.repeats),
            "sampling": lambda r: sampling(model.args.vocab_size, r, args.repeats),
        }
        for part, run in parts.items():
            line = common | {"rows": rows, "part": part, "ms_p50": round(run(rows), 3)}
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
