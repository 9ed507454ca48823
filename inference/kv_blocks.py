"""Prefix-cache bookkeeping without arrays: block keys, and one tier's LRU index with pins.

A prompt is cut into blocks of `block_size` token ids; each full block gets a chained key, so a
key names the block's tokens *and* everything before them:

    prompt ids   [ b0 (64 ids) | b1 (64 ids) | b2 (64 ids) | tail (< 64 ids, no key) ]
    keys         k0 = H(root, fp, b0)   k1 = H(k0, fp, b1)   k2 = H(k1, fp, b2)
                 root = H("prefix-cache", fp), fp = the model's fingerprint (model_fingerprint.py)

Two prompts share the keys of their common full blocks and no others. H is blake2b over
little-endian uint32 ids, so keys are the same in every process and on every machine. A *tail*
(a prompt's or a finished answer's last, partial block) gets its own key, T(parent, fp, ids),
a blake2b with another personalisation, so it never equals a full block's key; it has no children.

Lookups also use a block's first tokens: a prompt that leaves the chain in the middle of block
i may still reuse the leading tokens it shares with a cached child of block i - 1 (a full block
or a tail), so a hit loses no tokens at the point where two prompts part.

A `BlockIndex` is one tier (RAM or SSD): which keys it holds, their sizes under a byte budget,
their parents, pins and recency. It stays prefix-closed (a block's parent is in the same tier),
so a lookup walking a chain from its root never meets a hole:

    - a block enters only after its parent;
    - eviction takes the least recently used *evictable* block: no pins, no children in the tier
      (a leaf), so a chain loses its tail first and never its middle;
    - a pinned block (in use by a running request) is never evicted, nor are its ancestors
      (they have a child).

Recency is a counter, not a clock: `touch` of a chain marks its leaf first and its root last, so
among equally recent chains the tails go first. Eviction pops a heap of (last_used, key) whose
stale entries are skipped, so choosing a victim is O(log n).

Ignores: arrays and files (prefix_cache.py, kv_ssd.py), which tokens a request computes, and
threads (each index belongs to the engine thread).
"""

from __future__ import annotations

import hashlib
import heapq
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# 64 tokens: a RAG prompt's shared part ends where the retrieved chunks differ, and a hit loses
# up to block_size - 1 tokens there; 64 keeps that small while a block of a 135M fp32 model is
# 2.9 MB (9.4 MB for an 8B bf16 one), a good size for one SSD file. Prefill chunks
# (max_num_batched_tokens, 256 by default) are multiples of it, so blocks complete per chunk.
DEFAULT_BLOCK_SIZE = 64
_KEY_BYTES = 16  # 128-bit keys: collisions are out of reach for any cache size


def root_key(fingerprint: str) -> str:
    """The parent key of every prompt's first block for one model."""
    return hashlib.blake2b(
        b"prefix-cache\0" + fingerprint.encode(), digest_size=_KEY_BYTES
    ).hexdigest()


def block_keys(token_ids: Sequence[int], block_size: int, fingerprint: str) -> list[str]:
    """Chained keys of the prompt's full blocks (the tail shorter than block_size has none)."""
    keys: list[str] = []
    extend_keys(keys, token_ids, block_size, fingerprint)
    return keys


