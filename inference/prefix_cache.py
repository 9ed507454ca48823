"""Shared-prefix KV cache: blocks of KV in RAM (hot) and on SSD, looked up by chained key.

    lookup(owner, ids, keys)  the longest cached start of the token ids, from RAM: the chain of
                           full blocks while found, then the leading tokens the ids share with
                           a cached child of the chain's last block (a full block or a tail);
                           pins them for owner
    ssd_plan / read        blocks on SSD that would extend a hit, queued for the SSD tier's
                           reader thread (read, checked and converted there)
    take_reads             finished reads move into RAM, pinned for the owners that asked
    store(owner, ...)      a block (full, or a tail) the owner computed: copied out of its slot
                           into RAM (pinned); spill() queues it for SSD once its step computed
    release(owner)         the request finished or left: its pins go, its blocks stay cached

A block holds every layer's keys and values of its tokens (block_size, or fewer for a tail) as
two arrays of shape (layers, kv_heads, num_tokens, head_dim); a hit hands the runner the blocks
(the last one cut to the tokens used), which copies them into the request's slot.

Each tier is a kv_blocks.BlockIndex under its own byte budget: LRU, leaves first, pinned blocks
stay. Every block stored in RAM is also written to SSD (write-behind), so a restart finds it;
RAM eviction just drops the RAM copy. A block read from SSD is used only after its file passed
its checks and its token ids hash to its key.

Only models whose every layer caches plain keys and values (mlx-lm's KVCache) are cached: a
rotating window or a recurrent state is not a per-token list that a prefix can be cut from, so
such models run with the cache off (logged once).

Ignores: which tokens a request computes and when it waits for a block (engine_prefix.py), and
threads (all of it runs on the engine thread; the SSD tier has its own reader and writer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from inference.host_tensor import host_tensor
from inference.kv_blocks import DEFAULT_BLOCK_SIZE, BlockIndex, block_keys, chain_key, common_length
from inference.kv_ssd import SSDTier
from inference.kv_ssd_format import HostTensor

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

log = logging.getLogger(__name__)

DEFAULT_RAM_BYTES = 1 << 30  # ~23k tokens of SmolLM2-135M fp32, ~7k of an 8B model in bf16
DEFAULT_SSD_BYTES = 8 << 30


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
    num_hits: int  # ... that found at least one token
    num_misses: int
    num_hit_tokens: int  # tokens found (a request uses all but its last token at most)
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
class CachedBlock:
    """One block's KV and the tokens it holds (block_size of them, fewer for a tail)."""

    keys: mx.array  # (layers, kv_heads, num_tokens, head_dim)
    values: mx.array
    token_ids: tuple[int, ...]

    @property
    def num_bytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


@dataclass(frozen=True)
class PrefixHit:
    """Cached blocks at the start of a prompt (pinned for the request until released)."""

    blocks: tuple[CachedBlock, ...]  # full blocks of the chain, then maybe one used in part
    keys: tuple[str, ...]  # their keys
    num_tokens: int  # tokens they supply
    num_full_blocks: int  # leading blocks used whole, whose keys are the prompt's own

    def kv(self, num_tokens: int) -> tuple[list[mx.array], list[mx.array]]:
        """The blocks covering the first num_tokens tokens, the last one cut to fit."""
        assert 0 < num_tokens <= self.num_tokens
        keys: list[mx.array] = []
        values: list[mx.array] = []
        left = num_tokens
        for block in self.blocks:
            if left == 0:
                break
            n = min(left, len(block.token_ids))
            whole = n == len(block.token_ids)
            keys.append(block.keys if whole else block.keys[:, :, :n])
            values.append(block.values if whole else block.values[:, :, :n])
            left -= n
        return keys, values


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the model's KV cannot be cut into prefix blocks, or None when it can."""
    make_cache = getattr(model, "make_cache", None)
    if make_cache is None:
        return None  # mlx-lm gives such models a KVCache per layer
    kinds = sorted({type(c).__name__ for c in make_cache() if type(c) is not KVCache})
    if kinds:
        return f"{type(model).__module__} caches {', '.join(kinds)}, not per-token keys/values"
    return None


@dataclass
class _Read:
    """A block asked of the SSD reader: where it goes, what it must hold, who waits for it."""

    parent: str | None
    token_ids: tuple[int, ...]
    owners: set[str]


