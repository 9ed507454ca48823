"""Engine vs mlx-lm, side by side in one process: decode under concurrency, and prefill.

Per concurrency level (default 1, 4, 16) both systems generate the same number of tokens per
stream from the same chat prompts, sampling at temperature 0.6 / top_p 0.95 / top_k 20 with a
fixed seed; EOS is ignored so every stream produces exactly --tokens tokens:

    mlx-lm, concurrency 1: `stream_generate` (what `mlx_lm.generate` runs), --repeats requests
    mlx-lm, concurrency > 1: `BatchGenerator` with its default batch sizes, all requests at once
    engine: all requests submitted at once, read from their streams

Reported per level and system (one JSON line each): TTFT p50/p99 (submit to first token), decode
tok/s per stream (p50 over streams, after the first token), aggregate tok/s (all tokens / wall
time) and the engine's ratios to mlx-lm; then prefill tok/s of a long prompt (time to the first
token), and batch-1 decode against the weight-bandwidth floor (weight bytes / measured copy
bandwidth). Systems alternate within each level, so drift on a shared machine hits both.

    .venv/bin/python benchmarks/engine.py                    # default chat model, a few minutes
    .venv/bin/python benchmarks/engine.py --tokens 16 --concurrency 1,4
    python3 benchmarks/engine.py --random-shape qwen3-8b --dtype bfloat16 \
        --max-num-batched-tokens 2048 --pass-cost-tokens 512  # a GPU (MLX's CUDA backend)

--random-shape builds a random-weight llama-architecture model of a real model's shape in memory,
with a small byte-level tokenizer (ids past its vocabulary decode to nothing): decode and prefill
speed need the shape, not trained weights. Both systems share one model object.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import inference  # noqa: F401  (loads the BLAS before mlx)
from inference.chat_model import resolve_chat_model
from inference.engine import Engine, EngineConfig, GenerationRequest
from inference.sampling import SamplingParams
from inference.stopping import StopParams

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm import load, stream_generate
from mlx_lm.generate import BatchGenerator
from mlx_lm.models import llama
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import load as load_tokenizer

TEMPERATURE, TOP_P, TOP_K = 0.6, 0.95, 20
TOPICS = [
    "how a hash table handles collisions",
    "why the sky is blue",
    "the water cycle",
    "how vaccines train the immune system",
    "what a compiler does",
    "how photosynthesis stores energy",
    "the causes of inflation",
    "how TCP recovers from packet loss",
    "what makes a good unit test",
    "how a transformer language model predicts text",
    "the history of the printing press",
    "how SQLite stores a table on disk",
    "why bridges have expansion joints",
    "how an electric motor works",
    "what plate tectonics explains",
    "how a search engine ranks pages",
]
SHAPES = {  # llama-architecture stand-ins for real models' shapes
    "qwen3-8b": dict(
        hidden_size=4096,
        num_hidden_layers=36,
        intermediate_size=12288,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        num_hidden_layers=30,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        rope_theta=1e5,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
}
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LONG_TEXT = (
    "Retrieval augmented generation answers questions from a private document collection. "
    "Documents are split into chunks, each chunk is embedded into a vector, and the vectors are "
    "stored in an index beside a full-text index. At question time the question is embedded, "
    "the nearest chunks are retrieved and reranked, and the best ones are placed in the prompt "
    "of a language model, which writes an answer that cites its sources. "
)


@dataclass
class StreamTimes:
    """One stream's timeline, in seconds from the common start."""

    first: float
    last: float
    num_tokens: int


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def summarize(system: str, concurrency: int, streams: list[StreamTimes], wall_s: float) -> dict:
    ttfts = [s.first for s in streams]
    rates = [
        (s.num_tokens - 1) / (s.last - s.first)
        for s in streams
        if s.num_tokens > 1 and s.last > s.first
    ]
    return {
        "bench": "decode",
        "system": system,
        "concurrency": concurrency,
        "tokens_per_stream": streams[0].num_tokens,
        "ttft_p50_s": round(percentile(ttfts, 50), 3),
        "ttft_p99_s": round(percentile(ttfts, 99), 3),
        "decode_tok_s_per_stream": round(statistics.median(rates), 2),
        "aggregate_tok_s": round(sum(s.num_tokens for s in streams) / wall_s, 2),
    }


def chat_prompts(engine: Engine, count: int) -> list[list[int]]:
    return [
        engine.apply_chat_template(
            [{"role": "user", "content": f"Explain {TOPICS[i % len(TOPICS)]} in detail."}]
        )
        for i in range(count)
    ]


