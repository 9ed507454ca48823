"""Slot KV cache: each running request owns one row ("slot") of one batched K/V array per layer.

    keys[layer], values[layer]: (num_rows, num_kv_heads, capacity, head_dim)
    slot s holds its request's tokens at [0, length(s)); whatever lies past that is garbage

Left-aligned rows with a length per slot, rather than mlx-lm's left-padded BatchKVCache (one write
index shared by all rows): a row is trimmed (rejected speculative tokens), loaded (a cached prefix)
or read (blocks for a prefix cache) on its own, and requests join and leave without re-padding or
copying the others. Occupied slots stay dense at the bottom (a leaving request's slot takes the top
one), so a batched pass usually reads a contiguous row range as a view, not a gathered copy.

A forward pass writes each row's new keys at [offset, offset + num_tokens) and attends to
[0, num_attended). Rows shorter than the pass are right-padded: their pad tokens land past the
row's length, where nothing reads them, so padding never corrupts a row.

`PassView` is what the mlx-lm model sees as its per-layer `cache`: the public protocol its
attention uses (`offset`, `update_and_fetch`, `make_mask`, `state`).

Memory is rows x the longest row, as with mlx-lm's batch caches (arrays grow on demand and are
dropped when the last request leaves); a block-structured cache would pay only for what each
row holds. Growing copies every row, so a new request announces its prompt's length (`expect`)
and the arrays grow to it at once, and a lone request loading a cached prefix gets arrays built
straight from the blocks (one copy, no zero-filled rows for requests that are not there).

Ignores: which requests run and how many tokens each (scheduler, runner), token ids, sampling,
and memory limits (the scheduler's KVCapacity counts tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import mlx.core as mx

TOKEN_STEP = 256  # capacity grows in multiples of this many tokens, as mlx-lm's KVCache does


@dataclass(frozen=True)
class PassRows:
    """The rows of one forward pass: row r is slot slots[r], with offsets[r] tokens cached."""

    slots: tuple[int, ...]
    offsets: tuple[int, ...]
    num_tokens: int  # new tokens per row (L); shorter rows are right-padded to it

    @cached_property
    def num_attended(self) -> int:
        """Keys the pass attends to (T): the longest row after the pass."""
        return max(self.offsets) + self.num_tokens

    @cached_property
    def max_slot(self) -> int:
        return max(self.slots)

    @cached_property
    def is_contiguous(self) -> bool:
        """Rows are slots first .. first + n - 1: the pass reads a view, not a gathered copy."""
        first = self.slots[0]
        return self.slots == tuple(range(first, first + len(self.slots)))


class SlotKVCache:
    """The K/V of every running request, one slot each; see the module docstring."""

    def __init__(self, num_layers: int, num_slots: int) -> None:
        if num_layers < 1 or num_slots < 1:
            raise ValueError(f"want num_layers, num_slots >= 1, got {num_layers}, {num_slots}")
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.keys: list[mx.array | None] = [None] * num_layers
        self.values: list[mx.array | None] = [None] * num_layers
        self._slot_of: dict[str, int] = {}
        self._lengths = [0] * num_slots
        self._expected_tokens = 0  # the longest row announced: growth goes at least this far

    # -- slots ------------------------------------------------------------------------------

    def allocate(self, request_id: str) -> int | None:
        """Give the request the lowest free slot; None when all are taken."""
        if request_id in self._slot_of:
            raise ValueError(
                f"request {request_id!r} already holds slot {self._slot_of[request_id]}"
            )
        if len(self._slot_of) == self.num_slots:
            return None
        slot = len(self._slot_of)  # occupied slots are always 0 .. n-1
        self._slot_of[request_id] = slot
        self._lengths[slot] = 0
        return slot

    def release(self, request_id: str) -> None:
        """Free the request's slot (no-op for an unknown id); the top slot moves into the hole."""
        slot = self._slot_of.pop(request_id, None)
        if slot is None:
            return
        top = len(self._slot_of)  # the highest occupied slot before the release
        if slot != top:
            moved_id = next(rid for rid, s in self._slot_of.items() if s == top)
            self._move(top, slot)
            self._slot_of[moved_id] = slot
        self._lengths[top] = 0
        if not self._slot_of:  # idle: give the memory back
            self.keys = [None] * self.num_layers
            self.values = [None] * self.num_layers
            self._expected_tokens = 0

    def expect(self, num_tokens: int) -> None:
        """A row will soon hold num_tokens tokens: the next growth makes room for them at once."""
        self._expected_tokens = max(self._expected_tokens, num_tokens)

    def _move(self, src: int, dst: int) -> None:
        """Copy slot src's tokens into slot dst."""
        length = self._lengths[src]
        self._lengths[dst] = length
        if length == 0 or self.keys[0] is None:
            return
        # Copy the source rows out first: a slice still viewing the array would stop the
        # update below from happening in place.
        rows = [
            mx.contiguous(arrays[layer][src : src + 1, :, :length])  # type: ignore[index]
            for arrays in (self.keys, self.values)
            for layer in range(self.num_layers)
        ]
        mx.eval(rows)
        for i, arrays in enumerate((self.keys, self.values)):
            for layer in range(self.num_layers):
                array = arrays[layer]
                assert array is not None
                array[dst : dst + 1, :, :length] = rows[i * self.num_layers + layer]
                arrays[layer] = array

    def slot_of(self, request_id: str) -> int | None:
        return self._slot_of.get(request_id)

    def length(self, request_id: str) -> int:
        """Tokens of the request in the cache (0 for a request without a slot)."""
        slot = self._slot_of.get(request_id)
        return 0 if slot is None else self._lengths[slot]

    @property
    def num_used_slots(self) -> int:
        return len(self._slot_of)

    # -- seams: speculative rollback, prefix cache --------------------------------------------

    def trim(self, request_id: str, num_tokens: int) -> int:
        """Drop the request's last num_tokens tokens (rejected drafts); returns how many went."""
        slot = self._slot_of[request_id]
        num_trimmed = min(num_tokens, self._lengths[slot])
        self._lengths[slot] -= num_trimmed
        return num_trimmed

    def load(self, request_id: str, keys: Sequence[mx.array], values: Sequence[mx.array]) -> None:
        """Append tokens to the request's slot: per layer (num_kv_heads, n, head_dim) arrays."""
        assert len(keys) == len(values) == self.num_layers
        self.load_blocks(request_id, [mx.stack(list(keys))], [mx.stack(list(values))])

    def load_blocks(
        self, request_id: str, keys: Sequence[mx.array], values: Sequence[mx.array]
    ) -> None:
        """Append blocks to the request's slot, in token order: (layers, kv_heads, n_i, head_dim)."""
        assert len(keys) == len(values) > 0 and keys[0].shape[0] == self.num_layers
        slot = self._slot_of[request_id]
        start = self._lengths[slot]
        num_tokens = sum(block.shape[2] for block in keys)
        end = start + num_tokens
        capacity = _round_up(max(end, self._expected_tokens))
        # The only request and no arrays yet: build its row from the blocks, one copy in all.
        fresh = self.keys[0] is None and start == 0 and len(self._slot_of) == 1
        for arrays, blocks in ((self.keys, keys), (self.values, values)):
            for layer in range(self.num_layers):
                parts = [block[layer] for block in blocks]  # (kv_heads, n_i, head_dim) views
                if fresh:
                    heads, _, dim = parts[0].shape
                    if capacity > end:
                        parts.append(mx.zeros((heads, capacity - end, dim), parts[0].dtype))
                    arrays[layer] = mx.concatenate(parts, axis=1)[None]
                    continue
                joined = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)
                self._grow_layer(arrays, layer, slot + 1, end, joined)
                array = arrays[layer]
                assert array is not None
                array[slot : slot + 1, :, start:end] = joined[None]
                arrays[layer] = array
        self._lengths[slot] = end

    def read(self, request_id: str, start: int, end: int) -> tuple[list[mx.array], list[mx.array]]:
        """The request's tokens [start, end) per layer, as lazy (num_kv_heads, n, head_dim) views."""
        slot = self._slot_of[request_id]
        if not 0 <= start <= end <= self._lengths[slot]:
            raise ValueError(f"want 0 <= {start} <= {end} <= {self._lengths[slot]} (cached)")
        keys = [k[slot, :, start:end] for k in self.keys if k is not None]
        values = [v[slot, :, start:end] for v in self.values if v is not None]
        return keys, values

    # -- forward passes ---------------------------------------------------------------------

    def views(self, rows: PassRows) -> list[PassView]:
        """One mlx-lm cache object per layer for a forward pass over rows."""
        shared = _PassArrays.make(rows)
        return [PassView(self, layer, rows, shared) for layer in range(self.num_layers)]

    def commit(self, rows: PassRows, num_tokens: Sequence[int]) -> None:
        """After a pass: row r's slot now holds num_tokens[r] more tokens (not its padding)."""
        for slot, count in zip(rows.slots, num_tokens, strict=True):
            self._lengths[slot] += count

    def write(
        self,
        layer: int,
        rows: PassRows,
        keys: mx.array,
        values: mx.array,
        shared: _PassArrays | None = None,
    ) -> None:
        """Store (rows, heads, L, dim) keys and values at each row's offset."""
        self._reserve(layer, rows, keys, values)
        for arrays, new in ((self.keys, keys), (self.values, values)):
            array = arrays[layer]
            assert array is not None
            if len(rows.slots) == 1:
                slot, offset = rows.slots[0], rows.offsets[0]
                array[slot : slot + 1, :, offset : offset + rows.num_tokens] = new
            else:
                shared = shared or _PassArrays.make(rows)
                # One scatter of whole head_dim rows into a flat view: no transposed copy of
                # the update and no broadcast indices per layer (on CUDA the 4-D scatter cost
                # 2.5 ms a step over 36 layers).
                flat_idx = shared.flat_index(array.shape)
                shape = array.shape
                flat = array.reshape(-1, shape[-1])
                flat[flat_idx] = new.reshape(-1, shape[-1])
                array = flat.reshape(shape)
            arrays[layer] = array

    def fetch(
        self, layer: int, rows: PassRows, shared: _PassArrays | None = None
    ) -> tuple[mx.array, mx.array]:
        """(rows, heads, T, dim) keys and values the pass attends to: a view when rows are dense."""
        num_attended = rows.num_attended
        out = []
        for arrays in (self.keys, self.values):
            array = arrays[layer]
            assert array is not None
            if rows.is_contiguous:
                first = rows.slots[0]
                out.append(array[first : first + len(rows.slots), :, :num_attended])
            else:
                slot_idx = (shared or _PassArrays.make(rows)).slot_idx
                assert slot_idx is not None
                out.append(mx.take(array[:, :, :num_attended], slot_idx[:, 0], axis=0))
        return out[0], out[1]

    def _reserve(self, layer: int, rows: PassRows, keys: mx.array, values: mx.array) -> None:
        """Grow the layer's arrays to hold the pass: rows up to its top slot, tokens to its end."""
        num_rows = rows.max_slot + 1
        # Every row of the pass writes L tokens, padding included.
        num_tokens = rows.num_attended
        array = self.keys[layer]
        if array is not None and num_rows <= array.shape[0] and num_tokens <= array.shape[2]:
            return  # the common case, once per layer and step: nothing to grow
        self._grow_layer(self.keys, layer, num_rows, num_tokens, keys[0])
        self._grow_layer(self.values, layer, num_rows, num_tokens, values[0])

    def _grow_layer(
        self,
        arrays: list[mx.array | None],
        layer: int,
        num_rows: int,
        num_tokens: int,
        like: mx.array,
    ) -> None:
        """Make arrays[layer] hold num_rows rows of num_tokens; like: a (heads, n, dim) sample."""
        array = arrays[layer]
        if array is not None and num_rows <= array.shape[0] and num_tokens <= array.shape[2]:
            return
        num_tokens = max(num_tokens, self._expected_tokens)
        heads, dim = like.shape[-3], like.shape[-1]
        if array is None:
            shape = (_grow(0, num_rows, self.num_slots), heads, _round_up(num_tokens), dim)
            arrays[layer] = mx.zeros(shape, like.dtype)
            return
        have_rows, _, have_tokens, _ = array.shape
        if num_rows > have_rows:
            more = _grow(have_rows, num_rows, self.num_slots) - have_rows
            array = mx.concatenate([array, mx.zeros((more, heads, have_tokens, dim), array.dtype)])
            have_rows += more
        if num_tokens > have_tokens:
            more = _round_up(num_tokens) - have_tokens
            zeros = mx.zeros((have_rows, heads, more, dim), array.dtype)
            array = mx.concatenate([array, zeros], axis=2)
        arrays[layer] = array

    def arrays(self) -> list[mx.array]:
        """Every K/V array, to evaluate after a step."""
        return [a for a in (*self.keys, *self.values) if a is not None]


