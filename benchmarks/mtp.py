"""MTP speculative decoding vs plain decoding at batch 1, side by side in one process.

Modes, each generating --tokens tokens from the same chat prompt (stops ignored):

    mlx-lm   mlx-lm's own `generate_step` with its sampler (the baseline to beat)
    ar       our plain decoding (`mtp_decode.iter_plain`: compute_probs + keyed sample)
    d1..d3   the MTP lane (`mtp_decode.MTPDecoder`) at depth 1..3

at temperature 0 and at 0.6 / top_p 0.95 / top_k 20. Modes alternate within each repeat, so drift
on a shared machine hits all of them.

Then the lane as served (`--section engine`): the batching engine with its MTP lane routed by
load (adaptive depth, and fixed D1..D3 at batch 1) against the same engine with the lane off, at
1, 4 and 16 concurrent streams (`mtp_engine` lines: decode tok/s per stream, aggregate tok/s,
the share of tokens the lane committed and the acceptance). One engine per mode serves every
round, as a server does, so the adaptive policy keeps what earlier rounds measured (the first
round warms up). `--workload rag` gives the engine section the appliance's own prompts instead:
the RAG prompt (`rag.prompt`: system prompt, numbered sources, question) over ~600 tokens of
`examples/docs`, a new question and passage window every round; its answers stop at their
end-of-sequence token as served ones do (`--eos ignore` forces --tokens; chat streams always run
to --tokens unless `--eos stop`). Seeded T=0.6 requests ask for
generation_mode "mtp" (in "auto" a seeded sampled request keeps plain decoding). Per mode and setting one JSON line: time to first token
(prefill), decode tok/s after the first token (p50 and p99 over repeats), ratio to `ar`, and for
the lane the acceptance per depth and tokens per cycle. Then one line of pass costs: a trunk
forward over W = 1..4 new tokens at the prompt's context (a verify pass at depth W - 1) and one
head step, in ms and as a ratio to the W = 1 decode step.

The head is --head, else the model's own (native `mtp.*`, sidecar `mtp_head.safetensors`, or one
shipped in inference/heads/ for it), else a random generic head: acceptance is then ~0 and the
numbers show the lane's overhead.

    .venv/bin/python benchmarks/mtp.py                       # default chat model, ~a minute
    .venv/bin/python benchmarks/mtp.py --model PATH --tokens 128 --repeats 5
    .venv/bin/python benchmarks/mtp.py --section engine --concurrency 1,4,16
    .venv/bin/python benchmarks/mtp.py --section engine --concurrency 1 --workload rag
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import inference  # noqa: F401  (loads the BLAS before mlx)
from inference.backend import GenerationRequest
from inference.chat_model import default_chat_model, resolve_chat_model
from inference.engine import Engine, EngineConfig
from inference.mtp_decode import MTPDecoder, Trunk, iter_plain
from inference.mtp_head import MTPHead, load_head, load_sidecar_head, make_generic_head
from inference.sampling import SamplingParams
from inference.stopping import StopParams

import mlx.core as mx
import numpy as np
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

SETTINGS = {
    "greedy": SamplingParams(temperature=0.0, seed=0),
    "t0.6_p0.95_k20": SamplingParams(temperature=0.6, top_p=0.95, top_k=20, seed=0),
}
PROMPT = "Explain how a hash table handles collisions, with an example in Python."
RAG_DOCS = ("visitor-guide.md", "history.txt")  # plain-text files of examples/docs
RAG_QUESTIONS = (
    "When are the public observing nights held?",
    "What should visitors bring with them?",
    "Who founded the observatory, and when?",
    "What happens to an event when the sky is cloudy?",
    "How can I get to the observatory without a car?",
    "Which telescopes can visitors look through?",
    "What are the rules for children?",
    "How did the observatory change over the years?",
)
RAG_PROMPT_TOKENS = 600


def time_tokens(tokens: Iterator[int], num_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, decode tok/s over the rest)."""
    start = time.perf_counter()
    first = last = start
    for count, _ in enumerate(tokens, start=1):
        last = time.perf_counter()
        if count == 1:
            first = last
        if count == num_tokens:
            break
    return first - start, (num_tokens - 1) / max(last - first, 1e-9)


