"""The loss an MTP head is fitted with: frozen-trunk targets and the head unrolled to depth D.

  teacher  one trunk pass per batch: hiddens h_t and log p(x_{t+1} | x_<=t) at every t,
           restricted to the head's draft vocabulary and renormalised there
  student  the head unrolled to depth D exactly as MTPDecoder drafts (diagram below); per depth
           k the masked mean KL(p_trunk(x_{t+k+1}) || q_head,k) and the expected acceptance

Unrolled attention at depth k for base position i. The head cache holds one entry per pair
(h_j, x_{j+1}), then the recursive entries of this cycle; positions (RoPE) continue from it:

    keys      depth 1 entries j <= i     depth 2 entry at i ... depth k entry at i (itself)
    position  j                          i + 1              ... i + k - 1

so depth k runs over all i at once with keys [K_1 | K_2 | ... | K_k] and a mask that is causal on
K_1 and the diagonal on the rest. Depth k > 1 reads the head's own output of depth k - 1 in
place of h, and the sequence's own token x_{i+k} (a sample of the trunk: the draft that would
have to stand for depth k to matter).
Ignores: how depths are weighted, the optimiser and its schedule (mtp_fit), where batches come
from (mtp_fit_data), and native heads (their blocks are not llama blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

from inference.mtp_decode import Trunk
from inference.mtp_fit_data import Batch
from inference.mtp_head import HiddenSource, MTPHead

import mlx.core as mx
import mlx.nn as nn


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


def draft_rows(trunk: Trunk, head: MTPHead) -> mx.array:
    """The trunk's output rows for the head's draft vocabulary (all of it when it has none)."""
    return trunk.output_rows(
        head.draft_ids if head.draft_ids is not None else mx.arange(trunk.vocab_size)
    )


def masked_mean(values: mx.array, mask: mx.array) -> mx.array:
    """Mean of `values` where `mask` is 1; 0 when the mask is empty."""
    return (values * mask).sum() / mx.maximum(mask.sum(), 1.0)


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
        kl = (p * (logp - logq)).sum(axis=-1)
        losses.append(masked_mean(kl, mask))
        overlap = mx.minimum(p, mx.exp(logq)).sum(axis=-1)
        accepts.append(mx.stop_gradient(masked_mean(overlap, mask)))
    return losses, accepts