def run_engine(
    engine: Engine, prompts: list[list[int]], num_tokens: int, seed: int
) -> tuple[list[StreamTimes], float]:
    """Submit all prompts at once; read every stream from one asyncio loop, as a server would."""
    params = SamplingParams(temperature=TEMPERATURE, top_p=TOP_P, top_k=TOP_K, seed=seed)

    async def read_all() -> list[StreamTimes]:
        start = time.perf_counter()
        handles = [
            engine.submit(
                GenerationRequest(p, params, StopParams(max_tokens=num_tokens), ignore_eos=True)
            )
            for p in prompts
        ]

        async def read(handle) -> StreamTimes:
            stamps = [time.perf_counter() - start async for _ in handle]
            return StreamTimes(stamps[0], stamps[-1], len(stamps))

        return list(await asyncio.gather(*(read(h) for h in handles)))

    times = asyncio.run(read_all())
    return times, max(t.last for t in times)


def run_mlx_single(model, tokenizer, prompt: list[int], num_tokens: int) -> StreamTimes:
    sampler = make_sampler(TEMPERATURE, top_p=TOP_P, top_k=TOP_K)
    start = time.perf_counter()
    first = last = 0.0
    count = 0
    for _ in stream_generate(model, tokenizer, prompt, max_tokens=num_tokens, sampler=sampler):
        last = time.perf_counter() - start
        if count == 0:
            first = last
        count += 1
    return StreamTimes(first, last, count)


def run_mlx_batch(
    model, prompts: list[list[int]], num_tokens: int
) -> tuple[list[StreamTimes], float]:
    sampler = make_sampler(TEMPERATURE, top_p=TOP_P, top_k=TOP_K)
    generator = BatchGenerator(model, max_tokens=num_tokens, sampler=sampler)
    start = time.perf_counter()
    uids = generator.insert(prompts, max_tokens=[num_tokens] * len(prompts))
    firsts: dict[int, float] = {}
    lasts: dict[int, float] = {}
    counts = dict.fromkeys(uids, 0)
    done: set[int] = set()
    while len(done) < len(uids):
        for response in generator.next_generated():
            now = time.perf_counter() - start
            firsts.setdefault(response.uid, now)
            lasts[response.uid] = now
            counts[response.uid] += 1
            if response.finish_reason is not None:
                done.add(response.uid)
    generator.close()
    wall = max(lasts.values())
    return [StreamTimes(firsts[u], lasts[u], counts[u]) for u in uids], wall


def decode_levels(args, engine: Engine, model, mlx_tokenizer) -> dict[int, dict[str, dict]]:
    results: dict[int, dict[str, dict]] = {}
    for concurrency in args.concurrency:
        prompts = chat_prompts(engine, concurrency)
        mx.random.seed(args.seed)
        rows: dict[str, dict] = {}
        if concurrency == 1:
            # Sequential requests, alternating systems; TTFT percentiles over the repeats.
            mlx_runs, engine_runs = [], []
            for i in range(args.repeats):
                p = chat_prompts(engine, i + 1)[i:]
                mlx_runs.append(run_mlx_single(model, mlx_tokenizer, p[0], args.tokens))
                engine_runs.append(run_engine(engine, p, args.tokens, args.seed + i)[0][0])
            for system, runs in (("mlx_lm", mlx_runs), ("engine", engine_runs)):
                wall = sum(r.last for r in runs)
                rows[system] = summarize(system, 1, runs, wall)
        else:
            if args.warmup_each_level:  # first-seen shapes JIT-compile kernels on a GPU
                run_mlx_batch(model, prompts, args.tokens)
                run_engine(engine, prompts, args.tokens, args.seed)
            streams, wall = run_mlx_batch(model, prompts, args.tokens)
            rows["mlx_lm"] = summarize("mlx_lm", concurrency, streams, wall)
            streams, wall = run_engine(engine, prompts, args.tokens, args.seed)
            rows["engine"] = summarize("engine", concurrency, streams, wall)
        base = rows["mlx_lm"]
        ours = rows["engine"]
        ours["ratio_ttft_p50"] = round(base["ttft_p50_s"] / ours["ttft_p50_s"], 2)
        for key in ("decode_tok_s_per_stream", "aggregate_tok_s"):
            ours[f"ratio_{key}"] = round(ours[key] / base[key], 2)
        if 1 in results:  # against serving the same requests one at a time with mlx-lm
            ours["ratio_aggregate_vs_mlx_lm_sequential"] = round(
                ours["aggregate_tok_s"] / results[1]["mlx_lm"]["aggregate_tok_s"], 2
            )
        for row in (base, ours):
            print(json.dumps(row), flush=True)
        results[concurrency] = rows
    return results