def run_modes(
    model, trunk: Trunk, head: MTPHead, prompt: list[int], params: SamplingParams, args
) -> dict[str, dict]:
    """All modes, alternating within each repeat; returns per-mode timings and lane stats."""
    sampler = make_sampler(params.temperature, top_p=params.top_p, top_k=params.top_k)
    decoders: dict[str, MTPDecoder] = {}

    def lane(depth: int) -> Callable[[], Iterator[int]]:
        def tokens() -> Iterator[int]:
            decoders[f"d{depth}"] = MTPDecoder(trunk, head, params, depth)
            return decoders[f"d{depth}"].generate(prompt, args.tokens)

        return tokens

    modes: dict[str, Callable[[], Iterator[int]]] = {
        "mlx-lm": lambda: (
            int(t) for t, _ in generate_step(mx.array(prompt), model, sampler=sampler)
        ),
        "ar": lambda: iter_plain(model, prompt, params),
        **{f"d{depth}": lane(depth) for depth in (1, 2, 3)},
    }
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
    accepted: dict[str, list[list[float]]] = {mode: [] for mode in modes}
    for repeat in range(args.repeats + 1):  # repeat 0 warms up
        for mode, make_tokens in modes.items():
            result = time_tokens(make_tokens(), args.tokens)
            if repeat:
                times[mode].append(result)
                if mode in decoders:
                    stats = decoders[mode].stats
                    accepted[mode].append([*stats.acceptance_by_depth, stats.tokens_per_cycle])
    results = {}
    for mode, pairs in times.items():
        rates = [rate for _, rate in pairs]
        results[mode] = {
            "ttft_p50_s": round(statistics.median(t for t, _ in pairs), 4),
            "decode_tok_s_p50": round(float(np.percentile(rates, 50)), 2),
            "decode_tok_s_p99": round(float(np.percentile(rates, 99)), 2),
        }
        if accepted[mode]:
            mean = np.mean(accepted[mode], axis=0)
            results[mode]["acceptance_by_depth"] = [round(float(a), 3) for a in mean[:-1]]
            results[mode]["tokens_per_cycle"] = round(float(mean[-1]), 3)
    return results


def pass_costs(model, trunk: Trunk, head: MTPHead, prompt: list[int], repeats: int) -> dict:
    """ms per trunk forward over W new tokens after the prompt, and per head step."""

    def timed(run: Callable[[], mx.array]) -> float:
        samples = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            mx.eval(run())
            samples.append(time.perf_counter() - start)
        return 1000 * statistics.median(samples[1:])

    costs = {}
    for width in (1, 2, 3, 4):
        cache = make_prompt_cache(model)
        mx.eval(trunk.forward(prompt, cache, "post_norm"))

        def verify(cache=cache, width=width) -> mx.array:
            result = trunk.forward(prompt[:width], cache, "post_norm")[1]
            for c in cache:
                c.trim(width)  # back to the prompt, so every sample sees the same context
            return result

        costs[f"forward_w{width}_ms"] = timed(verify)
    head_cache = head.make_cache()
    hiddens, _ = trunk.forward(prompt, make_prompt_cache(model), "post_norm")
    mx.eval(head(trunk.embed(prompt), hiddens, head_cache))

    def head_step() -> mx.array:
        hidden = head(trunk.embed(prompt[-1:]), hiddens[:, -1:], head_cache)
        out = trunk.draft_logits(hidden, head.draft_ids)  # over the draft vocabulary if any
        for c in head_cache:
            c.trim(1)
        return out

    costs["head_step_ms"] = timed(head_step)
    step = costs["forward_w1_ms"]
    ratios = {k.replace("_ms", "_x_decode"): round(v / step, 3) for k, v in costs.items()}
    return {k: round(v, 3) for k, v in costs.items()} | ratios


ENGINE_MODES: dict[str, dict] = {
    "batch": {"mtp": False},
    "lane_auto": {"mtp": True, "mtp_depth": None},
    "lane_d1": {"mtp": True, "mtp_depth": 1},
    "lane_d2": {"mtp": True, "mtp_depth": 2},
    "lane_d3": {"mtp": True, "mtp_depth": 3},
}


