"""Greedy generation with one model sharded over N processes by MLX's distributed layer.

Run it under MLX's launcher; every rank runs this same script and holds 1/N of the model:

    # two local processes over the ring backend (TCP on 127.0.0.1), tensor parallel
    mlx.launch --backend ring -n 2 --python "$(command -v python)" \\
        examples/distributed/sharded_generate.py --model PATH --max-tokens 64

    # a cluster of Macs (see hostfile.example.json and docs/distributed-mlx.md)
    mlx.launch --backend ring --hostfile examples/distributed/hostfile.json \\
        --python "$(command -v python)" --cwd "$PWD" \\
        examples/distributed/sharded_generate.py --model PATH --mode pipeline

Run without the launcher it is the single-process baseline (a group of one), with the same
output, so the two can be compared token for token.

Modes (both come from mlx-lm's model classes, nothing here re-implements them):
  tensor    `model.shard(group)`: each rank holds 1/N of every attention and MLP matrix and the
            ranks all-sum activations twice per layer (llama, qwen2/3, ... ; heads must divide N).
  pipeline  `model.model.pipeline(group)`: each rank holds 1/N of the layers and passes the
            hidden state on (qwen2/3, deepseek, ... ; mlx-lm's llama class has no pipeline).

Rank 0 prints one JSON line: the token ids, the text, the prefill time and decode tokens/s.
Other ranks print nothing. Sampling is greedy only; no chat server, no batching.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import inference  # noqa: F401  (loads the optimized BLAS before mlx, where there is one)

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load


@dataclass(frozen=True)
class Result:
    """What rank 0 reports for one generation."""

    num_ranks: int
    mode: str
    prompt_tokens: int
    token_ids: list[int]
    text: str
    prefill_s: float
    decode_tokens_per_s: float


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", required=True, help="a local mlx-lm model folder")
    parser.add_argument("--mode", choices=("tensor", "pipeline"), default="tensor")
    parser.add_argument("--prompt", default="Write one sentence about the sea.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--raw", action="store_true", help="tokenize the prompt as is, without the chat template"
    )
    return parser.parse_args()


def check_tensor_split(model: nn.Module, num_ranks: int) -> None:
    """mlx-lm floor-divides head counts by N; a remainder fails later, in a reshape, unexplained."""
    attention = getattr(model.layers[0], "self_attn", None)
    counts = {
        "attention heads": getattr(attention, "n_heads", None),
        "key/value heads": getattr(attention, "n_kv_heads", None),
    }
    for name, count in counts.items():
        # Other attention layouts (MLA, MoE variants) are left to the model class's own checks.
        if count is not None and count % num_ranks:
            raise ValueError(
                f"tensor parallel over {num_ranks} ranks needs {name} divisible by "
                f"{num_ranks}; the model has {count} (use a divisor of {count}, or --mode "
                "pipeline with a model class that supports it)"
            )


def load_sharded(
    path: str, mode: str, group: mx.distributed.Group
) -> tuple[nn.Module, TokenizerWrapper]:
    """Load lazily, keep this rank's share, then materialize only that share."""
    model, tokenizer = load(path, lazy=True)
    if group.size() > 1 and mode == "tensor":
        if not hasattr(model, "shard"):
            raise ValueError(f"{type(model).__module__} has no tensor parallel `shard`")
        check_tensor_split(model, group.size())
        model.shard(group)
    elif group.size() > 1 and mode == "pipeline":
        if not hasattr(model.model, "pipeline"):
            raise ValueError(f"{type(model).__module__} has no `pipeline`; use --mode tensor")
        model.model.pipeline(group)
    mx.eval(model.parameters())
    # A barrier, so that no rank times out waiting while another is still reading weights.
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    return model, tokenizer


def encode(tokenizer: TokenizerWrapper, prompt: str, raw: bool) -> list[int]:
    if raw or not tokenizer.has_chat_template:
        return tokenizer.encode(prompt)
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def generate(
    model: nn.Module, prompt_ids: list[int], max_tokens: int
) -> tuple[list[int], float, float]:
    """Greedy-decode exactly max_tokens (no stop at EOS, so runs compare and time alike)."""
    start = time.perf_counter()
    token_ids: list[int] = []
    first_token_at = start
    for token, _ in generate_step(mx.array(prompt_ids), model, max_tokens=max_tokens):
        token_ids.append(int(token))
        if len(token_ids) == 1:
            first_token_at = time.perf_counter()
    end = time.perf_counter()
    decode_tps = (len(token_ids) - 1) / (end - first_token_at) if len(token_ids) > 1 else 0.0
    return token_ids, first_token_at - start, decode_tps


def main() -> None:
    args = parse_args()
    # A group of one when not launched by mlx.launch: the single-process baseline.
    group = mx.distributed.init()
    if not Path(args.model).is_dir():
        raise SystemExit(f"--model must be a local model folder; got {args.model!r}")
    model, tokenizer = load_sharded(args.model, args.mode, group)
    prompt_ids = encode(tokenizer, args.prompt, args.raw)
    token_ids, prefill_s, decode_tps = generate(model, prompt_ids, args.max_tokens)
    # generate_step leaves one step in flight, with its sends and receives; a rank that exited
    # now would close its sockets under the other rank's. Meet once more, then leave.
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    if group.rank() == 0:
        result = Result(
            num_ranks=group.size(),
            mode=args.mode if group.size() > 1 else "single",
            prompt_tokens=len(prompt_ids),
            token_ids=token_ids,
            text=tokenizer.decode(token_ids),
            prefill_s=round(prefill_s, 4),
            decode_tokens_per_s=round(decode_tps, 2),
        )
        print(json.dumps(asdict(result)), flush=True)


if __name__ == "__main__":
    main()
