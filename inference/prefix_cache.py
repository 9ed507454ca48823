"""Shared-prefix KV cache: blocks of prompt KV in RAM (hot) and on SSD, looked up by chained key.

    lookup(request, keys)  walk the prompt's block keys from the root while blocks are found:
                           RAM first, else SSD (read, checked, promoted into RAM); pins them
    store(request, ...)    a block the request just computed: copied out of its slot into RAM
                           (pinned); the engine spills it to SSD once its step has computed
    release(request)       the request finished or left: its pins go, its blocks stay cached

A block holds every layer's keys and values of block_size tokens as two arrays of shape
(layers, kv_heads, block_size, head_dim); restoring n tokens concatenates the hit's blocks along
the token axis and hands each layer's slice to SlotKVCache.load.

Each tier is a kv_blocks.BlockIndex under its own byte budget: LRU, leaves first, pinned blocks
stay. Every block stored in RAM is also written to SSD (write-behind), so a restart finds it;
RAM eviction just drops the RAM copy.

Only models whose every layer caches plain keys and values (mlx-lm's KVCache) are cached: a
rotating window or a recurrent state is not a per-token list that a prefix can be cut from, so
such models run with the cache off (logged once).

Ignores: which tokens a request computes (engine.py asks, restores and stores), threads (all of
it runs on the engine thread; the SSD tier has its own writer), and output tokens (only prompt
blocks are keyed).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from inference.kv_blocks import DEFAULT_BLOCK_SIZE, BlockIndex, block_keys
from inference.kv_ssd import HostTensor, SSDTier

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache

log = logging.getLogger(__name__)

DEFAULT_RAM_BYTES = 1 << 30  # ~23k tokens of SmolLM2-135M fp32, ~7k of an 8B model in bf16
DEFAULT_SSD_BYTES = 8 << 30
_HOST_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16"}


@dataclass(frozen=True)
class PrefixCacheConfig:
    """Block size and the byte budget of each tier; ssd_dir None: RAM only."""

    block_size: int = DEFAULT_BLOCK_SIZE
    ram_bytes: int = DEFAULT_RAM_BYTES
    ssd_bytes: int = DEFAULT_SSD_BYTES
    ssd_dir: Path | None = None  # this model's own folder (<root>/<fingerprint>)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        for name in ("ram_bytes", "ssd_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class PrefixCacheStats:
    """Counters since start and the tiers' contents now (a snapshot; read on any thread)."""

    enabled: bool
    block_size: int
    num_lookups: int  # requests looked up
    num_hits: int  # ... that found at least one block
    num_misses: int
    num_hit_tokens: int  # prompt tokens found (a request uses all but its last token at most)
    num_ssd_hit_tokens: int  # ... of which were read from SSD
    ram_blocks: int
    ram_bytes: int
    ram_evictions: int
    ssd_blocks: int  # stored or queued for writing
    ssd_bytes: int
    ssd_evictions: int
    ssd_writes: int
    ssd_dropped: int  # blocks not spilled: the writer fell behind, or their chain is not on SSD
    ssd_corrupt: int  # files that failed their checks: missed and deleted, never served
    disabled_reason: str | None = None


@dataclass(frozen=True)
class _Block:
    keys: mx.array  # (layers, kv_heads, block_size, head_dim)
    values: mx.array