def engine_round(
    engine: Engine,
    prompts: list[list[int]],
    params: SamplingParams,
    num_tokens: int,
    *,
    stop_at_eos: bool = False,
) -> dict:
    """All prompts at once; per-stream decode rates from chunk arrival times, lane counters.
    Streams run to num_tokens, or to their end-of-sequence token with stop_at_eos."""
    import threading

    mode = "mtp" if params.seed is not None and params.temperature > 0 else "auto"
    results: list[dict] = [{} for _ in prompts]
    start = time.perf_counter()

    def consume(index: int, handle) -> None:
        first = last = None
        count = 0
        final = None
        for chunk in handle:
            now = time.perf_counter()
            count += len(chunk.token_ids)
            first = now if first is None else first
            last = now
            final = chunk
        results[index] = {
            "ttft": (first or start) - start,
            "rate": (count - 1) / max((last or 0) - (first or 0), 1e-9),
            "tokens": count,
            "stats": final.speculation if final else None,
        }

    handles = [
        engine.submit(
            GenerationRequest(
                tuple(prompt),
                params,
                StopParams(max_tokens=num_tokens),
                ignore_eos=not stop_at_eos,
                generation_mode=mode,
            )
        )
        for prompt in prompts
    ]
    threads = [threading.Thread(target=consume, args=(i, h)) for i, h in enumerate(handles)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    lane_tokens = sum(r["stats"].mtp_tokens for r in results if r["stats"] is not None)
    cycles = sum(r["stats"].num_cycles for r in results if r["stats"] is not None)
    accepted = sum(r["stats"].num_accepted for r in results if r["stats"] is not None)
    drafted = sum(r["stats"].num_drafted for r in results if r["stats"] is not None)
    total = sum(r["tokens"] for r in results)
    return {
        "rates": [r["rate"] for r in results],
        "ttfts": [r["ttft"] for r in results],
        "aggregate": total / elapsed,
        "lane_share": lane_tokens / max(total, 1),
        "cycles": cycles,
        "accepted_per_draft": accepted / max(drafted, 1),
        "tokens_per_cycle": (lane_tokens / cycles) if cycles else 0.0,
        "tokens_per_stream": total / len(results),
    }


def rag_prompt(tokenizer, index: int) -> list[int]:
    """The appliance's RAG prompt: question `index` over a window of example passages."""
    repo = Path(__file__).resolve().parents[1]
    if str(repo) not in sys.path[:1]:
        sys.path.insert(0, str(repo))  # the `rag` package, not benchmarks/rag.py beside us
    from rag.prompt import Passage, assemble_prompt

    docs = repo / "examples" / "docs"
    paragraphs = [
        (name, text.strip())
        for name in RAG_DOCS
        for text in (docs / name).read_text(encoding="utf-8").split("\n\n")
        if len(text.split()) >= 12
    ]
    start = (5 * index) % len(paragraphs)
    window = (paragraphs + paragraphs)[start : start + 12]
    passages = [
        Passage(chunk_id=start + rank, text=text, source=name, rank=rank)
        for rank, (name, text) in enumerate(window)
    ]
    prompt = assemble_prompt(
        RAG_QUESTIONS[index % len(RAG_QUESTIONS)],
        passages,
        count_tokens=lambda text: len(tokenizer.encode(text)),
        max_prompt_tokens=RAG_PROMPT_TOKENS,
    )
    return list(tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True))


