"""The attention core of a prefill chunk in NumPy, on a CPU: softmax(q k^T * scale + mask) v.

For a chunk of many queries the softmax is most of a layer's time on MLX's CPU backend, even
with `fast_math.exp_shifted` (~150 Melem/s); NumPy's exp is SIMD (~1,200 Melem/s a core) and the
work splits over the cores by (sequence, key-value head, query block) on `numpy_pool`. The
price is a synchronisation: q, k and v are evaluated here, so the forward pass waits for them;
`fused_attention` takes this path only for chunks long enough that it does not matter.
"""

from __future__ import annotations

from typing import Any

from inference.numpy_pool import num_workers, run_all

import mlx.core as mx
import numpy as np

_MIN_ROWS_PER_TASK = 16  # query rows; smaller blocks spend more on task overhead than they gain


def numpy_attention(
    queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: Any
) -> mx.array:
    """q (B, Hq, L, D), k and v (B, Hkv, T, D), float32 -> (B, Hq, L, D).

    mask: None, "causal" (the L queries are the last L of the T positions), or an array
    broadcastable to (B, Hq, L, T): bool (True attends) or additive.
    """
    batch, num_heads, length, head_dim = queries.shape
    num_kv_heads, num_keys = keys.shape[1], keys.shape[2]
    group = num_heads // num_kv_heads
    mx.eval(queries, keys, values)
    q, k, v = np.asarray(queries), np.asarray(keys), np.asarray(values)  # views, no copies
    additive = _additive_mask(mask, length, num_keys)  # None or (B', H', L, T) float32
    out = np.empty((batch, num_heads, length, head_dim), dtype=np.float32)
    tasks = [
        (row, kv_head, rows)
        for row in range(batch)
        for kv_head in range(num_kv_heads)
        for rows in _row_blocks(length, batch * num_kv_heads)
    ]

    def run(task: tuple[int, int, slice]) -> None:
        row, kv_head, rows = task
        heads = slice(kv_head * group, (kv_head + 1) * group)
        scores = (q[row, heads, rows] * np.float32(scale)) @ k[row, kv_head].T  # (group, l, T)
        if additive is not None:
            mask_rows = additive[row % additive.shape[0]]  # (1 or Hq, L, T)
            scores += mask_rows[heads if mask_rows.shape[0] > 1 else slice(None), rows]
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        # v with a column of ones: one matmul gives the context and the softmax denominators.
        v_ones = np.empty((num_keys, head_dim + 1), dtype=np.float32)
        v_ones[:, :-1] = v[row, kv_head]
        v_ones[:, -1] = 1.0
        weighted = scores @ v_ones
        out[row, heads, rows] = weighted[..., :-1] / weighted[..., -1:]

    run_all(run, tasks)
    return mx.array(out)


def _additive_mask(mask: Any, length: int, num_keys: int) -> np.ndarray | None:
    """The mask as 0 / -inf float32 with four axes, or None."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown attention mask {mask!r}")
        positions = np.arange(num_keys - length, num_keys)[:, None]
        allowed = np.arange(num_keys)[None, :] <= positions
        return np.where(allowed, np.float32(0), np.float32(-np.inf))[None, None]
    array = np.asarray(mask)
    if array.dtype == np.bool_:
        array = np.where(array, np.float32(0), np.float32(-np.inf))
    array = array.astype(np.float32, copy=False)
    while array.ndim < 4:
        array = array[None]
    return array


def _row_blocks(length: int, num_groups: int) -> list[slice]:
    """Split the queries so every worker has work even for one sequence and few KV heads."""
    wanted = -(-2 * num_workers() // num_groups)  # two tasks per worker smooths the tail
    blocks = max(1, min(wanted, length // _MIN_ROWS_PER_TASK))
    size = -(-length // blocks)
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]
