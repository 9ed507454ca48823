"""Fit a generic MTP head for a model that has none, by self-distillation on its own outputs.

The trunk is frozen; the head learns to predict what the trunk itself would predict next:

  1. data     token sequences: the model's own generations for a list of chats (sampled at
              temperature ~0.7; loss on the generated part only), plus windows of any texts
  2. teacher  one trunk pass per batch: hiddens h_t and log p(x_{t+1} | x_<=t) at every t,
              restricted to the head's draft vocabulary and renormalised there
  3. student  the head unrolled to depth D exactly as MTPDecoder drafts (diagram below),
              loss sum_k w_k * KL(p_trunk(x_{t+k+1}) || q_head,k), w_k = depth_decay^(k-1)
  4. update   AdamW on the head's parameters only, warm-up then cosine decay

Unrolled attention at depth k for base position i. The head cache holds one entry per pair
(h_j, x_{j+1}), then the recursive entries of this cycle; positions (RoPE) continue from it:

    keys      depth 1 entries j <= i     depth 2 entry at i ... depth k entry at i (itself)
    position  j                          i + 1              ... i + k - 1

so depth k runs over all i at once with keys [K_1 | K_2 | ... | K_k] and a mask that is causal on
K_1 and the diagonal on the rest. Depth k > 1 reads the head's own output of depth k - 1 in
place of h, and the sequence's own token x_{i+k} (a sample of the trunk: the draft that would
have to stand for depth k to matter).

Long samples are cut to a window of seq_len tokens; the trunk then sees only the window.
A fresh head starts as a near pass-through of h_t (`init_head`); `resume_head` continues one.
Ignores: native heads (their blocks are not llama blocks), batching across devices, checkpoints
mid-fit, and anything past the head (serving, the engine).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from inference.gguf_convert import read_conversion_record
from inference.model_fingerprint import fingerprint_model_dir, parameters_dtype
from inference.mtp_decode import AcceptanceStats, MTPDecoder, Trunk, iter_plain
from inference.mtp_head import (
    HiddenSource,
    MTPHead,
    load_sidecar_head,
    make_generic_head,
    save_head,
)
from inference.sampling import SamplingParams

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import mlx_lm
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache


@dataclass(frozen=True)
class FitConfig:
    """How to fit: optimisation, unrolled depth and the draft vocabulary."""

    steps: int = 300
    batch: int = 4
    seq_len: int = 256
    lr: float = 5e-4
    depth: int = 3  # unrolled depth trained (the decoder drafts up to MAX_DEPTH)
    depth_decay: float = 0.8  # loss weight of depth k is depth_decay ** (k - 1)
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    draft_vocab_size: int = 8192  # 0: draft from the whole vocabulary
    minutes: float | None = None  # wall-clock budget; the schedule shrinks to fit it
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps >= 1,
            "batch": self.batch >= 1,
            "seq_len": self.seq_len >= 4,
            "lr": self.lr > 0,
            "depth": 1 <= self.depth <= 3,
            "depth_decay": 0 < self.depth_decay <= 1,
            "warmup": self.warmup >= 0,
            "weight_decay": self.weight_decay >= 0,
            "grad_clip": self.grad_clip > 0,
            "draft_vocab_size": self.draft_vocab_size >= 0,
            "minutes": self.minutes is None or self.minutes > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            got = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(f"FitConfig: out of range: {got}")


@dataclass(frozen=True)
class Sample:
    """One training sequence; targets x_{t+1} with t + 1 >= loss_start are trained on."""

    token_ids: tuple[int, ...]
    loss_start: int = 0


@dataclass
class FitResult:
    """What a fit did: per-step loss, per-depth loss and teacher-forced acceptance at the end."""

    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    depth_losses: list[float] = field(default_factory=list)
    depth_acceptance: list[float] = field(default_factory=list)  # E[sum min(p, q)], T = 1
    vocab_coverage: float = 1.0  # teacher mass inside the draft vocabulary


# -- data ----------------------------------------------------------------------------------------


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


# -- teacher and student -------------------------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    """One batch through the frozen trunk."""

    embeddings: mx.array  # (B, S, H) embed(x_t)
    hiddens: mx.array  # (B, S, H) h_t as the head reads it
    teacher_logp: mx.array  # (B, S, V') log p(x_{t+1} = v | x_<=t), renormalised over V'
    coverage: mx.array  # (B, S) teacher mass inside the draft vocabulary


def trunk_targets(
    trunk: Trunk, batch: Batch, source: HiddenSource, draft_ids: mx.array | None
) -> Targets:
    hiddens, logits = trunk.forward_batch(batch.tokens, None, source)
    logp = logits.astype(mx.float32)
    logp = logp - mx.logsumexp(logp, axis=-1, keepdims=True)
    if draft_ids is not None:
        logp = logp[..., draft_ids]
    inside = mx.logsumexp(logp, axis=-1, keepdims=True)
    embeddings = trunk.body.embed_tokens(batch.tokens)
    targets = Targets(embeddings, hiddens, logp - inside, mx.exp(inside[..., 0]))
    mx.eval(targets.embeddings, targets.hiddens, targets.teacher_logp, targets.coverage)
    return targets


def unrolled_outputs(
    head: MTPHead, embeddings: mx.array, hiddens: mx.array, depth: int
) -> list[mx.array]:
    """Head outputs at depths 1..depth for every base position (see the module docstring);
    depth k gives (B, S - k, H): output i predicts x_{i+k+1}."""
    if head.config.kind != "generic":
        raise ValueError(
            f"only generic (llama-block) heads are fitted, got a {head.config.kind} head"
        )
    seq_len = hiddens.shape[1]
    keys_values: list[list[tuple[mx.array, mx.array]]] = [[] for _ in head.layers]
    outputs: list[mx.array] = []
    for k in range(1, depth + 1):
        n = seq_len - k
        reads = hiddens[:, :n] if k == 1 else outputs[-1][:, :n]
        x = mx.concatenate(
            [head.pre_fc_norm_embedding(embeddings[:, k : k + n]), head.pre_fc_norm_hidden(reads)],
            axis=-1,
        )
        x = head.fc(x)
        mask = _unrolled_mask(n, k)
        for layer, cache in zip(head.layers, keys_values, strict=True):
            x = _block(layer, x, cache, offset=k - 1, mask=mask)
        outputs.append(head.norm(x))
    return outputs


def _unrolled_mask(n: int, depth: int) -> mx.array:
    """(n, depth * n) bool: causal over depth-1 keys, the diagonal over each later depth's."""
    causal = mx.tril(mx.ones((n, n), dtype=mx.bool_))
    eye = mx.eye(n, dtype=mx.bool_)
    return mx.concatenate([causal] + [eye] * (depth - 1), axis=1)