def prefill(args, engine: Engine, model, mlx_tokenizer) -> None:
    text = LONG_TEXT * 40
    ids = engine.apply_chat_template([{"role": "user", "content": text}])
    ids = ids[-args.prefill_tokens :]
    rows = {}
    if args.warmup_each_level:
        run_mlx_single(model, mlx_tokenizer, ids, 1)
        run_engine(engine, [ids], 1, args.seed)
    for system in ("mlx_lm", "engine"):
        if system == "mlx_lm":
            t = run_mlx_single(model, mlx_tokenizer, ids, 1).first
        else:
            t = run_engine(engine, [ids], 1, args.seed)[0][0].first
        rows[system] = {
            "bench": "prefill",
            "system": system,
            "prompt_tokens": len(ids),
            "ttft_s": round(t, 2),
            "prefill_tok_s": round(len(ids) / t, 1),
            "max_num_batched_tokens": engine.config.max_num_batched_tokens
            if system == "engine"
            else None,
        }
    rows["engine"]["ratio_prefill_tok_s"] = round(
        rows["engine"]["prefill_tok_s"] / rows["mlx_lm"]["prefill_tok_s"], 2
    )
    for row in rows.values():
        print(json.dumps(row), flush=True)


def measure_bandwidth() -> float:
    """Bytes/s of the faster of a 256 MiB copy and a 256 MiB matrix-vector product (BLAS)."""
    source = mx.ones((8192, 8192), mx.float32)
    vector = mx.ones((8192, 1), mx.float32)
    mx.eval(source, vector)
    best_copy = best_gemv = float("inf")
    for _ in range(5):
        tic = time.perf_counter()
        mx.eval(source + 1)  # reads and writes 256 MiB
        best_copy = min(best_copy, time.perf_counter() - tic)
        tic = time.perf_counter()
        mx.eval(source @ vector)  # reads 256 MiB, as a decode step reads its weights
        best_gemv = min(best_gemv, time.perf_counter() - tic)
    return max(2 * source.nbytes / best_copy, source.nbytes / best_gemv)


def bandwidth_floor(model, results: dict[int, dict[str, dict]]) -> None:
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    bandwidth = measure_bandwidth()
    floor = bandwidth / weight_bytes
    row = {
        "bench": "bandwidth_floor",
        "weight_bytes": weight_bytes,
        "bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "floor_decode_tok_s": round(floor, 2),
    }
    if 1 in results:
        for system in ("mlx_lm", "engine"):
            rate = results[1][system]["decode_tok_s_per_stream"]
            row[f"{system}_batch1_fraction_of_floor"] = round(rate / floor, 3)
    print(json.dumps(row), flush=True)


def random_model(shape: str, dtype: str, folder: Path):
    """A random-weight model of a named shape and a small ChatML tokenizer written to folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([LONG_TEXT, *TOPICS] * 4, trainer=trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "chat_template": CHATML,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(model_type="llama", **SHAPES[shape]))
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    return model, load_tokenizer(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the chat model)")
    parser.add_argument("--random-shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--dtype", default="bfloat16", help="weights of --random-shape")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per stream")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    parser.add_argument("--repeats", type=int, default=3, help="sequential requests at level 1")
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens
    )
    parser.add_argument("--pass-cost-tokens", type=int, default=EngineConfig.pass_cost_tokens)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument(
        "--warmup-each-level",
        action="store_true",
        help="an unmeasured run of each level first (GPU: kernels compile per shape)",
    )
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]

    if args.random_shape:
        source = f"random {args.random_shape} {args.dtype}"
        folder = Path(tempfile.mkdtemp()) / "tokenizer"
        model, tokenizer = random_model(args.random_shape, args.dtype, folder)
        engine_model, _ = random_model(args.random_shape, args.dtype, folder)  # same seed
    else:
        path = Path(args.model) if args.model else resolve_chat_model(None)
        source = str(path)
        model, tokenizer = load(str(path))
        engine_model, _ = load(str(path))
    config = EngineConfig(
        max_num_seqs=max(16, *args.concurrency),
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=min(8192, getattr(model.args, "max_position_embeddings", 8192)),
        pass_cost_tokens=args.pass_cost_tokens,
    )
    # Each system its own model object: the engine fuses its MLPs' activations on a CPU,
    # mlx-lm runs the model as it loads.
    engine = Engine(engine_model, tokenizer, config=config, model_name=source)
    tokenizer.eos_token_ids = []  # mlx-lm stops at EOS; both systems ignore it here
    setup = {
        "bench": "setup",
        "model": source,
        "device": str(mx.default_device()),
        "engine_config": dataclasses.asdict(config),
        "temperature": TEMPERATURE,
        "top_p": TOP_P,
        "top_k": TOP_K,
        "seed": args.seed,
    }
    print(json.dumps(setup), flush=True)
    try:
        # Warm-up: one short request each, so neither pays first-call costs.
        warm = chat_prompts(engine, 1)
        run_mlx_single(model, tokenizer, warm[0], 4)
        run_engine(engine, warm, 4, args.seed)
        results = decode_levels(args, engine, model, tokenizer)
        if not args.skip_prefill:
            prefill(args, engine, model, tokenizer)
        bandwidth_floor(model, results)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
