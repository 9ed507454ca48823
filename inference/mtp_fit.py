"""Fit a generic MTP head for a model that has none, by self-distillation on its own outputs.

The trunk is frozen; the head learns to predict what the trunk itself would predict next:

  1. data     token sequences: the model's own generations for a list of chats (sampled at
              temperature ~0.7; loss on the generated part only), plus windows of any texts
              (mtp_fit_data)
  2. teacher  one trunk pass per batch: hiddens h_t and log p(x_{t+1} | x_<=t) at every t,
              restricted to the head's draft vocabulary and renormalised there (mtp_fit_loss)
  3. student  the head unrolled to depth D exactly as MTPDecoder drafts (mtp_fit_loss),
              loss sum_k w_k * KL(p_trunk(x_{t+k+1}) || q_head,k), w_k = depth_decay^(k-1)
  4. update   AdamW on the head's parameters only, warm-up then cosine decay (here)

This module holds the fit loop, the teacher-forced estimate on held-out samples, and the sidecar
the head is saved as, with how it was fitted and which trunk it fits in its metadata. Real
draft-verify acceptance and speed are measured in mtp_fit_measure.
Long samples are cut to a window of seq_len tokens; the trunk then sees only the window.
A fresh head starts as a near pass-through of h_t (`init_head`); `resume_head` continues one.
Ignores: native heads (their blocks are not llama blocks), batching across devices, checkpoints
mid-fit, and anything past the head (serving, the engine).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from inference.gguf_convert import read_conversion_record
from inference.model_fingerprint import fingerprint_model_dir, parameters_dtype
from inference.mtp_decode import Trunk
from inference.mtp_fit_data import Sample, iter_batches
from inference.mtp_fit_loss import Targets, depth_losses, draft_rows, masked_mean, trunk_targets
from inference.mtp_head import MTPHead, load_sidecar_head, make_generic_head, save_head

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import mlx_lm
import numpy as np
from mlx.utils import tree_flatten


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


@dataclass
class FitResult:
    """What a fit did: per-step loss, per-depth loss and teacher-forced acceptance at the end."""

    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    depth_losses: list[float] = field(default_factory=list)
    depth_acceptance: list[float] = field(default_factory=list)  # E[sum min(p, q)], T = 1
    vocab_coverage: float = 1.0  # teacher mass inside the draft vocabulary


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
    rows = draft_rows(trunk, head)
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
        coverage.append(float(masked_mean(targets.coverage, batch.target_mask).item()))
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
    rows = draft_rows(trunk, head)
    batches = iter_batches(samples, config.batch, config.seq_len, config.seed + 1)
    losses, accepts, coverage = [], [], []
    for _ in range(num_batches):
        batch = next(batches)
        targets = trunk_targets(trunk, batch, head.config.hidden_source, head.draft_ids)
        depth_kl, depth_accept = depth_losses(head, rows, targets, batch.target_mask, config.depth)
        losses.append([x.item() for x in depth_kl])
        accepts.append([x.item() for x in depth_accept])
        coverage.append(float(masked_mean(targets.coverage, batch.target_mask).item()))
    return {
        "depth_kl": [round(float(x), 4) for x in np.mean(losses, axis=0)],
        "depth_acceptance_t1": [round(float(x), 4) for x in np.mean(accepts, axis=0)],
        "vocab_coverage": round(float(np.mean(coverage)), 4),
    }


def _lr_at(step: int, total: int, config: FitConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    warmup = min(config.warmup, max(total // 10, 1))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def load_trunk(model_dir: Path) -> tuple[Trunk, Any]:
    """(Trunk, mlx-lm tokenizer) for an mlx-lm model folder."""
    model, tokenizer = mlx_lm.load(str(model_dir))
    return Trunk(model), tokenizer


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