@dataclass(frozen=True)
class PrefixHit:
    """The cached blocks at the start of a prompt (pinned for the request until released)."""

    blocks: tuple[_Block, ...]
    block_size: int

    @property
    def num_tokens(self) -> int:
        return len(self.blocks) * self.block_size

    def kv(self, num_tokens: int) -> tuple[list[mx.array], list[mx.array]]:
        """The first num_tokens tokens per layer: (kv_heads, num_tokens, head_dim) arrays."""
        assert 0 < num_tokens <= self.num_tokens
        out = []
        for part in ("keys", "values"):
            arrays = [getattr(block, part) for block in self.blocks]
            joined = arrays[0] if len(arrays) == 1 else mx.concatenate(arrays, axis=2)
            out.append([joined[layer, :, :num_tokens] for layer in range(joined.shape[0])])
        return out[0], out[1]


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the model's KV cannot be cut into prefix blocks, or None when it can."""
    make_cache = getattr(model, "make_cache", None)
    if make_cache is None:
        return None  # mlx-lm gives such models a KVCache per layer
    kinds = sorted({type(c).__name__ for c in make_cache() if type(c) is not KVCache})
    if kinds:
        return f"{type(model).__module__} caches {', '.join(kinds)}, not per-token keys/values"
    return None


class PrefixCache:
    """RAM and SSD tiers of prefix blocks for one model; see the module docstring."""

    def __init__(self, config: PrefixCacheConfig, fingerprint: str) -> None:
        self.config = config
        self.fingerprint = fingerprint
        self._ram = BlockIndex(config.ram_bytes)
        self._blocks: dict[str, _Block] = {}
        self._ssd: SSDTier | None = None
        if config.ssd_dir is not None and config.ssd_bytes > 0:
            self._ssd = SSDTier.open(config.ssd_dir, config.ssd_bytes, fingerprint)
        self.disabled_reason: str | None = None
        self.num_lookups = self.num_hits = self.num_hit_tokens = self.num_ssd_hit_tokens = 0

    @property
    def enabled(self) -> bool:
        return self.disabled_reason is None

    @property
    def has_ssd(self) -> bool:
        return self._ssd is not None

    def disable(self, reason: str) -> None:
        """Stop caching (the model's KV does not fit the format); logged once."""
        if self.disabled_reason is None:
            log.warning("prefix cache off: %s", reason)
            self.disabled_reason = reason

    def keys(self, token_ids: Sequence[int]) -> list[str]:
        """The chained keys of the prompt's full blocks."""
        return block_keys(token_ids, self.config.block_size, self.fingerprint)

    # -- requests ------------------------------------------------------------------------------

    def lookup(self, owner: str, keys: Sequence[str]) -> PrefixHit:
        """The longest cached run of keys from the first; its blocks are pinned for owner."""
        found: list[_Block] = []
        if not self.enabled:
            return PrefixHit((), self.config.block_size)
        self.num_lookups += 1
        if self._ssd is not None:
            self._ssd.poll()
        num_from_ssd = 0
        for index, key in enumerate(keys):
            block = self._blocks.get(key)
            if block is None:
                block = self._promote(key, keys[index - 1] if index else None)
                if block is None:
                    break
                num_from_ssd += 1
            self._ram.pin(owner, key)
            found.append(block)
        if found:
            chain = list(keys[: len(found)])
            self._ram.touch(chain)
            if self._ssd is not None:
                self._ssd.touch(chain)
            self.num_hits += 1
            self.num_hit_tokens += len(found) * self.config.block_size
            self.num_ssd_hit_tokens += num_from_ssd * self.config.block_size
        return PrefixHit(tuple(found), self.config.block_size)

    def store(
        self,
        owner: str,
        key: str,
        parent: str | None,
        keys: Sequence[mx.array],
        values: Sequence[mx.array],
    ) -> list[mx.array] | None:
        """Cache a block the owner computed (per layer (kv_heads, block_size, head_dim) views).

        Returns the new arrays to evaluate with the step ([] when the block was cached already),
        or None when it cannot be cached: the owner should stop storing its later blocks.
        """
        if not self.enabled:
            return None
        if key in self._blocks:
            self._ram.pin(owner, key)
            return []
        if parent is not None and parent not in self._blocks:
            return None  # the chain has a hole here: the block could never be found
        try:
            # stack copies the slot's rows out: the block must not keep the slot arrays alive.
            block = _Block(mx.stack(list(keys)), mx.stack(list(values)))
        except ValueError as exc:  # layers of different shapes
            self.disable(f"layers' KV shapes differ ({exc})")
            return None
        evicted = self._ram.add(key, parent, block.keys.nbytes + block.values.nbytes)
        if evicted is None:
            return None  # RAM is full of blocks running requests use
        for victim in evicted:
            del self._blocks[victim]
        self._blocks[key] = block
        self._ram.pin(owner, key)
        return [block.keys, block.values]

    def spill(self, keys: Sequence[str]) -> None:
        """Queue computed blocks (parents first) for SSD; call once their step has computed."""
        if self._ssd is None:
            return
        self._ssd.poll()
        for key in keys:
            block = self._blocks.get(key)
            entry = self._ram.get(key)
            if block is None or entry is None or self._ssd.holds(key):
                continue  # evicted from RAM meanwhile, or on SSD already
            dtype = _HOST_DTYPES.get(block.keys.dtype)
            if dtype is None:
                log.warning("prefix cache: no SSD format for %s KV", block.keys.dtype)
                return
            tensors = {
                "keys": HostTensor(dtype, _to_numpy(block.keys)),
                "values": HostTensor(dtype, _to_numpy(block.values)),
            }
            self._ssd.write(key, entry.parent, tensors, self.config.block_size)

    def release(self, owner: str) -> None:
        """The owner is done: its pins go (its blocks stay cached)."""
        self._ram.release(owner)

    def flush(self) -> None:
        """Wait for queued SSD writes."""
        if self._ssd is not None:
            self._ssd.flush()

    def close(self) -> None:
        if self._ssd is not None:
            self._ssd.close()

    def stats(self) -> PrefixCacheStats:
        ssd = self._ssd.stats() if self._ssd is not None else None
        return PrefixCacheStats(
            enabled=self.enabled,
            block_size=self.config.block_size,
            num_lookups=self.num_lookups,
            num_hits=self.num_hits,
            num_misses=self.num_lookups - self.num_hits,
            num_hit_tokens=self.num_hit_tokens,
            num_ssd_hit_tokens=self.num_ssd_hit_tokens,
            ram_blocks=len(self._ram),
            ram_bytes=self._ram.num_bytes,
            ram_evictions=self._ram.num_evictions,
            ssd_blocks=ssd.num_blocks if ssd else 0,
            ssd_bytes=ssd.num_bytes if ssd else 0,
            ssd_evictions=ssd.num_evictions if ssd else 0,
            ssd_writes=ssd.num_writes if ssd else 0,
            ssd_dropped=ssd.num_dropped if ssd else 0,
            ssd_corrupt=ssd.num_corrupt if ssd else 0,
            disabled_reason=self.disabled_reason,
        )

    def _promote(self, key: str, parent: str | None) -> _Block | None:
        """Read a block from SSD into RAM; None when it is not there, bad, or RAM is full."""
        if self._ssd is None or key not in self._ssd:
            return None
        tensors = self._ssd.read(key)
        if tensors is None:
            return None
        try:
            block = _Block(_from_host(tensors["keys"]), _from_host(tensors["values"]))
        except KeyError:
            return None
        evicted = self._ram.add(key, parent, block.keys.nbytes + block.values.nbytes)
        if evicted is None:
            return None
        for victim in evicted:
            del self._blocks[victim]
        self._blocks[key] = block
        return block


def disabled_stats(reason: str, block_size: int = DEFAULT_BLOCK_SIZE) -> PrefixCacheStats:
    """The stats of an engine without a prefix cache."""
    return PrefixCacheStats(False, block_size, *([0] * 14), disabled_reason=reason)


def _to_numpy(array: mx.array) -> np.ndarray:
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)  # numpy has no bfloat16: keep the bits
    return np.array(array)


def _from_host(tensor: HostTensor) -> mx.array:
    array = mx.array(tensor.array)
    return array.view(mx.bfloat16) if tensor.dtype == "BF16" else array
