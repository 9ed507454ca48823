"""kill -9 an engine while it spills prefix blocks to SSD, several times, then serve from its cache.

A subprocess runs a real Engine with an SSD tier on the tiny llama and prefills prompts one after
another (each completes 7 blocks, 4 of them shared), so its writer thread is busy writing files
when the kill lands. After every kill a new process starts on the same folder (its start-up
cleans what the kill left). Finally an engine in this process must load that cache, serve the
prompts with exactly the tokens of an engine without a cache, hit some blocks, and meet no
corrupt file.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import inference  # noqa: F401  (loads the BLAS before mlx)
from inference.engine import Engine, EngineConfig, GenerationRequest
from inference.sampling import SamplingParams
from inference.stopping import StopParams

import pytest

REPO = Path(__file__).resolve().parents[2]
BLOCK = 16
NUM_PROMPTS = 400  # more than a child gets through before its kill
_CHILD = """
import sys
sys.path.insert(0, {repo!r})
from pathlib import Path
import inference
from inference.engine import Engine, EngineConfig, GenerationRequest
from inference.sampling import SamplingParams
from inference.stopping import StopParams
from tests.e2e.test_prefix_cache_restart import config, prompt

engine = Engine.from_path({model!r}, config=config(Path({cache!r})))
for i in range({first}, {num_prompts}):
    request = GenerationRequest(
        prompt(i), SamplingParams(temperature=0), StopParams(max_tokens=1), ignore_eos=True
    )
    list(engine.submit(request))
    print("done", i, flush=True)
"""


def config(cache_dir: Path, **overrides: object) -> EngineConfig:
    fields: dict[str, object] = {
        "prefix_cache_block_size": BLOCK,
        "prefix_cache_dir": cache_dir,
        "max_num_batched_tokens": 64,
        **overrides,
    }
    return EngineConfig(**fields)  # type: ignore[arg-type]


def prompt(i: int) -> tuple[int, ...]:
    """4 blocks every prompt shares, 3 of its own, and a 5-token tail."""
    shared = [3 + (7 * j) % 290 for j in range(4 * BLOCK)]
    own = [3 + (11 * i + 5 * j) % 290 for j in range(3 * BLOCK + 5)]
    return tuple(shared + own)


def run_and_kill(model: Path, cache: Path, first: int, rng: random.Random) -> int:
    """Start a child at prompt `first`, kill -9 it mid-work; returns the prompts it finished."""
    script = _CHILD.format(
        repo=str(REPO), model=str(model), cache=str(cache), first=first, num_prompts=NUM_PROMPTS
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    last = first - 1
    try:
        for line in child.stdout:  # wait until it has spilled a few prompts' blocks
            last = int(line.split()[1])
            if last >= first + 2:
                break
        time.sleep(rng.uniform(0.0, 0.3))  # ... then kill it wherever it is
    finally:
        child.kill()
        child.wait()
    assert last >= first + 2, f"child stopped early: {child.stderr.read() if child.stderr else ''}"
    return last + 1


@pytest.mark.slow  # 10 s on 2 idle cores, 40 s on busy ones: four processes load MLX
def test_kill_during_spilling_leaves_a_cache_that_serves_correct_tokens(
    tiny_llama_path: Path, tmp_path: Path
) -> None:
    rng = random.Random(5)
    cache = tmp_path / "kv"
    num_started = 0
    for _ in range(3):
        num_started = run_and_kill(tiny_llama_path, cache, num_started, rng) + 1

    checked = list(range(min(num_started, 12)))
    greedy = SamplingParams(temperature=0)
    results: dict[str, list[tuple[int, ...]]] = {}
    cached: list[int] = []
    for name, overrides in (("cached", {}), ("plain", {"prefix_cache_ram_bytes": 0})):
        with Engine.from_path(tiny_llama_path, config=config(cache, **overrides)) as engine:
            outputs = []
            for i in checked:
                request = GenerationRequest(
                    prompt(i), greedy, StopParams(max_tokens=6), ignore_eos=True
                )
                chunks = list(engine.submit(request))
                outputs.append(tuple(t for c in chunks for t in c.token_ids))
                if name == "cached":
                    cached.append(chunks[-1].usage.cached_tokens)
            results[name] = outputs
            if name == "cached":
                stats = engine.prefix_cache_stats()
    assert results["cached"] == results["plain"]
    assert stats.ssd_corrupt == 0
    assert stats.num_ssd_hit_tokens >= 4 * BLOCK  # at least the shared prefix survived on disk
    assert all(c >= 4 * BLOCK for c in cached)
    assert not list(cache.rglob("*.tmp"))  # the last start-up cleaned what the kills left
