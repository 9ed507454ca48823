"""Scale-out routing: aggregate tok/s and prefix-cache hit rate, 1 vs 2 upstreams, affinity vs
round robin, side by side in one run. Prints one JSON line per configuration.

Upstreams are real `rag serve` subprocesses on loopback (the default chat model, SmolLM2-135M,
SSD cache tier off, each with its own data dir); the router is the appliance's RemoteBackend,
driven in-process by `--concurrency` client threads (no appliance HTTP layer in between, so the
numbers are routing + upstreams). Each client sends RAG-shaped requests in a closed loop:

    the appliance's system prompt and instructions (shared by all) + one of `--contexts`
    retrieved contexts (3 passages of examples/docs each) + a question of its own

so requests about the same context share a prefix of several hundred tokens. Affinity sends
them to the upstream whose prefix cache holds it; round robin spreads them, so each context is
prefilled once per upstream. Answers are `--max-tokens` long (EOS ignored: equal work per run).
Each configuration labels its passages with its own run name, so no configuration hits the
cache entries of another (only the shared system prompt's first blocks may).

Read the numbers with the machine in mind: on one small CPU, two upstreams share the same cores,
so 2 upstreams cannot double tok/s here; what carries over to separate machines is the hit rate
and the spread (requests per upstream), and the tok/s difference between the policies.

    .venv/bin/python benchmarks/upstreams.py
    .venv/bin/python benchmarks/upstreams.py --requests 96 --max-tokens 32   # longer answers
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inference.backend import GenerationRequest  # noqa: E402
from inference.chat_model import resolve_chat_model  # noqa: E402
from inference.sampling import SamplingParams  # noqa: E402
from inference.stopping import StopParams  # noqa: E402

import httpx  # noqa: E402

from rag.prompt import Passage, assemble_prompt  # noqa: E402
from rag.upstreams.backend import RemoteBackend, make_remote_backend  # noqa: E402
from rag.upstreams.config import RouterConfig, UpstreamSpec  # noqa: E402

DOCS = REPO / "examples" / "docs"
PASSAGE_CHARS = 500
PASSAGE_STRIDE = 150  # overlapping windows: the two plain-text examples give enough passages
QUESTIONS = [
    "When is it open?",
    "How much does a ticket cost?",
    "Who founded it?",
    "What can volunteers do?",
    "Which telescopes are there?",
    "Is there parking?",
    "Can children come?",
    "What happened in the first year?",
]


@dataclass
class Result:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float
    latency_s: float


def passages(num_contexts: int) -> list[list[str]]:
    """`num_contexts` contexts of 3 passages each, cut from the plain-text example documents."""
    texts = [
        (DOCS / name).read_text(encoding="utf-8") for name in ("history.txt", "visitor-guide.md")
    ]
    pieces = [
        text[i : i + PASSAGE_CHARS].strip()
        for text in texts
        for i in range(0, len(text) - PASSAGE_CHARS, PASSAGE_STRIDE)
    ]
    if num_contexts > len(pieces):
        raise SystemExit(f"examples/docs gives {len(pieces)} passages; fewer --contexts, please")
    # Context c: 3 passages from position 3c (mod n), so contexts differ from their first passage.
    return [[pieces[(3 * c + j) % len(pieces)] for j in range(3)] for c in range(num_contexts)]


def prompts(backend: RemoteBackend, run: str, num_contexts: int, count: int) -> list[list[int]]:
    """`count` RAG prompts: context i % num_contexts, a distinct question each, shuffled (seed 0)
    so that round robin's turns do not line up with the contexts' order."""
    contexts = passages(num_contexts)
    out = []
    order = list(range(count))
    random.Random(0).shuffle(order)
    for i in order:
        context = contexts[i % num_contexts]
        question = f"{QUESTIONS[i % len(QUESTIONS)]} (question {i})"
        kept = [
            Passage(chunk_id=n, text=text, source=f"{run}/context-{i % num_contexts}.txt", rank=n)
            for n, text in enumerate(context)
        ]
        prompt = assemble_prompt(
            question, kept, count_tokens=backend.count_tokens, max_prompt_tokens=1800
        )
        out.append(backend.apply_chat_template(prompt.messages))
    return out


@contextmanager
def upstream(port: int, max_num_seqs: int, log_dir: Path) -> Iterator[str]:
    """`rag serve` on 127.0.0.1:port with its own data dir; stopped (SIGTERM) on exit."""
    data = tempfile.mkdtemp(prefix=f"upstream-{port}-")
    env = {**os.environ, "RAG_DATA_DIR": data}
    command = [
        sys.executable,
        "-m",
        "rag",
        "serve",
        "--port",
        str(port),
        "--max-num-seqs",
        str(max_num_seqs),
        "--prefix-cache-ssd-gb",
        "0",
    ]
    log = (log_dir / f"upstream-{port}.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise SystemExit(f"upstream on {port} exited; see {log.name}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"upstream on {port} did not start; see {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one(backend: RemoteBackend, ids: list[int], max_tokens: int) -> Result:
    request = GenerationRequest(
        ids, SamplingParams(temperature=0), StopParams(max_tokens=max_tokens), ignore_eos=True
    )
    start = time.perf_counter()
    first: float | None = None
    last = None
    for chunk in backend.submit(request):
        if first is None and chunk.token_ids:
            first = time.perf_counter()
        last = chunk
    end = time.perf_counter()
    assert last is not None and last.finish_reason == "length", last
    usage = last.usage
    return Result(
        usage.prompt_tokens,
        usage.cached_tokens,
        usage.completion_tokens,
        (first or end) - start,
        end - start,
    )


def run_config(
    urls: list[str], policy: str, args: argparse.Namespace, tokenizer: Path, run: str
) -> dict:
    backend = make_remote_backend(
        [UpstreamSpec(u) for u in urls], RouterConfig(policy=policy), tokenizer
    )
    try:
        work = prompts(backend, run, args.contexts, args.requests)
        results: list[Result] = []
        lock = threading.Lock()
        queue = iter(work)

        def client() -> None:
            while True:
                with lock:
                    ids = next(queue, None)
                if ids is None:
                    return
                result = one(backend, ids, args.max_tokens)
                with lock:
                    results.append(result)

        load = os.getloadavg()[0]
        start = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
        spread = {s.name: s.num_requests for s in backend.upstream_stats()}
    finally:
        backend.close()
    prompt = sum(r.prompt_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {
        "upstreams": len(urls),
        "policy": policy,
        "requests": len(results),
        "concurrency": args.concurrency,
        "contexts": args.contexts,
        "max_tokens": args.max_tokens,
        "wall_s": round(wall, 2),
        "completion_tok_s": round(completion / wall, 1),
        "prompt_tok_s": round(prompt / wall, 1),
        "prefix_cache_hit_rate": round(cached / prompt, 3) if prompt else 0.0,
        "prompt_tokens_mean": round(prompt / len(results)),
        "ttft_p50_s": round(statistics.median(r.ttft_s for r in results), 3),
        "latency_p50_s": round(statistics.median(r.latency_s for r in results), 3),
        "requests_per_upstream": sorted(spread.values(), reverse=True),
        "load_avg_1m": round(load, 1),  # the machine's load when it started (shared CPUs)
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=64, help="per configuration")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--contexts", type=int, default=4, help="distinct retrieved contexts")
    parser.add_argument("--max-tokens", type=int, default=8, help="answer tokens per request")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="each upstream's batch")
    args = parser.parse_args()
    tokenizer = resolve_chat_model(None)
    configs = [(1, "affinity"), (1, "round_robin"), (2, "affinity"), (2, "round_robin")]
    with tempfile.TemporaryDirectory(prefix="bench-upstreams-") as logs, ExitStack() as stack:
        urls = [
            stack.enter_context(upstream(free_port(), args.max_num_seqs, Path(logs)))
            for _ in range(2)
        ]
        for n, (num_upstreams, policy) in enumerate(configs):
            result = run_config(urls[:num_upstreams], policy, args, tokenizer, run=f"run{n}")
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