def run_engine_section(model, tokenizer, head: MTPHead, prompt_text: str, common: dict, args):
    """The served lane vs the lane off, per concurrency, modes alternating within repeats."""

    def prompts_of(round_index: int, concurrency: int) -> list[list[int]]:
        # New text every round: this section measures the lane, not the prefix cache.
        if args.workload == "rag":
            return [
                rag_prompt(tokenizer, round_index * concurrency + i) for i in range(concurrency)
            ]
        return [
            list(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": f"{prompt_text} (round {round_index}, {i})"}],
                    add_generation_prompt=True,
                )
            )
            for i in range(concurrency)
        ]

    # RAG answers are short and end at EOS; text forced past it is not what the appliance serves.
    stop_at_eos = args.eos == "stop" or (args.eos == "auto" and args.workload == "rag")
    common = common | {"stop_at_eos": stop_at_eos}
    for concurrency in args.concurrency:
        modes = list(ENGINE_MODES) if concurrency == 1 else ["batch", "lane_auto"]
        for setting, params in SETTINGS.items():
            rounds: dict[str, list[dict]] = {mode: [] for mode in modes}
            # One engine per mode for all repeats, as a server keeps one: the adaptive policy
            # carries what it measured from round to round (repeat 0 warms it up).
            with ExitStack() as stack:
                engines = {
                    mode: stack.enter_context(
                        Engine(
                            model,
                            tokenizer,
                            config=EngineConfig(
                                max_num_seqs=max(16, concurrency), **ENGINE_MODES[mode]
                            ),
                            mtp_head=head,
                        )
                    )
                    for mode in modes
                }
                for repeat in range(args.repeats + 1):
                    for mode in modes:
                        prompts = prompts_of(repeat, concurrency)
                        result = engine_round(
                            engines[mode], prompts, params, args.tokens, stop_at_eos=stop_at_eos
                        )
                        if repeat:
                            rounds[mode].append(result)
            baseline = statistics.median(statistics.median(r["rates"]) for r in rounds["batch"])
            base_aggregate = statistics.median(r["aggregate"] for r in rounds["batch"])
            for mode in modes:
                rates = [rate for r in rounds[mode] for rate in r["rates"]]
                aggregate = statistics.median(r["aggregate"] for r in rounds[mode])
                line = {
                    "bench": "mtp_engine",
                    **common,
                    "concurrency": concurrency,
                    "sampling": setting,
                    "mode": mode,
                    "decode_tok_s_per_stream_p50": round(float(np.percentile(rates, 50)), 2),
                    "decode_tok_s_per_stream_p99": round(float(np.percentile(rates, 99)), 2),
                    "aggregate_tok_s": round(aggregate, 2),
                    "ttft_p50_s": round(
                        statistics.median(t for r in rounds[mode] for t in r["ttfts"]), 3
                    ),
                    "lane_share": round(statistics.mean(r["lane_share"] for r in rounds[mode]), 3),
                    "accepted_per_draft": round(
                        statistics.mean(r["accepted_per_draft"] for r in rounds[mode]), 3
                    ),
                    "tokens_per_cycle": round(
                        statistics.mean(r["tokens_per_cycle"] for r in rounds[mode]), 3
                    ),
                    "tokens_per_stream_mean": round(
                        statistics.mean(r["tokens_per_stream"] for r in rounds[mode]), 1
                    ),
                    "x_batch_per_stream": round(float(np.percentile(rates, 50)) / baseline, 3),
                    "x_batch_aggregate": round(aggregate / base_aggregate, 3),
                }
                print(json.dumps(line), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="mlx-lm folder (default model)")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--head", type=Path, default=None, help="a head file (default: the model's)"
    )
    parser.add_argument("--section", choices=("decoders", "engine", "all"), default="all")
    parser.add_argument(
        "--workload",
        choices=("chat", "rag"),
        default="chat",
        help="engine section prompts: a short chat question, or the appliance's RAG prompt",
    )
    parser.add_argument(
        "--eos",
        choices=("auto", "stop", "ignore"),
        default="auto",
        help="engine section: streams stop at end-of-sequence, or run to --tokens "
        "(auto: stop for --workload rag, whose answers are short, ignore for chat)",
    )
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[1, 4, 16],
        help="engine section: concurrent streams, comma-separated",
    )
    args = parser.parse_args()

    # A folder, a .gguf (converted once into the data dir) or the default model.
    folder = resolve_chat_model(str(args.model)) if args.model else default_chat_model()
    model, tokenizer = load(str(folder))
    head = load_sidecar_head(args.head, model) if args.head else load_head(folder, model)
    head_source = head.config.kind if head else "random generic (untrained)"
    if head is not None and head.draft_ids is not None:
        head_source += f", draft vocab {head.draft_ids.size}"
    if head is None:
        mx.random.seed(0)
        head = make_generic_head(model)
    trunk = Trunk(model)
    messages = [{"role": "user", "content": PROMPT}]
    prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    common = {
        "model": folder.name,
        "head": head_source,
        "batch": 1,
        "prompt_tokens": len(prompt),
        "tokens": args.tokens,
        "device": str(mx.default_device()),
    }
    if args.workload == "rag":
        common.update(workload="rag", prompt_tokens=len(rag_prompt(tokenizer, 0)))
    if args.section in ("engine", "all"):
        run_engine_section(model, tokenizer, head, PROMPT, common, args)
    if args.section == "engine":
        return
    for setting, params in SETTINGS.items():
        results = run_modes(model, trunk, head, prompt, params, args)
        baseline = results["ar"]["decode_tok_s_p50"]
        for mode, result in results.items():
            ratio = round(result["decode_tok_s_p50"] / baseline, 3)
            line = {"bench": "mtp_decode", **common, "sampling": setting, "mode": mode}
            print(json.dumps(line | result | {"x_ar": ratio}), flush=True)
    costs = pass_costs(model, trunk, head, prompt, args.repeats * 3)
    print(json.dumps({"bench": "mtp_pass_cost", **common} | costs), flush=True)


if __name__ == "__main__":
    main()