def _grow(have: int, need: int, limit: int) -> int:
    """Row capacity: at least double, so joining requests rarely copy the arrays."""
    return min(limit, max(need, 2 * have))


def _round_up(num_tokens: int) -> int:
    """Token capacity: a multiple of TOKEN_STEP."""
    return -(-num_tokens // TOKEN_STEP) * TOKEN_STEP


@dataclass(frozen=True)
class _PassArrays:
    """Index, offset and mask arrays of one pass, built once and shared by all layers."""

    offset: int | mx.array  # RoPE offset of each row's first new token
    mask: str | mx.array | None  # None: one query; "causal": one row; else (rows, 1, L, T) bool
    slot_idx: mx.array | None  # (rows, 1): the slot per row (a gathered fetch)
    position_idx: mx.array | None  # (rows, L): the positions each row writes
    _flat: dict[tuple[int, ...], mx.array] = field(default_factory=dict)

    def flat_index(self, shape: tuple[int, ...]) -> mx.array:
        """(rows * heads * L,) indices of the written (slot, head, position) rows in a
        (slots * heads * capacity, head_dim) view of a K/V array of this shape."""
        index = self._flat.get(shape)
        if index is None:
            assert self.slot_idx is not None and self.position_idx is not None
            _, heads, capacity, _ = shape
            head_base = (self.slot_idx * heads + mx.arange(heads)[None]) * capacity  # (rows, H)
            index = (head_base[:, :, None] + self.position_idx[:, None, :]).flatten()
            self._flat[shape] = index
        return index

    @staticmethod
    def make(rows: PassRows) -> _PassArrays:
        num_tokens = rows.num_tokens
        if len(rows.slots) == 1:
            # One row: the plain KVCache path (int offset, bottom-right-aligned causal mask).
            return _PassArrays(rows.offsets[0], "causal" if num_tokens > 1 else None, None, None)
        offsets = mx.array(rows.offsets)
        queries = offsets[:, None] + mx.arange(num_tokens)[None]  # (rows, L) absolute positions
        keys = mx.arange(rows.num_attended)
        mask = (keys[None, None, :] <= queries[:, :, None])[:, None]  # (rows, 1, L, T)
        slot_idx = mx.array(rows.slots)[:, None]
        return _PassArrays(offsets, mask, slot_idx, queries)


class PassView:
    """One layer's cache during one pass, in the protocol mlx-lm's attention layers call."""

    def __init__(self, cache: SlotKVCache, layer: int, rows: PassRows, shared: _PassArrays):
        self._cache = cache
        self._layer = layer
        self._rows = rows
        self._shared = shared

    @property
    def offset(self) -> int | mx.array:
        return self._shared.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self._cache.write(self._layer, self._rows, keys, values, self._shared)
        return self._cache.fetch(self._layer, self._rows, self._shared)

    def make_mask(
        self, num_queries: int, return_array: bool = False, window_size: int | None = None
    ) -> str | mx.array | None:
        assert num_queries == self._rows.num_tokens
        if window_size is not None:
            raise ValueError("sliding-window attention is not supported by the slot KV cache")
        mask = self._shared.mask
        if return_array and isinstance(mask, str):
            offset = self._rows.offsets[0]
            queries = offset + mx.arange(num_queries)
            return mx.arange(offset + num_queries)[None] <= queries[:, None]
        return mask

    @property
    def state(self) -> list[mx.array]:
        return [
            a
            for a in (self._cache.keys[self._layer], self._cache.values[self._layer])
            if a is not None
        ]

    def is_trimmable(self) -> bool:
        return False  # trimming goes through SlotKVCache.trim, per request
