"""MLX's distributed layer on one machine: two ranks over the ring backend give the same tokens.

    mlx.launch --backend ring -n 2 -> rank 0 + rank 1 (TCP on 127.0.0.1, two ports)
        each runs examples/distributed/sharded_generate.py on half the model

The single-process run of the same script is the reference; greedy decoding must give the same
token ids. Tensor parallel is checked on a tiny llama (mlx-lm's llama has `shard`), pipeline
parallel on a tiny qwen2 (mlx-lm's llama has no `pipeline`). Every process has a timeout, and a
timed-out launch is killed with its whole process group, so the test cannot hang.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from tests.fixtures.tiny_llama import write_bpe_tokenizer, write_tiny_llama

pytestmark = [
    pytest.mark.slow,  # 4 model loads in fresh processes: about 40-80 s on 2 shared cores
    pytest.mark.skipif(
        not mx.distributed.is_available("ring"),
        reason="this mlx build has no ring backend (mx.distributed.is_available('ring') is False)",
    ),
]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "distributed" / "sharded_generate.py"
LAUNCHER = Path(sys.executable).parent / "mlx.launch"
MAX_TOKENS = 16
TIMEOUT_S = 240


def write_tiny_qwen2(folder: Path, *, seed: int = 3) -> Path:
    """A random 4-layer qwen2 folder (mlx-lm's qwen2 supports `pipeline`); the llama fixture's
    tokenizer."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2

    folder.mkdir(parents=True, exist_ok=True)
    write_bpe_tokenizer(folder)
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    config = {
        "model_type": "qwen2",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": len(vocab),
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "bos_token_id": 1,
    }
    mx.random.seed(seed)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def free_port_pair() -> int:
    """A port p with p and p + 1 free: the ring backend listens on one port per rank."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with socket.socket() as second:
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def run(command: list[str]) -> tuple[str, str]:
    """Run command in its own process group; its stdout and stderr."""
    # One BLAS thread per process: two ranks share two cores.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # Kill the launcher and the ranks it started, then collect what they printed.
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"timed out after {TIMEOUT_S} s: {command}\n{stdout}\n{stderr}")
    return stdout, stderr


def run_json(command: list[str]) -> dict[str, object]:
    """Run command; the one JSON line it prints (rank 0's result)."""
    stdout, stderr = run(command)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    # mlx.launch exits 0 even when a rank fails, so the output is what is checked.
    assert len(lines) == 1, f"wanted one JSON line from rank 0, got:\n{stdout}\n{stderr}"
    return json.loads(lines[0])


def generate(model: Path, *, num_ranks: int, mode: str) -> dict[str, object]:
    script = [str(SCRIPT), "--model", str(model), "--mode", mode, "--max-tokens", str(MAX_TOKENS)]
    if num_ranks == 1:
        return run_json([sys.executable, *script])
    launch = [str(LAUNCHER), "--backend", "ring", "-n", str(num_ranks)]
    launch += ["--starting-port", str(free_port_pair()), "--python", sys.executable]
    return run_json([*launch, *script])


@pytest.fixture(scope="module")
def tiny_untied_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # An untied head: with tied embeddings a random llama greedily repeats one token forever,
    # which would make "same tokens" a weak check. With these seeds the top-1 log-prob leads
    # the runner-up by >= 0.003 at every step, far above float32 summation-order noise.
    folder = tmp_path_factory.mktemp("models") / "tiny-llama-untied"
    return write_tiny_llama(folder, seed=1, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("models") / "tiny-qwen2")


@pytest.mark.parametrize(
    ("model_fixture", "mode"),
    [("tiny_untied_llama", "tensor"), ("tiny_qwen2", "pipeline")],
)
def test_two_ring_ranks_generate_the_single_process_tokens(
    model_fixture: str, mode: str, request: pytest.FixtureRequest
) -> None:
    model = request.getfixturevalue(model_fixture)

    single = generate(model, num_ranks=1, mode=mode)
    sharded = generate(model, num_ranks=2, mode=mode)

    assert single["num_ranks"] == 1
    assert sharded["num_ranks"] == 2
    assert sharded["mode"] == mode
    assert len(single["token_ids"]) == MAX_TOKENS
    # Not a degenerate repeat of one token, so equality says something.
    assert len(set(single["token_ids"])) >= 4, single["token_ids"]
    assert sharded["token_ids"] == single["token_ids"]
    assert sharded["text"] == single["text"]


def test_tensor_parallel_refuses_heads_that_do_not_divide(tmp_path: Path) -> None:
    # 3 attention heads, 1 key/value head: 2 ranks cannot split them; the script must say so
    # instead of silently running a model with wrong head shapes.
    model = write_tiny_llama(
        tmp_path / "odd-heads",
        seed=1,
        num_attention_heads=3,
        num_key_value_heads=1,
        hidden_size=48,
        tie_word_embeddings=False,
    )
    launch = [str(LAUNCHER), "--backend", "ring", "-n", "2"]
    launch += ["--starting-port", str(free_port_pair()), "--python", sys.executable]
    command = [*launch, str(SCRIPT), "--model", str(model), "--max-tokens", "2"]
    stdout, stderr = run(command)
    assert "needs attention heads divisible by 2; the model has 3" in stderr
    assert not [line for line in stdout.splitlines() if line.startswith("{")]
