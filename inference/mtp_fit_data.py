"""What an MTP head is fitted on: token sequences and the batches cut from them.

Sequences are the model's own answers to chats (sampled at temperature ~0.7; trained on the
answer only, its stop token included) or windows of any tokenized text (trained throughout).
Generation is the slow part of a fit, so samples are saved to and loaded from JSON lines. The
draft vocabulary is the most frequent trained-on tokens. Batches are padded (or windowed) to one
shape so the training step compiles once.
Ignores: the head, the loss and the optimiser (mtp_fit_loss, mtp_fit), and prompt wording
(the caller's).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.mtp_decode import Trunk

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache


@dataclass(frozen=True)
class Sample:
    """One training sequence; targets x_{t+1} with t + 1 >= loss_start are trained on."""

    token_ids: tuple[int, ...]
    loss_start: int = 0


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a chat, ready for the assistant's turn."""
    return list(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True))


def stop_ids(tokenizer: Any) -> list[int]:
    return sorted(int(t) for t in tokenizer.eos_token_ids)


def generate_samples(
    trunk: Trunk,
    prompts: Sequence[Sequence[int]],
    *,
    stop_ids: Iterable[int],
    max_tokens: int = 256,
    temperature: float = 0.7,
    batch_size: int = 32,
    seed: int = 0,
    deadline: float | None = None,
) -> list[Sample]:
    """The model's own continuations of token-id prompts, prompt included (loss on the
    continuation, its stop token kept so the head learns to end). Stops early at `deadline`
    (time.monotonic()), keeping the batches already done.

    Prompts of one length decode together as one batch with a plain KV cache: no padding and
    few distinct shapes (MLX's CUDA backend compiles kernels per shape). On an H100 this ran at
    ~7.5k tok/s where mlx-lm's BatchGenerator managed ~700; finished rows keep decoding until
    the whole batch is done, which costs little next to that.
    """
    mx.random.seed(seed)
    stop = mx.array(sorted(set(stop_ids)))
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(index)
    groups = [
        indices[i : i + batch_size]
        for _, indices in sorted(by_length.items())
        for i in range(0, len(indices), batch_size)
    ]
    # Shuffled, so a deadline cuts long and short prompts alike.
    groups = [groups[i] for i in np.random.default_rng(seed).permutation(len(groups))]
    samples: list[Sample] = []
    for indices in groups:
        if deadline is not None and time.monotonic() > deadline:
            break
        batch_prompts = [list(prompts[i]) for i in indices]
        for prompt, output in zip(
            batch_prompts,
            _sample_batch(trunk, batch_prompts, stop, max_tokens, temperature),
            strict=True,
        ):
            samples.append(Sample(tuple(prompt) + tuple(output), len(prompt)))
    return samples


def _sample_batch(
    trunk: Trunk, prompts: list[list[int]], stop: mx.array, max_tokens: int, temperature: float
) -> list[list[int]]:
    """Equal-length prompts -> each one's sampled continuation, cut after its first stop token."""
    cache = make_prompt_cache(trunk.model)
    # Logits of the last prompt position only: (B, L, V) for a long prompt would not fit.
    logits = trunk.lm_head(trunk.body(mx.array(prompts), cache=cache)[:, -1])
    steps: list[mx.array] = []
    done = mx.zeros((len(prompts),), dtype=mx.bool_)
    for step in range(max_tokens):
        token = mx.random.categorical(logits.astype(mx.float32) / max(temperature, 1e-6))
        steps.append(token)
        done = done | mx.any(token[:, None] == stop[None], axis=-1)
        if step % 16 == 15:  # one sync now and then, not per token
            mx.eval(done)
            if bool(mx.all(done).item()):
                break
        logits = trunk.model(token[:, None], cache=cache)[:, -1]
    tokens = np.array(mx.stack(steps, axis=1)).tolist()
    stop_set = set(np.array(stop).tolist())
    outputs = []
    for row in tokens:
        end = next((i + 1 for i, t in enumerate(row) if t in stop_set), len(row))
        outputs.append(row[:end])
    return outputs


def save_samples(samples: Sequence[Sample], path: Path) -> None:
    """One JSON object per line: generation is the slow part of a fit, so it can be reused."""
    lines = (json.dumps({"ids": list(s.token_ids), "loss_start": s.loss_start}) for s in samples)
    Path(path).write_text("".join(line + "\n" for line in lines))


def load_samples(path: Path) -> list[Sample]:
    samples = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
            samples.append(Sample(tuple(int(t) for t in record["ids"]), int(record["loss_start"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{path}:{number}: want {{'ids': [...], 'loss_start': n}}: {exc}"
            ) from exc
    return samples


def text_samples(token_ids: Sequence[int], seq_len: int) -> list[Sample]:
    """A tokenized text cut into windows of seq_len tokens, trained on throughout."""
    return [
        Sample(tuple(token_ids[i : i + seq_len]))
        for i in range(0, max(len(token_ids) - 1, 1), seq_len)
        if len(token_ids[i : i + seq_len]) >= 2
    ]


def draft_vocabulary(samples: Sequence[Sample], size: int, always: Iterable[int] = ()) -> list[int]:
    """The `size` tokens seen most often where the head will draft (trained targets), plus
    `always` (stop tokens); sorted."""
    counts: Counter[int] = Counter()
    for sample in samples:
        counts.update(sample.token_ids[max(sample.loss_start, 1) :])
    keep = set(always)
    for token, _ in counts.most_common():
        if len(keep) >= size:
            break
        keep.add(token)
    return sorted(keep)


@dataclass(frozen=True)
class Batch:
    tokens: mx.array  # (B, S) int32, padded with 0
    target_mask: mx.array  # (B, S) float32: 1 where x_{t+1} exists and is trained on


def make_batch(samples: Sequence[Sample], seq_len: int, rng: np.random.Generator) -> Batch:
    """Pad (or window) each sample to seq_len; a long sample keeps a window that starts at most
    half a window before its trained part, chosen at random."""
    tokens = np.zeros((len(samples), seq_len), np.int32)
    mask = np.zeros((len(samples), seq_len), np.float32)
    for row, sample in enumerate(samples):
        ids, loss_start = sample.token_ids, sample.loss_start
        start = 0
        if len(ids) > seq_len:
            low = min(max(0, loss_start - seq_len // 2), len(ids) - seq_len)
            start = int(rng.integers(low, len(ids) - seq_len + 1))
        window = ids[start : start + seq_len]
        tokens[row, : len(window)] = window
        # mask[t] = 1 when target x_{t+1} is in the window and at or past loss_start.
        first = max(loss_start - start - 1, 0)
        mask[row, first : len(window) - 1] = 1.0
    return Batch(mx.array(tokens), mx.array(mask))


def iter_batches(samples: Sequence[Sample], batch: int, seq_len: int, seed: int) -> Iterator[Batch]:
    """Endless shuffled epochs of batches."""
    if not samples:
        raise ValueError("no samples to fit on: give prompts or texts")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(samples))
        for i in range(0, len(order), batch):
            chosen = [samples[j] for j in order[i : i + batch]]
            # A short last batch is topped up at random: every batch has one shape (one compile).
            chosen += [samples[j] for j in rng.integers(0, len(samples), batch - len(chosen))]
            yield make_batch(chosen, seq_len, rng)