def _block(
    layer: nn.Module,
    x: mx.array,
    cache: list[tuple[mx.array, mx.array]],
    *,
    offset: int,
    mask: mx.array,
) -> mx.array:
    """An mlx-lm llama TransformerBlock whose attention reads this depth's keys and values
    plus those cached from earlier depths (cut to this depth's n positions)."""
    attn = layer.self_attn
    batch, n, _ = x.shape
    h = layer.input_layernorm(x)
    queries = attn.q_proj(h).reshape(batch, n, attn.n_heads, -1).transpose(0, 2, 1, 3)
    keys = attn.k_proj(h).reshape(batch, n, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    values = attn.v_proj(h).reshape(batch, n, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    queries = attn.rope(queries, offset=offset)
    keys = attn.rope(keys, offset=offset)
    cache.append((keys, values))
    all_keys = mx.concatenate([k[:, :, :n] for k, _ in cache], axis=2)
    all_values = mx.concatenate([v[:, :, :n] for _, v in cache], axis=2)
    out = mx.fast.scaled_dot_product_attention(
        queries, all_keys, all_values, scale=attn.scale, mask=mask
    )
    x = x + attn.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, n, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def depth_losses(
    head: MTPHead,
    rows: mx.array,
    targets: Targets,
    target_mask: mx.array,
    depth: int,
) -> tuple[list[mx.array], list[mx.array]]:
    """Per depth: masked mean KL(p || q) and masked mean sum(min(p, q)) (acceptance at T = 1
    of a draft whose earlier drafts stood)."""
    outputs = unrolled_outputs(head, targets.embeddings, targets.hiddens, depth)
    losses, accepts = [], []
    for k, out in enumerate(outputs, start=1):
        logq = out @ rows.T
        logq = logq - mx.logsumexp(logq, axis=-1, keepdims=True)
        logp = targets.teacher_logp[:, k:]
        p = mx.exp(logp)
        mask = target_mask[:, k:]
        count = mx.maximum(mask.sum(), 1.0)
        kl = (p * (logp - logq)).sum(axis=-1)
        losses.append((kl * mask).sum() / count)
        overlap = mx.minimum(p, mx.exp(logq)).sum(axis=-1)
        accepts.append(mx.stop_gradient((overlap * mask).sum() / count))
    return losses, accepts


# -- fitting -------------------------------------------------------------------------------------


def init_head(trunk: Trunk, config: FitConfig, draft_ids: Sequence[int] | None) -> MTPHead:
    """A fresh generic head that starts close to passing h_t through: fc reads the hidden half
    as the identity (the embedding half small random), the block's residual branches scaled by
    0.1. Its first drafts are then a softened copy of the trunk's own next-token guess (KL ~5 on
    SmolLM2) instead of confident noise (KL ~12, and unstable early steps)."""
    mx.random.seed(config.seed)
    head = make_generic_head(trunk.model)
    size = head.fc.weight.shape[0]
    embedding_half = 0.01 * mx.random.normal((size, size)) / math.sqrt(size)
    head.fc.weight = mx.concatenate([embedding_half, mx.eye(size)], axis=1)
    for layer in head.layers:
        layer.self_attn.o_proj.weight = 0.1 * layer.self_attn.o_proj.weight
        layer.mlp.down_proj.weight = 0.1 * layer.mlp.down_proj.weight
    head.set_draft_ids(draft_ids)
    mx.eval(head.parameters())
    return head


def resume_head(trunk: Trunk, path: Path) -> MTPHead:
    """A saved generic head to fit further, in float32 whatever it was stored as."""
    head = load_sidecar_head(Path(path), trunk.model)
    head.set_dtype(mx.float32)
    mx.eval(head.parameters())
    return head


def fit_head(
    trunk: Trunk,
    head: MTPHead,
    samples: Sequence[Sample],
    config: FitConfig,
    *,
    log: Callable[[dict[str, Any]], None] | None = None,
    log_every: int = 10,
) -> FitResult:
    """Train `head` in place on `samples`; the trunk stays frozen."""
    rows = trunk.output_rows(
        head.draft_ids if head.draft_ids is not None else mx.arange(trunk.vocab_size)
    )
    mx.eval(rows)  # a constant of the compiled step, not a graph it would have to capture
    weights = [config.depth_decay**k for k in range(config.depth)]
    total_weight = sum(weights)

    def loss_fn(
        targets: Targets, target_mask: mx.array
    ) -> tuple[mx.array, tuple[list[mx.array], list[mx.array]]]:
        losses, accepts = depth_losses(head, rows, targets, target_mask, config.depth)
        loss = sum(w * x for w, x in zip(weights, losses, strict=True)) / total_weight
        return loss, (losses, accepts)

    optimizer = optim.AdamW(learning_rate=config.lr, weight_decay=config.weight_decay)
    optimizer.init(head.trainable_parameters())
    value_and_grad = nn.value_and_grad(head, lambda _, t, m: loss_fn(t, m))
    state = [head.state, optimizer.state]

    def step(embeddings, hiddens, teacher_logp, target_mask):
        targets = Targets(embeddings, hiddens, teacher_logp, coverage=target_mask)
        (loss, aux), grads = value_and_grad(head, targets, target_mask)
        grads, _ = optim.clip_grad_norm(grads, config.grad_clip)
        optimizer.update(head, grads)
        return loss, aux

    compiled = mx.compile(step, inputs=state, outputs=state)
    batches = iter_batches(samples, config.batch, config.seq_len, config.seed)
    result = FitResult(steps=0, seconds=0.0)
    total_steps = config.steps
    coverage: list[float] = []
    start = time.monotonic()
    first_step = 0.0
    for step_index in range(config.steps):
        if step_index >= total_steps:
            break
        optimizer.learning_rate = _lr_at(step_index, total_steps, config)
        batch = next(batches)
        targets = trunk_targets(trunk, batch, head.config.hidden_source, head.draft_ids)
        loss, (losses, accepts) = compiled(
            targets.embeddings, targets.hiddens, targets.teacher_logp, batch.target_mask
        )
        mx.eval(loss, losses, accepts, state)
        coverage.append(_masked_mean(targets.coverage, batch.target_mask))
        result.losses.append(loss.item())
        result.depth_losses = [x.item() for x in losses]
        result.depth_acceptance = [x.item() for x in accepts]
        result.steps = step_index + 1
        elapsed = time.monotonic() - start
        if step_index == 0:
            first_step = elapsed  # includes compiling the step (minutes for CUDA kernels)
        if config.minutes is not None and step_index == 3:
            # Timed past the compile: shrink the schedule so the fit ends inside the budget.
            per_step = (elapsed - first_step) / 3
            left = config.minutes * 60 - elapsed
            total_steps = min(config.steps, max(4, 4 + int(left / per_step)))
        if config.minutes is not None and elapsed > config.minutes * 60:
            break
        if log is not None and (step_index % log_every == 0 or step_index + 1 == total_steps):
            log(
                {
                    "step": step_index + 1,
                    "of": total_steps,
                    "loss": round(result.losses[-1], 4),
                    "depth_loss": [round(x, 4) for x in result.depth_losses],
                    "depth_acceptance_t1": [round(x, 3) for x in result.depth_acceptance],
                    "lr": float(optimizer.learning_rate.item()),
                    "seconds": round(elapsed, 1),
                }
            )
    result.seconds = time.monotonic() - start
    result.vocab_coverage = float(np.mean(coverage)) if coverage else 1.0
    return result


def evaluate_teacher_forced(
    trunk: Trunk, head: MTPHead, samples: Sequence[Sample], config: FitConfig, num_batches: int
) -> dict[str, list[float] | float]:
    """Per-depth KL and expected acceptance (T = 1) on held-out samples, no update."""
    rows = trunk.output_rows(
        head.draft_ids if head.draft_ids is not None else mx.arange(trunk.vocab_size)
    )
    batches = iter_batches(samples, config.batch, config.seq_len, config.seed + 1)
    losses, accepts, coverage = [], [], []
    for _ in range(num_batches):
        batch = next(batches)
        targets = trunk_targets(trunk, batch, head.config.hidden_source, head.draft_ids)
        depth_kl, depth_accept = depth_losses(head, rows, targets, batch.target_mask, config.depth)
        losses.append([x.item() for x in depth_kl])
        accepts.append([x.item() for x in depth_accept])
        coverage.append(_masked_mean(targets.coverage, batch.target_mask))
    return {
        "depth_kl": [round(float(x), 4) for x in np.mean(losses, axis=0)],
        "depth_acceptance_t1": [round(float(x), 4) for x in np.mean(accepts, axis=0)],
        "vocab_coverage": round(float(np.mean(coverage)), 4),
    }


def _masked_mean(values: mx.array, mask: mx.array) -> float:
    return float(((values * mask).sum() / mx.maximum(mask.sum(), 1.0)).item())


def _lr_at(step: int, total: int, config: FitConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    warmup = min(config.warmup, max(total // 10, 1))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# -- loading, measuring and saving ---------------------------------------------------------------


def load_trunk(model_dir: Path) -> tuple[Trunk, Any]:
    """(Trunk, mlx-lm tokenizer) for an mlx-lm model folder."""
    model, tokenizer = mlx_lm.load(str(model_dir))
    return Trunk(model), tokenizer


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a chat, ready for the assistant's turn."""
    return list(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True))


def stop_ids(tokenizer: Any) -> list[int]:
    return sorted(int(t) for t in tokenizer.eos_token_ids)


@dataclass
class ModeResult:
    """One decoding mode over a set of prompts: pooled tokens and decode time, and for the MTP
    lane the pooled acceptance."""

    mode: str
    num_tokens: int = 0
    decode_seconds: float = 0.0
    stats: AcceptanceStats | None = None

    @property
    def decode_tok_s(self) -> float:
        return self.num_tokens / max(self.decode_seconds, 1e-9)


def compare_modes(
    trunk: Trunk,
    head: MTPHead,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    depths: Sequence[int],
    max_tokens: int,
) -> dict[str, ModeResult]:
    """Plain decoding ("ar") and the MTP lane at each depth ("d1".."d3") over the same prompts,
    modes alternating per prompt; decode time counts from the first token (prefill apart).
    The first prompt is run once untimed to warm up."""
    results = {"ar": ModeResult("ar")}
    results |= {f"d{d}": ModeResult(f"d{d}", stats=AcceptanceStats(d)) for d in depths}
    for index, prompt in enumerate([prompts[0], *prompts]):
        for mode, result in results.items():
            decoder = None
            if mode == "ar":
                tokens = iter_plain(trunk.model, prompt, params)
            else:
                decoder = MTPDecoder(trunk, head, params, int(mode[1:]))
                tokens = decoder.generate(prompt, max_tokens)
            count, first, last = 0, 0.0, 0.0
            for _ in tokens:
                count += 1
                last = time.perf_counter()
                if count == 1:
                    first = last
                if count == max_tokens:
                    break
            if index == 0:
                continue  # warm-up
            result.num_tokens += count - 1
            result.decode_seconds += last - first
            if decoder is not None and result.stats is not None:
                _pool(result.stats, decoder.stats)
    return results


def _pool(into: AcceptanceStats, stats: AcceptanceStats) -> None:
    into.num_cycles += stats.num_cycles
    into.num_resampled += stats.num_resampled
    for j, count in enumerate(stats.accepted_at):
        into.accepted_at[j] += count


def measure_acceptance(
    trunk: Trunk,
    head: MTPHead,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    depth: int,
    max_tokens: int,
) -> AcceptanceStats:
    """Acceptance of real draft-verify decoding over the prompts, pooled over all cycles."""
    pooled = AcceptanceStats(depth)
    for prompt in prompts:
        decoder = MTPDecoder(trunk, head, params, depth)
        for _ in decoder.generate(prompt, max_tokens):
            pass
        _pool(pooled, decoder.stats)
    return pooled


def trunk_identity(model_dir: Path, model: nn.Module) -> dict[str, str]:
    """What a packaged head is matched on: the folder's fingerprint and, for a converted GGUF,
    the GGUF's sha256 (the same head serves every dtype it is converted to)."""
    dtype = parameters_dtype(v for _, v in tree_flatten(model.parameters()))
    identity = {
        "model_name": Path(model_dir).name,
        "trunk_fingerprint": fingerprint_model_dir(model_dir, dtype),
    }
    record = read_conversion_record(Path(model_dir))
    if record is not None and record.source is not None:
        identity["gguf_sha256"] = record.source.sha256
    return identity


def save_fitted_head(
    head: MTPHead,
    path: Path,
    *,
    config: FitConfig,
    result: FitResult,
    identity: dict[str, str],
    extra: dict[str, Any] | None = None,
    float16: bool = False,
) -> None:
    """Write the sidecar with how it was fitted in its metadata; float16 halves its size (the
    head is cast in place)."""
    if float16:
        head.set_dtype(mx.float16)
    info = {
        **identity,
        "fit_config": asdict(config),
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "final_loss": round(result.losses[-1], 4) if result.losses else None,
        "depth_loss": [round(x, 4) for x in result.depth_losses],
        "depth_acceptance_t1": [round(x, 4) for x in result.depth_acceptance],
        "draft_vocab_size": 0 if head.draft_ids is None else int(head.draft_ids.size),
        "vocab_coverage": round(result.vocab_coverage, 4),
        **(extra or {}),
    }
    info = {k: v for k, v in info.items() if v is not None}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_head(head, Path(path), info)