class PrefixCache:
    """RAM and SSD tiers of prefix blocks for one model; see the module docstring."""

    def __init__(
        self,
        config: PrefixCacheConfig,
        fingerprint: str,
        *,
        on_read: Callable[[], None] | None = None,
    ) -> None:
        """on_read: called on the SSD reader thread when reads have finished (wakes the engine)."""
        self.config = config
        self.fingerprint = fingerprint
        self._ram = BlockIndex(config.ram_bytes)
        self._blocks: dict[str, CachedBlock] = {}
        self._parent_of: dict[str, str | None] = {}
        # (parent, first token id) -> keys: the candidates for a partial match, found in O(1).
        self._by_first: dict[tuple[str | None, int], dict[str, None]] = {}
        self._ssd: SSDTier | None = None
        if config.ssd_dir is not None and config.ssd_bytes > 0:
            self._ssd = SSDTier.open(config.ssd_dir, config.ssd_bytes, fingerprint, convert=_to_mx)
            if self._ssd is not None:
                self._ssd.on_read = on_read
        self._reads: dict[str, _Read] = {}  # queued on the reader thread
        self._from_ssd: set[str] = set()  # promoted, not yet counted in a hit
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

    def __contains__(self, key: object) -> bool:
        """The block is in RAM."""
        return key in self._blocks

    # -- lookups -------------------------------------------------------------------------------

    def lookup(self, owner: str, token_ids: Sequence[int], keys: Sequence[str]) -> PrefixHit:
        """The longest cached start of token_ids (keys: its full blocks' keys), from RAM.

        Its blocks are pinned for owner; counters move only in `count`."""
        if not self.enabled:
            return PrefixHit((), (), 0, 0)
        blocks: list[CachedBlock] = []
        used: list[str] = []
        for key in keys:
            block = self._blocks.get(key)
            if block is None:
                break
            blocks.append(block)
            used.append(key)
        num_full = len(blocks)
        num_tokens = num_full * self.config.block_size
        segment = token_ids[num_tokens : num_tokens + self.config.block_size]
        best, shared = self._best_in_ram(used[-1] if used else None, segment)
        if best is not None:
            blocks.append(self._blocks[best])
            used.append(best)
            num_tokens += shared
        for key in used:
            self._ram.pin(owner, key)
        if used:
            self._ram.touch(used)
            if self._ssd is not None:
                self._ssd.touch(used)
        return PrefixHit(tuple(blocks), tuple(used), num_tokens, num_full)

    def count(self, hit: PrefixHit, num_used: int) -> None:
        """Record one request's lookup: num_used of the hit's tokens serve it."""
        self.num_lookups += 1
        if num_used <= 0:
            return
        self.num_hits += 1
        self.num_hit_tokens += num_used
        left = num_used
        for key, block in zip(hit.keys, hit.blocks, strict=True):
            n = min(left, len(block.token_ids))
            if key in self._from_ssd:
                self._from_ssd.discard(key)
                self.num_ssd_hit_tokens += n
            left -= n

    def _best_in_ram(self, parent: str | None, segment: Sequence[int]) -> tuple[str | None, int]:
        """The RAM child of parent sharing the most leading tokens with segment, and how many."""
        if not segment:
            return None, 0
        best, shared = None, 0
        for key in self._by_first.get((parent, segment[0]), ()):
            n = common_length(self._blocks[key].token_ids, segment)
            if n > shared:
                best, shared = key, n
        return best, shared

    # -- the SSD tier --------------------------------------------------------------------------

    def ssd_plan(self, token_ids: Sequence[int], keys: Sequence[str], hit: PrefixHit) -> list[str]:
        """Blocks on SSD that would extend the RAM hit, in chain order: the chain's next full
        blocks, then the SSD block sharing the most leading tokens after them (if it beats RAM)."""
        ssd = self._ssd
        if ssd is None or not self.enabled:
            return []
        size = self.config.block_size
        index = hit.num_full_blocks
        parent = keys[index - 1] if index else None
        plan: list[str] = []
        # RAM is prefix-closed: past the first full block missing from RAM, none is there.
        while index < len(keys) and keys[index] in ssd:
            plan.append(keys[index])
            self._expect(keys[index], parent, tuple(token_ids[index * size : (index + 1) * size]))
            parent = keys[index]
            index += 1
        segment = token_ids[index * size : (index + 1) * size]
        if not segment:
            return plan
        _, in_ram = self._best_in_ram(parent, segment) if not plan else (None, 0)
        best: tuple[str, tuple[int, ...]] | None = None
        shared = in_ram
        for key, ids in ssd.children(parent):
            n = common_length(ids, segment)
            # The index's token ids count only if they hash to the key.
            if n > shared and chain_key(parent, ids, self.fingerprint, size) == key:
                best, shared = (key, ids), n
        if best is not None and best[0] not in self._blocks:
            plan.append(best[0])
            self._expect(best[0], parent, best[1])
        return plan

    def read(self, owner: str, plan: Sequence[str]) -> None:
        """Queue the planned blocks for the reader (those not read already); owner waits."""
        assert self._ssd is not None
        for key in plan:
            if key in self._reads:
                self._reads[key].owners.add(owner)
        self._ssd.request_reads([key for key in plan if key not in self._blocks])

    def is_reading(self, key: str) -> bool:
        return self._ssd is not None and self._ssd.is_reading(key)

    def has_reads(self) -> bool:
        """Reads have finished and wait for take_reads (any thread may ask)."""
        return self._ssd is not None and self._ssd.has_reads()

    def take_reads(self) -> list[str]:
        """Move finished reads into RAM (pinned for their owners); returns the keys finished,
        promoted or not (missing, bad, RAM full, or their parent is gone)."""
        if self._ssd is None:
            return []
        done: list[str] = []
        for result in self._ssd.take_reads():
            done.append(result.key)
            read = self._reads.pop(result.key, None)
            if read is None or result.data is None or result.key in self._blocks:
                continue
            if read.parent is not None and read.parent not in self._blocks:
                continue  # its parent was evicted or failed: it could never be found
            assert isinstance(result.data, _Loaded)
            block = CachedBlock(*result.data.arrays(), read.token_ids)
            if block.keys.shape[2] != len(read.token_ids):
                continue  # not as many tokens as its index row named
            if not self._add_ram(result.key, read.parent, block):
                continue  # RAM is full of blocks running requests use
            self._from_ssd.add(result.key)
            for owner in read.owners:
                self._ram.pin(owner, result.key)
        return done

    def _expect(self, key: str, parent: str | None, token_ids: tuple[int, ...]) -> None:
        if key not in self._reads and key not in self._blocks:
            self._reads[key] = _Read(parent, token_ids, set())

    # -- storing -------------------------------------------------------------------------------

    def store(
        self,
        owner: str,
        key: str,
        parent: str | None,
        keys: Sequence[mx.array],
        values: Sequence[mx.array],
        token_ids: Sequence[int],
    ) -> list[mx.array] | None:
        """Cache a block the owner computed (per layer (kv_heads, num_tokens, head_dim) views).

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
            block = CachedBlock(mx.stack(list(keys)), mx.stack(list(values)), tuple(token_ids))
        except ValueError as exc:  # layers of different shapes
            self.disable(f"layers' KV shapes differ ({exc})")
            return None
        if not self._add_ram(key, parent, block):
            return None  # RAM is full of blocks running requests use
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
            mx.eval(block.keys, block.values)  # computed by now: a no-op that makes sure
            keys, values = host_tensor(block.keys), host_tensor(block.values)
            if keys is None or values is None:
                log.warning("prefix cache: no SSD format for %s KV", block.keys.dtype)
                return
            tensors = {"keys": keys, "values": values}
            self._ssd.write(key, entry.parent, tensors, len(block.token_ids), block.token_ids)

    def release(self, owner: str) -> None:
        """The owner is done: its pins go (its blocks stay cached)."""
        self._ram.release(owner)
        for read in self._reads.values():
            read.owners.discard(owner)

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

    # -- the RAM tier --------------------------------------------------------------------------

    def _add_ram(self, key: str, parent: str | None, block: CachedBlock) -> bool:
        """Put a block in RAM, evicting LRU leaves; False when it does not fit."""
        evicted = self._ram.add(key, parent, block.num_bytes)
        if evicted is None:
            return False
        for victim in evicted:
            gone = self._blocks.pop(victim)
            self._from_ssd.discard(victim)
            siblings = self._by_first[(self._parent_of[victim], gone.token_ids[0])]
            del siblings[victim]
            if not siblings:
                del self._by_first[(self._parent_of[victim], gone.token_ids[0])]
            del self._parent_of[victim]
        self._blocks[key] = block
        self._parent_of[key] = parent
        self._by_first.setdefault((parent, block.token_ids[0]), {})[key] = None
        return True


def disabled_stats(reason: str, block_size: int = DEFAULT_BLOCK_SIZE) -> PrefixCacheStats:
    """The stats of an engine without a prefix cache."""
    return PrefixCacheStats(False, block_size, *([0] * 14), disabled_reason=reason)


@dataclass(frozen=True)
class _Loaded:
    """A block read from SSD, copied into MLX memory; bfloat16 still as its uint16 bits."""

    keys: mx.array
    values: mx.array
    bfloat16: bool

    def arrays(self) -> tuple[mx.array, mx.array]:
        """(keys, values); call on the engine thread (a bfloat16 view is an op on its stream)."""
        if not self.bfloat16:
            return self.keys, self.values
        return self.keys.view(mx.bfloat16), self.values.view(mx.bfloat16)


def _to_mx(tensors: dict[str, HostTensor]) -> _Loaded:
    """On the reader thread: copy a read block's tensors into MLX memory, off the engine's path
    (mx.array copies at once and builds no graph, so no stream of this thread is involved)."""
    keys, values = tensors["keys"], tensors["values"]
    return _Loaded(mx.array(keys.array), mx.array(values.array), keys.dtype == "BF16")
