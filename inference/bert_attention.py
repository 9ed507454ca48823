"""NumPy kernels of the BERT encoder on a CPU: the attention core, and residual + LayerNorm.

Why not MLX here: its CPU backend runs softmax as scalar loops (exp ~20 ns an element, a
polynomial exp ~10 ns, a row max ~2 ns), over a [batch, heads, L, L] tensor of ~100 MB that
never fits a cache. NumPy's exp and reductions are SIMD (~2.6 ns an element for the whole
softmax), and going one sequence at a time keeps each [heads, n, n] block in the L2 cache and
lets the sequences run in parallel on a thread pool (NumPy releases the GIL). The batch comes
packed (sequences end to end, no padding), each sequence attending over its own tokens. The
q/k/v bias is added here, per sequence while it is in cache, instead of by MLX's addmm.

`residual_layer_norm` is NumPy for the same reason: MLX's CPU layer_norm runs ~4.5 ns an
element; NumPy over row blocks on the pool, ~1.5x faster on one thread, and spread over all;
it adds the bias the residual branch's projection left out.

This module knows nothing about layers, weights or pooling; `bert.py` calls it on CPU only.
"""

from __future__ import annotations

import math

from inference.numpy_pool import num_workers, run_all

import mlx.core as mx
import numpy as np

# exp(64) * 1e5 keys stays far below float32's max; exp(-64) is still a normal float32.
_EXP_SAFE = 64.0
_EXP_SAFE_MIN = math.exp(-_EXP_SAFE)


def attention_context(
    qkv: mx.array, qkv_bias: mx.array | None, lengths: list[int], num_heads: int, scale: float
) -> mx.array:
    """qkv [T, 3H] (query | key | value, head-major inside each) of sequences laid end to end
    (`lengths` sum to T), plus its projection's bias [3H] -> softmax(q k^T * scale) v as
    [T, H] float32, each sequence attending over its own tokens."""
    total, width = qkv.shape
    hidden = width // 3
    fused = np.asarray(qkv.astype(mx.float32))  # evaluates; a view of MLX's buffer, no copy
    bias = None if qkv_bias is None else np.asarray(qkv_bias.astype(mx.float32))
    out = np.empty((total, hidden), dtype=np.float32)
    starts = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    groups = _head_groups(num_heads, len(lengths))
    tasks = [(seq, heads) for seq in range(len(lengths)) for heads in groups]

    def run(task: tuple[int, slice]) -> None:
        seq, heads = task
        rows = slice(starts[seq], starts[seq + 1])
        _attend(fused[rows], bias, out[rows], num_heads, heads, scale)

    run_all(run, tasks)
    return mx.array(out)


def residual_layer_norm(
    x: mx.array,
    residual: mx.array,
    residual_bias: mx.array | None,
    weight: mx.array,
    bias: mx.array,
    eps: float,
) -> mx.array:
    """LayerNorm(x + residual + residual_bias) over the last axis, as float32 [..., H]."""
    shape = x.shape
    a = np.asarray(x.astype(mx.float32)).reshape(-1, shape[-1])  # evaluates both graphs
    b = np.asarray(residual.astype(mx.float32)).reshape(-1, shape[-1])
    w, c = np.asarray(weight.astype(mx.float32)), np.asarray(bias.astype(mx.float32))
    rb = None if residual_bias is None else np.asarray(residual_bias.astype(mx.float32))
    out = np.empty_like(a)
    step = max(1, -(-a.shape[0] // num_workers()))
    blocks = [slice(start, start + step) for start in range(0, a.shape[0], step)]

    def run(rows: slice) -> None:
        h = np.add(a[rows], b[rows], out=out[rows])
        if rb is not None:
            h += rb
        h -= h.mean(axis=-1, keepdims=True)
        variance = np.einsum("ij,ij->i", h, h)[:, None] / h.shape[-1]
        h *= 1.0 / np.sqrt(variance + eps)
        h *= w
        h += c

    run_all(run, blocks)
    return mx.array(out.reshape(shape))


def _attend(
    fused: np.ndarray,
    bias: np.ndarray | None,
    out: np.ndarray,
    num_heads: int,
    heads: slice,
    scale: float,
) -> None:
    """One sequence: fused [n, 3H] (+ bias [3H]) -> out[:, heads' columns] = the context."""
    n = fused.shape[0]
    if n == 0:
        return
    parts = fused.reshape(n, 3, num_heads, -1)[:, :, heads]  # [n, 3, h, d] views
    if bias is None:
        bias = np.zeros(fused.shape[1], dtype=np.float32)
    q_bias, k_bias, v_bias = bias.reshape(3, num_heads, -1)[:, heads]  # [h, d] each
    q = (parts[:, 0] + q_bias).transpose(1, 0, 2) * np.float32(scale)  # [h, n, d]
    k = (parts[:, 1] + k_bias).transpose(1, 2, 0)  # [h, d, n]
    v = parts[:, 2].transpose(1, 0, 2)  # [h, n, d]
    scores = np.matmul(q, k)  # [h, n, n]: BLAS reads the strided views in place
    # v with a column of ones: the same matmul gives the softmax denominators (no sum pass).
    v_ones = np.empty((v.shape[0], n, v.shape[2] + 1), dtype=np.float32)
    np.add(v, v_bias[:, None], out=v_ones[..., :-1])
    v_ones[..., -1] = 1.0
    # Softmax is shift-invariant; while no score is above _EXP_SAFE (no overflow) and no row's
    # sum below exp(-_EXP_SAFE) (its terms are normal floats), exp needs no shift: two passes saved.
    unshifted = scores.max() <= _EXP_SAFE
    if not unshifted:
        scores -= scores.max(axis=-1, keepdims=True)
    weighted = np.matmul(np.exp(scores, out=scores), v_ones)
    if unshifted and weighted[..., -1].min() < _EXP_SAFE_MIN:  # a row of very negative scores
        scores = np.matmul(q, k)
        scores -= scores.max(axis=-1, keepdims=True)
        weighted = np.matmul(np.exp(scores, out=scores), v_ones)
    context = weighted[..., :-1] / weighted[..., -1:]
    head_dim = v.shape[-1]
    columns = slice(heads.start * head_dim, heads.stop * head_dim)
    out[:, columns] = context.transpose(1, 0, 2).reshape(n, -1)


def _head_groups(num_heads: int, batch: int) -> list[slice]:
    """Split heads so that even a batch of one sequence gives every worker a task."""
    groups = max(1, min(num_heads, -(-num_workers() // batch)))
    size = -(-num_heads // groups)
    return [slice(start, min(start + size, num_heads)) for start in range(0, num_heads, size)]
