"""`rag tune`: measure plain decoding against the MTP lane at depth 1..3 on this machine, as the
server runs them (the engine, one request at a time), and keep the fastest for the model.

For each mode (ar, d1, d2, d3) and repeat, the held-out prompts of `rag mtp eval` are answered
one after another at the given sampling settings (default 0.6 / top_p 0.95 / top_k 20, seeded,
generation_mode "mtp"); modes alternate within each repeat so machine drift hits all of them. One
JSON line per mode: decode tok/s (median over answers), the ratio to ar, the lane's acceptance.
The best depth (0 when plain decoding wins, or a lane wins by less than --margin) is written to
the model's settings (inference/model_settings.py), which the engine reads at start-up unless
told otherwise (`rag serve --mtp`).

    rag tune                       # the default chat model
    rag tune --model NAME --tokens 128 --repeats 3 --temperature 0
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inference.backend import GenerationRequest
from inference.chat_model import ModelNotFoundError, resolve_chat_model
from inference.diagnostics import device_name
from inference.engine import Engine, EngineConfig
from inference.model_settings import ModelSettings, model_key, write_model_settings
from inference.mtp_fit import load_trunk
from inference.mtp_head import HeadLoadError, MTPHead, load_head
from inference.sampling import SamplingParams
from inference.stopping import StopParams

from rag.mtp_cli import eval_chats

MODES = {"ar": 0, "d1": 1, "d2": 2, "d3": 3}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tune",
        help="measure plain vs MTP decoding here and keep the fastest depth for the model",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--model", help="chat model: a folder, a .gguf, or a name in $RAG_MODEL_DIR (default model)"
    )
    parser.add_argument("--prompts", type=int, default=3, help="held-out prompts per repeat")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--repeats", type=int, default=2, help="after one warm-up round")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument(
        "--margin", type=float, default=0.03, help="a lane must beat ar by this fraction"
    )
    parser.add_argument("--dry-run", action="store_true", help="measure, write nothing")
    parser.set_defaults(run=run)


def decode_rate(engine: Engine, prompt_ids: Sequence[int], params: SamplingParams, tokens: int):
    """(decode tok/s after the first token, the last chunk) of one answer."""
    request = GenerationRequest(
        tuple(prompt_ids),
        params,
        StopParams(max_tokens=tokens),
        ignore_eos=True,
        generation_mode="mtp",
    )
    first = last = None
    count = 0
    final = None
    for chunk in engine.submit(request):
        now = time.perf_counter()
        count += len(chunk.token_ids)
        first = now if first is None else first
        last = now
        final = chunk
    assert first is not None and last is not None and final is not None
    return (count - 1) / max(last - first, 1e-9), final


def measure(
    model: Any,
    tokenizer: Any,
    head: MTPHead,
    prompts: list[list[int]],
    params: SamplingParams,
    args: argparse.Namespace,
) -> dict[str, dict[str, Any]]:
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    accepted: dict[str, list[int]] = {
        mode: [0, 0, 0] for mode in MODES
    }  # accepted, drafted, cycles
    for repeat in range(args.repeats + 1):
        for mode, depth in MODES.items():
            config = EngineConfig(max_num_seqs=1, mtp=depth > 0, mtp_depth=depth or None)
            with Engine(model, tokenizer, config=config, mtp_head=head) as engine:
                for prompt in prompts:
                    rate, last = decode_rate(engine, prompt, params, args.tokens)
                    if not repeat:
                        continue  # warm-up
                    rates[mode].append(rate)
                    if last.speculation is not None:
                        accepted[mode][0] += last.speculation.num_accepted
                        accepted[mode][1] += last.speculation.num_drafted
                        accepted[mode][2] += last.speculation.num_cycles
    results = {}
    for mode in MODES:
        num_accepted, num_drafted, num_cycles = accepted[mode]
        results[mode] = {
            "decode_tok_s": statistics.median(rates[mode]),
            "accepted_per_draft": num_accepted / num_drafted if num_drafted else None,
            "tokens_per_cycle": (num_cycles + num_accepted) / num_cycles if num_cycles else None,
        }
    return results


def best_depth(results: dict[str, dict[str, Any]], margin: float) -> int:
    """The fastest depth; 0 unless a lane beats plain decoding by more than margin."""
    baseline = results["ar"]["decode_tok_s"]
    depth, rate = 0, baseline * (1 + margin)
    for mode, result in results.items():
        if MODES[mode] and result["decode_tok_s"] > rate:
            depth, rate = MODES[mode], result["decode_tok_s"]
    return depth


def run(args: argparse.Namespace) -> int:
    try:
        params = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=0
        )
        folder = resolve_chat_model(args.model)
        trunk, tokenizer = load_trunk(folder)
        model = trunk.model
        head = load_head(Path(folder), model)
    except (ModelNotFoundError, HeadLoadError, OSError, ValueError) as exc:
        print(f"error: {exc}")
        return 1
    if head is None:
        print(f"error: {folder} has no MTP head; fit one with `rag mtp fit`")
        return 1
    if args.prompts < 1 or args.tokens < 2 or args.repeats < 1:
        print("error: --prompts, --repeats >= 1 and --tokens >= 2 are needed")
        return 2
    prompts = [
        list(tokenizer.apply_chat_template(chat, add_generation_prompt=True))
        for chat in eval_chats(args.prompts)
    ]
    results = measure(model, tokenizer, head, prompts, params, args)
    baseline = results["ar"]["decode_tok_s"]
    sampling = f"t{args.temperature}_p{args.top_p}_k{args.top_k}"
    device = f"{device_name()} ({platform.machine()})"
    for mode, result in results.items():
        record = {
            "bench": "rag_tune",
            "model": folder.name,
            "sampling": sampling,
            "mode": mode,
            "decode_tok_s": round(result["decode_tok_s"], 2),
            "x_ar": round(result["decode_tok_s"] / max(baseline, 1e-9), 3),
        }
        if result["accepted_per_draft"] is not None:
            record["accepted_per_draft"] = round(result["accepted_per_draft"], 3)
            record["tokens_per_cycle"] = round(result["tokens_per_cycle"], 3)
        print(json.dumps(record), flush=True)
    depth = best_depth(results, args.margin)
    summary: dict[str, Any] = {"bench": "rag_tune", "model": folder.name, "mtp_depth": depth}
    if not args.dry_run:
        measured = {
            "sampling": sampling,
            "device": device,
            "tokens": args.tokens,
            "decode_tok_s": {m: round(r["decode_tok_s"], 2) for m, r in results.items()},
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        path = write_model_settings(model_key(folder, model), ModelSettings(depth, measured))
        summary["written"] = str(path)
    print(json.dumps(summary), flush=True)
    return 0
