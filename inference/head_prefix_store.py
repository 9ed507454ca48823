"""The MTP head's context over the prompts it has read, for requests whose prefill was cached.

The head reads pairs (h_t, x_{t+1}) of trunk hiddens and tokens. A prefix-cache hit skips the
prefill of the cached tokens, so their hiddens never exist and the head would start with only
the uncached tail as context: on a repeated prompt greedy acceptance fell from 0.71 to 0.51.
The head's KV at position t depends on tokens x_0 .. x_{t+1} only, and h_t on x_0 .. x_t
(both causal), so what one prompt left serves any later prompt that starts with the same
tokens. A hit of s tokens (x_0 .. x_{s-1} shared) gets back the head's KV of positions
0 .. s-2 and the trunk hidden h_{s-1}, whose pair with the request's own x_s the head then
reads: the head's context is what a full prefill would have given it.

Kept in RAM, LRU under a byte budget; an entry that a longer prompt extends is replaced by it.
Small: ~3.8 KB a token for SmolLM2 (one head layer's KV and one hidden; the trunk's KV is 46 KB),
so the default budget holds ~17k prompt tokens. With an SSD tier (`ssd`, head_prefix_ssd.py)
every entry is also written to disk, and a RAM miss is looked up there: after a restart the
trunk's prefix cache is restored from SSD, and so is the head's context over the same prompts.

Ignores: the trunk's KV (prefix_cache.py), and when the lane stores and restores (engine_mtp.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from inference.head_prefix_ssd import HeadPrefixSSD
from inference.host_tensor import host_tensor
from inference.kv_ssd_format import HostTensor

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

DEFAULT_HEAD_PREFIX_BYTES = 64 << 20


@dataclass(frozen=True)
class _Entry:
    tokens: np.ndarray  # int32 x_0 .. x_{P-1}
    layers: list[tuple[mx.array, mx.array]]  # per head layer: keys, values of positions 0..P-2
    hiddens: mx.array  # (1, P, H) trunk hiddens h_0 .. h_{P-1}
    num_bytes: int


class HeadPrefixStore:
    """`store` what the head read over a prompt; `restore` it for a prompt with the same start."""

    def __init__(self, max_bytes: int = DEFAULT_HEAD_PREFIX_BYTES):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self.num_bytes = 0
        self.ssd: HeadPrefixSSD | None = None  # the engine attaches one with its SSD cache

    def __len__(self) -> int:
        return len(self._entries)

    def store(self, tokens: Sequence[int], caches: Sequence[KVCache], hiddens: mx.array) -> None:
        """Keep the head's KV of positions 0 .. P-2 and the hiddens h_0 .. h_{P-1} of a prompt
        of P tokens; `caches` hold at least those positions from 0, `hiddens` (1, >= P, H)."""
        num_tokens = len(tokens)
        if num_tokens < 2 or hiddens.shape[1] < num_tokens:
            return
        if any(c.offset < num_tokens - 1 for c in caches):
            return
        ids = np.asarray(tokens, dtype=np.int32)
        key = ids.tobytes()
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        layers = [
            (c.keys[..., : num_tokens - 1, :], c.values[..., : num_tokens - 1, :]) for c in caches
        ]
        kept_hiddens = hiddens[:, :num_tokens]
        mx.eval(layers, kept_hiddens)  # copies of just these positions, not views of the caches
        if self._keep(ids, layers, kept_hiddens) and self.ssd is not None:
            host_hiddens = host_tensor(kept_hiddens)
            host_layers = [(host_tensor(k), host_tensor(v)) for k, v in layers]
            if host_hiddens is not None and all(k and v for k, v in host_layers):
                self.ssd.write(ids, host_hiddens, host_layers)  # type: ignore[arg-type]

    def _keep(
        self, ids: np.ndarray, layers: list[tuple[mx.array, mx.array]], hiddens: mx.array
    ) -> bool:
        """Into RAM, if it fits the budget at all."""
        size = hiddens.nbytes + sum(k.nbytes + v.nbytes for k, v in layers)
        if size > self.max_bytes:
            return False
        for old_key, old in list(self._entries.items()):  # entries this one extends go
            if len(old.tokens) <= len(ids) and np.array_equal(old.tokens, ids[: len(old.tokens)]):
                self._drop(old_key)
        self._entries[ids.tobytes()] = _Entry(ids, layers, hiddens, size)
        self.num_bytes += size
        while self.num_bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        return True

    def restore(
        self, tokens: Sequence[int], num_cached: int, caches: Sequence[KVCache]
    ) -> mx.array | None:
        """For a request whose first `num_cached` tokens were cached: fill its empty head
        `caches` with positions 0 .. num_cached - 2 and return the hiddens h_0 .. h_{num_cached-1}
        (1, num_cached, H), or None (caches untouched) when no stored prompt starts so."""
        if num_cached < 2 or len(tokens) < num_cached or any(c.offset for c in caches):
            return None
        need = np.asarray(tokens[:num_cached], dtype=np.int32)
        entry = self._find(need)
        if entry is None or len(entry.layers) != len(caches):
            return None
        for cache, (keys, values) in zip(caches, entry.layers, strict=True):
            # Slices are new arrays: the cache's writes never reach the entry.
            cache.keys = keys[..., : num_cached - 1, :]
            cache.values = values[..., : num_cached - 1, :]
            cache.offset = num_cached - 1
        return entry.hiddens[:, :num_cached]

    def _find(self, need: np.ndarray) -> _Entry | None:
        """The entry whose prompt starts with `need`: from RAM, else from SSD into RAM."""
        for key in reversed(self._entries):
            entry = self._entries[key]
            if len(entry.tokens) >= len(need) and np.array_equal(entry.tokens[: len(need)], need):
                self._entries.move_to_end(key)
                return entry
        found = None if self.ssd is None else self.ssd.find(need)
        if found is None:
            return None
        ids, tensors = found
        layers = [
            (_from_host(tensors[f"keys.{i}"]), _from_host(tensors[f"values.{i}"]))
            for i in range(sum(1 for name in tensors if name.startswith("keys.")))
        ]
        hiddens = _from_host(tensors["hiddens"])
        if not self._keep(ids, layers, hiddens):
            return _Entry(ids, layers, hiddens, 0)  # too big for RAM: used once
        return self._entries[ids.tobytes()]

    def close(self) -> None:
        """Finish the queued SSD writes."""
        if self.ssd is not None:
            self.ssd.close()
            self.ssd = None

    def _drop(self, key: bytes) -> None:
        self.num_bytes -= self._entries.pop(key).num_bytes


def _from_host(tensor: HostTensor) -> mx.array:
    array = mx.array(tensor.array)
    return array.view(mx.bfloat16) if tensor.dtype == "BF16" else array
