"""The engine's side of the prefix cache: when a request may start, what it loads, what it stores.

    admit       a new request's tokens are looked up (RAM). It waits, outside the scheduler,
                while (1) blocks that extend its hit are read from SSD on the reader thread,
                or (2) another request is computing its next block, or a block (or prompt
                tail) after the same parent that shares more of its leading tokens than the
                cache has; it is looked up again when that block is stored, read, or
                abandoned. Otherwise it starts, and the blocks past its hit (and its prompt's
                tail) count as being computed by it.
    readmit     a preempted request looks up again (RAM only; it keeps its place in the queue)
    restore     its first step loads the found blocks into its slot
    store       after each launch: the full blocks the step completed (prompt or output) and,
                once the prompt is in, the prompt's tail are copied out of the slot into RAM
    finish      before its slot goes: the blocks and the tail of its last tokens (so a chat's
                next turn, which re-sends this answer, finds it), then its pins go

So 8 requests sharing a prefix compute it once: the first computes, the others wait while its
chunks store the blocks (a stored block may still be computing: the step that fills it is in
flight, and MLX orders the reads after it) and start from the cache. Blocks are spilled to SSD
once their step has computed.

Ignores: token budgets and batching (scheduler.py), tensors (prefix_cache.py, runner.py), and
threads: everything here runs on the engine thread; the SSD reader wakes it through the cache's
on_read callback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from inference.engine_requests import RequestState
from inference.kv_blocks import chain_key, common_length, extend_keys
from inference.prefix_cache import PrefixCache
from inference.runner import ModelRunner
from inference.scheduler import ScheduledStep

import mlx.core as mx


@dataclass(frozen=True)
class _Production:
    """A block a running request will store: after which block, holding which tokens."""

    request_id: str
    parent: str | None
    token_ids: tuple[int, ...]


class PrefixSharing:
    """Admission, restore and storing of prefix blocks for one engine; see the module docstring."""

    def __init__(self, cache: PrefixCache, runner: ModelRunner) -> None:
        self.cache = cache
        self._runner = runner
        self._block_size = cache.config.block_size
        self._producing: dict[str, _Production] = {}  # block key -> who computes it
        self._produces: dict[str, list[str]] = {}  # request id -> keys it computes
        # (parent, first token id) -> keys being computed: a waiting request's candidates.
        self._by_first: dict[tuple[str | None, int], dict[str, None]] = {}
        self._waiting_on: dict[str, list[RequestState]] = {}  # block key -> requests parked on it
        self._parked: dict[str, str] = {}  # request id -> the key it waits for
        self._ready: list[RequestState] = []  # parked requests to look up again
        self._unspilled: list[str] = []  # stored at finish; spilled after the next step

    # -- admission -----------------------------------------------------------------------------

    def admit(self, state: RequestState) -> int | None:
        """Tokens the new request may skip, or None: it waits (see take_ready)."""
        cache = self.cache
        if not cache.enabled:
            return 0
        request_id = state.request_id
        if not state.block_keys:
            state.block_keys = cache.keys(state.token_ids)
        hit = cache.lookup(request_id, state.token_ids, state.block_keys)
        # 1. Blocks on SSD that extend the hit: read off the engine thread; wait for the last.
        if not state.ssd_checked:
            state.ssd_checked = True
            plan = cache.ssd_plan(state.token_ids, state.block_keys, hit)
            if plan:
                cache.read(request_id, plan)
                self._park(state, plan[-1])
                return None
        # 2. Its next block is being read, or another request computes more of it than the
        # cache holds: wait for that block.
        index = hit.num_full_blocks
        if index < len(state.block_keys) and cache.is_reading(state.block_keys[index]):
            self._park(state, state.block_keys[index])
            return None
        awaited = self._computed_elsewhere(state, index, hit.num_tokens - index * self._block_size)
        if awaited is not None:
            self._park(state, awaited)
            return None
        # 3. It starts: the blocks past its hit, and its prompt's tail, are its to compute.
        self._register(state, index)
        num_cached = min(hit.num_tokens, len(state.token_ids) - 1)
        cache.count(hit, num_cached)
        state.num_stored_blocks = index
        state.num_cached_tokens = max(num_cached, 0)
        state.restore = hit if num_cached > 0 else None
        state.num_restore_tokens = max(num_cached, 0)
        return state.num_cached_tokens

    def readmit(self, state: RequestState, max_tokens: int) -> int:
        """A preempted request lost its KV: tokens it may skip (RAM only, it does not wait)."""
        self._stop_producing(state.request_id)
        state.restore = None
        state.num_restore_tokens = 0
        if not self.cache.enabled:
            return 0
        extend_keys(state.block_keys, state.token_ids, self._block_size, self.cache.fingerprint)
        hit = self.cache.lookup(state.request_id, state.token_ids, state.block_keys)
        num = min(hit.num_tokens, max_tokens)
        state.num_stored_blocks = min(hit.num_full_blocks, num // self._block_size)
        state.storing = True
        if num > 0:
            state.restore, state.num_restore_tokens = hit, num
        return num

    def has_ready(self) -> bool:
        """Parked requests may be looked up again (the engine thread asks while it waits; the
        SSD reader's results sit in a thread-safe queue)."""
        return bool(self._ready) or self.cache.has_reads()

    def take_ready(self) -> list[RequestState]:
        """Parked requests whose block was stored, read or abandoned: admit them again."""
        for key in self.cache.take_reads():
            self._wake(key)
        ready, self._ready = self._ready, []
        return ready

    def _park(self, state: RequestState, key: str) -> None:
        self._parked[state.request_id] = key
        self._waiting_on.setdefault(key, []).append(state)

    def _wake(self, key: str) -> None:
        for state in self._waiting_on.pop(key, ()):
            if self._parked.pop(state.request_id, None) == key:
                self._ready.append(state)

    def _computed_elsewhere(self, state: RequestState, index: int, num_have: int) -> str | None:
        """A block another request is computing after block index - 1 that shares more than
        num_have leading tokens with the request's block index (its own key, or another's)."""
        size = self._block_size
        segment = state.token_ids[index * size : (index + 1) * size]
        if not segment:
            return None
        parent = state.block_keys[index - 1] if index else None
        best, shared = None, num_have
        for key in self._by_first.get((parent, segment[0]), ()):
            production = self._producing[key]
            if production.request_id == state.request_id:
                continue
            n = common_length(production.token_ids, segment)
            if n > shared:
                best, shared = key, n
        return best

    def _register(self, state: RequestState, index: int) -> None:
        """The request computes its blocks from index on and its prompt's tail."""
        size = self._block_size
        keys = state.block_keys
        blocks = [
            (keys[i], keys[i - 1] if i else None, tuple(state.token_ids[i * size : (i + 1) * size]))
            for i in range(index, len(keys))
        ]
        num_prompt = len(state.request.prompt_ids)
        if num_prompt % size and len(keys) == num_prompt // size:
            parent = keys[-1] if keys else None
            tail = tuple(state.token_ids[len(keys) * size : num_prompt])
            blocks.append((chain_key(parent, tail, self.cache.fingerprint, size), parent, tail))
        produces = self._produces.setdefault(state.request_id, [])
        for key, parent, ids in blocks:
            if key in self._producing or key in self.cache:
                continue
            self._producing[key] = _Production(state.request_id, parent, ids)
            self._by_first.setdefault((parent, ids[0]), {})[key] = None
            produces.append(key)

    def _produced(self, key: str, request_id: str) -> None:
        """The request stored the block, or gave it up: its waiters look again."""
        production = self._producing.get(key)
        if production is None or production.request_id != request_id:
            return
        del self._producing[key]
        first = (production.parent, production.token_ids[0])
        del self._by_first[first][key]
        if not self._by_first[first]:
            del self._by_first[first]
        self._wake(key)

    def _stop_producing(self, request_id: str) -> None:
        """The request will not store its remaining blocks: their waiters look again."""
        for key in self._produces.pop(request_id, ()):
            self._produced(key, request_id)

    # -- slots ---------------------------------------------------------------------------------

    def restore(self, state: RequestState) -> None:
        """The request's first step: its slot starts with the found blocks."""
        assert state.restore is not None
        assert self._runner.cache.slot_of(state.request_id) is None, "restore into a used slot"
        keys, values = state.restore.kv(state.num_restore_tokens)
        self._runner.restore(state.request_id, keys, values, len(state.token_ids))
        state.restore = None

    def store(
        self, step: ScheduledStep, states: Sequence[RequestState]
    ) -> tuple[list[str], list[mx.array]]:
        """After a launch: cache the blocks the step completed; returns their keys and arrays."""
        stored_keys: list[str] = []
        arrays: list[mx.array] = []
        if not self.cache.enabled:
            return stored_keys, arrays
        for item, state in zip(step.items, states, strict=True):
            end = item.start_position + item.num_tokens
            self._store_blocks(state, end, stored_keys, arrays)
            prompt_len = len(state.request.prompt_ids)
            if not state.prompt_tail_stored and end >= prompt_len:
                state.prompt_tail_stored = True
                self._store_tail(state, prompt_len, stored_keys, arrays)
        return stored_keys, arrays

    def finish(self, state: RequestState) -> None:
        """Before the request's slot goes: cache its last blocks and tail, drop its pins."""
        request_id = state.request_id
        self._stop_producing(request_id)
        self._unpark(request_id)
        if self.cache.enabled and self._runner.cache.slot_of(request_id) is not None:
            # KV exists for every token fed so far (the last sampled token was never fed).
            num_fed = min(self._runner.cache.length(request_id), len(state.token_ids))
            keys: list[str] = []
            arrays: list[mx.array] = []
            self._store_blocks(state, num_fed, keys, arrays)
            self._store_tail(state, num_fed, keys, arrays)
            if arrays:
                mx.async_eval(arrays)
                self._unspilled.extend(keys)
        self.cache.release(request_id)

    def drop(self, request_id: str) -> None:
        """A request that never started (cancelled while parked) leaves."""
        self._stop_producing(request_id)
        self._unpark(request_id)
        self.cache.release(request_id)

    def spill(self, keys: Sequence[str]) -> None:
        """A step has computed: queue its blocks, and those stored at earlier finishes, for SSD."""
        pending, self._unspilled = self._unspilled, []
        self.cache.spill([*pending, *keys])

    def spill_finished(self) -> None:
        """Going idle: compute and spill the blocks stored at the last finishes."""
        if self._unspilled:
            self.spill([])

    def _unpark(self, request_id: str) -> None:
        key = self._parked.pop(request_id, None)
        if key is not None:
            waiters = self._waiting_on.get(key, [])
            self._waiting_on[key] = [s for s in waiters if s.request_id != request_id]
            if not self._waiting_on[key]:
                del self._waiting_on[key]

    def _store_blocks(
        self, state: RequestState, end: int, stored_keys: list[str], arrays: list[mx.array]
    ) -> None:
        """Cache the full blocks of tokens [0, end) in the slot that are not cached yet."""
        size = self._block_size
        extend_keys(state.block_keys, state.token_ids, size, self.cache.fingerprint)
        num_complete = min(end // size, len(state.block_keys))
        while state.storing and state.num_stored_blocks < num_complete:
            index = state.num_stored_blocks
            start = index * size
            key = state.block_keys[index]
            parent = state.block_keys[index - 1] if index else None
            if not self._store_one(state, key, parent, start, start + size, stored_keys, arrays):
                return
            state.num_stored_blocks += 1

    def _store_tail(
        self, state: RequestState, end: int, stored_keys: list[str], arrays: list[mx.array]
    ) -> None:
        """Cache tokens [full blocks, end) as a tail, when every full block before is cached."""
        size = self._block_size
        start = (end // size) * size
        if not state.storing or start == end or state.num_stored_blocks != end // size:
            return
        index = end // size
        parent = state.block_keys[index - 1] if index else None
        ids = state.token_ids[start:end]
        key = chain_key(parent, ids, self.cache.fingerprint, size)
        self._store_one(state, key, parent, start, end, stored_keys, arrays)

    def _store_one(
        self,
        state: RequestState,
        key: str,
        parent: str | None,
        start: int,
        end: int,
        stored_keys: list[str],
        arrays: list[mx.array],
    ) -> bool:
        keys, values = self._runner.cache.read(state.request_id, start, end)
        new = self.cache.store(
            state.request_id, key, parent, keys, values, state.token_ids[start:end]
        )
        if new is None:
            state.storing = False
            self._stop_producing(state.request_id)
            return False
        if new:
            stored_keys.append(key)
            arrays.extend(new)
        self._produced(key, state.request_id)
        return True