def extend_keys(
    keys: list[str], token_ids: Sequence[int], block_size: int, fingerprint: str
) -> None:
    """Append the keys of token_ids' full blocks past the len(keys) already keyed."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    parent = keys[-1] if keys else root_key(fingerprint)
    for start in range(len(keys) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = chain_key(parent, token_ids[start : start + block_size], fingerprint, block_size)
        keys.append(parent)


def chain_key(
    parent: str | None, token_ids: Sequence[int], fingerprint: str, block_size: int
) -> str:
    """The key of the block holding token_ids after parent (None: the root).

    block_size ids: the full block's chained key; fewer: the key of a tail."""
    if not 0 < len(token_ids) <= block_size:
        raise ValueError(f"a block holds 1..{block_size} tokens, got {len(token_ids)}")
    tail = len(token_ids) < block_size
    digest = hashlib.blake2b(digest_size=_KEY_BYTES, person=b"kv-tail" if tail else b"")
    digest.update(bytes.fromhex(parent or root_key(fingerprint)))
    digest.update(fingerprint.encode())
    digest.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return digest.hexdigest()


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids a and b share."""
    n = min(len(a), len(b))
    if tuple(a[:n]) == tuple(b[:n]):  # the common case, at C speed
        return n
    return next(i for i in range(n) if a[i] != b[i])


@dataclass
class BlockEntry:
    """One block in one tier."""

    key: str
    parent: str | None  # None: the first block of its prompt
    num_bytes: int
    last_used: int
    num_children: int = 0  # children in the same tier
    owners: set[str] = field(default_factory=set)  # requests pinning it

    @property
    def evictable(self) -> bool:
        return not self.owners and self.num_children == 0


class BlockIndex:
    """One tier's blocks under a byte budget; see the module docstring."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.num_bytes = 0
        self.num_evictions = 0
        self._entries: dict[str, BlockEntry] = {}
        self._pinned: dict[str, set[str]] = {}  # owner -> keys it pins
        self._children: dict[str | None, dict[str, None]] = {}  # parent (None: root) -> keys
        self._heap: list[tuple[int, str]] = []  # (last_used, key) of evictable blocks, lazily
        self._clock = 0

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> BlockEntry | None:
        return self._entries.get(key)

    def keys(self) -> list[str]:
        return list(self._entries)

    def children(self, parent: str | None) -> list[str]:
        """Keys whose parent is `parent` (None: the first blocks of prompts)."""
        return list(self._children.get(parent, ()))

    # -- adding and removing -----------------------------------------------------------------

    def add(
        self, key: str, parent: str | None, num_bytes: int, *, last_used: int | None = None
    ) -> list[str] | None:
        """Insert a block, evicting LRU leaves to make room; returns the evicted keys in order.

        None (nothing changed) when the block cannot fit: bigger than the budget, or the rest
        is pinned. The parent must be in the index already; last_used restores a saved recency.
        """
        assert key not in self._entries, f"block {key} is already in the index"
        if parent is not None and parent not in self._entries:
            raise KeyError(f"block {key}: parent {parent} is not in the index")
        if num_bytes > self.capacity_bytes:
            return None
        victims = self._victims(num_bytes - (self.capacity_bytes - self.num_bytes), parent)
        if victims is None:
            return None
        for victim in victims:
            self._remove(victim)
        self.num_evictions += len(victims)
        if last_used is None:
            last_used = self._tick()
        else:
            self._clock = max(self._clock, last_used)
        entry = BlockEntry(key, parent, num_bytes, last_used)
        self._entries[key] = entry
        self.num_bytes += num_bytes
        self._children.setdefault(parent, {})[key] = None
        if parent is not None:
            self._entries[parent].num_children += 1
        heapq.heappush(self._heap, (entry.last_used, key))
        return victims

    def evict(self, num_bytes: int) -> list[str]:
        """Free at least num_bytes (or as much as evictable); returns the evicted keys in order."""
        victims = self._victims(num_bytes, None, partial=True) or []
        for victim in victims:
            self._remove(victim)
        self.num_evictions += len(victims)
        return victims

    def remove_subtree(self, key: str) -> list[str]:
        """Drop a block and its descendants regardless of pins (it went bad); leaves first."""
        if key not in self._entries:
            return []
        order: list[str] = []
        stack = [key]
        while stack:  # pre-order; reversed it lists every child before its parent
            current = stack.pop()
            order.append(current)
            stack.extend(self._children.get(current, ()))
        order.reverse()
        for victim in order:
            for owner in self._entries[victim].owners:
                self._pinned[owner].discard(victim)
            self._remove(victim)
        return order

    def _victims(
        self, num_needed: int, keep: str | None, *, partial: bool = False
    ) -> list[str] | None:
        """LRU evictable blocks freeing num_needed bytes, without changing the index.

        A parent whose last child is chosen becomes a candidate at its own recency. `keep` (the
        parent of a block being added) is never chosen. None when num_needed cannot be freed,
        unless partial, which returns what can be.
        """
        if num_needed <= 0:
            return []
        popped: list[tuple[int, str]] = []  # from the heap, pushed back at the end
        freed_parents: list[tuple[int, str]] = []  # parents that became leaves meanwhile
        num_chosen_children: dict[str, int] = {}
        chosen: dict[str, None] = {}  # ordered set
        freed = 0
        while freed < num_needed and (self._heap or freed_parents):
            if freed_parents and (not self._heap or freed_parents[0] < self._heap[0]):
                last_used, key = heapq.heappop(freed_parents)
            else:
                last_used, key = heapq.heappop(self._heap)
                popped.append((last_used, key))
            entry = self._entries.get(key)
            if entry is None or entry.last_used != last_used or key == keep or key in chosen:
                continue  # a stale heap item, or the block must stay
            if entry.owners or entry.num_children > num_chosen_children.get(key, 0):
                continue
            chosen[key] = None
            freed += entry.num_bytes
            if entry.parent is not None:
                parent = self._entries[entry.parent]
                num_chosen_children[parent.key] = num_chosen_children.get(parent.key, 0) + 1
                heapq.heappush(freed_parents, (parent.last_used, parent.key))
        for item in popped:
            heapq.heappush(self._heap, item)  # the chosen ones go stale once removed
        if freed < num_needed and not partial:
            return None
        return list(chosen)

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key)
        assert entry.num_children == 0, f"block {key} still has children"
        self.num_bytes -= entry.num_bytes
        siblings = self._children[entry.parent]
        del siblings[key]
        if not siblings:
            del self._children[entry.parent]
        if entry.parent is not None:
            parent = self._entries[entry.parent]
            parent.num_children -= 1
            if parent.evictable:
                heapq.heappush(self._heap, (parent.last_used, parent.key))
        if len(self._heap) > 4 * len(self._entries) + 64:
            self._compact_heap()

    def _compact_heap(self) -> None:
        """Drop stale heap entries so the heap stays proportional to the index."""
        self._heap = [(e.last_used, k) for k, e in self._entries.items() if e.evictable]
        heapq.heapify(self._heap)

    # -- recency and pins --------------------------------------------------------------------

    def touch(self, chain: Sequence[str]) -> None:
        """Mark a chain (root first) as just used: its leaf is marked first, its root last."""
        for key in reversed(chain):
            entry = self._entries.get(key)
            if entry is None:
                continue
            entry.last_used = self._tick()
            if entry.evictable:
                heapq.heappush(self._heap, (entry.last_used, key))

    def pin(self, owner: str, key: str) -> None:
        """The owner (a request) uses the block: it cannot be evicted until released."""
        entry = self._entries[key]
        entry.owners.add(owner)
        self._pinned.setdefault(owner, set()).add(key)

    def release(self, owner: str) -> None:
        """Drop every pin of the owner (a no-op for an unknown owner)."""
        for key in self._pinned.pop(owner, ()):
            entry = self._entries.get(key)
            if entry is None:
                continue
            entry.owners.discard(owner)
            if entry.evictable:
                heapq.heappush(self._heap, (entry.last_used, key))

    def num_pins(self, key: str) -> int:
        entry = self._entries.get(key)
        return 0 if entry is None else len(entry.owners)

    def recency(self) -> list[tuple[str, int]]:
        """(key, last_used) of every block, for saving recency."""
        return [(key, entry.last_used) for key, entry in self._entries.items()]

    def _tick(self) -> int:
        self._clock += 1
        return self._clock


def prefix_closed(rows: Iterable[tuple[str, str | None]]) -> set[str]:
    """Keys of (key, parent) rows whose whole chain is present: drops orphans and their kin."""
    parents = dict(rows)
    complete: dict[str, bool] = {}
    for key in parents:
        chain: dict[str, None] = {}  # ordered set
        current: str | None = key
        while True:
            if current in complete:
                ok = complete[current]
                break
            if current not in parents or current in chain:  # a missing parent, or a cycle
                ok = False
                break
            chain[current] = None
            current = parents[current]
            if current is None:
                ok = True
                break
        complete.update(dict.fromkeys(chain, ok))
    return {key for key, ok in complete.items() if ok}
