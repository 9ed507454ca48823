"""HeadPrefixStore: the head's KV and the trunk hiddens over prompts, restored by prompt start."""

from __future__ import annotations

import inference  # noqa: F401  (loads the BLAS before mlx)
from inference.head_prefix_store import HeadPrefixStore

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

HIDDEN = 4


def filled_caches(num_positions: int, seed: int, num_layers: int = 2) -> list[KVCache]:
    """Head caches holding num_positions positions of distinct random keys and values."""
    rng = np.random.default_rng(seed)
    caches = []
    for _ in range(num_layers):
        cache = KVCache()
        shape = (1, 2, num_positions, 3)
        cache.update_and_fetch(
            mx.array(rng.standard_normal(shape).astype(np.float32)),
            mx.array(rng.standard_normal(shape).astype(np.float32)),
        )
        caches.append(cache)
    return caches


def hiddens(num_positions: int, seed: int) -> mx.array:
    rng = np.random.default_rng(100 + seed)
    return mx.array(rng.standard_normal((1, num_positions, HIDDEN)).astype(np.float32))


def test_restore_gives_the_kv_before_the_hit_and_the_hiddens_up_to_it() -> None:
    store = HeadPrefixStore()
    prompt = list(range(10, 20))
    caches, h = filled_caches(11, seed=0), hiddens(11, seed=0)  # read past the prompt
    store.store(prompt, caches, h)
    fresh = [KVCache(), KVCache()]
    restored = store.restore([*prompt[:6], 99, 98], 6, fresh)  # 6 cached tokens, then others
    assert restored is not None
    np.testing.assert_array_equal(np.array(restored), np.array(h[:, :6]))
    for got, stored in zip(fresh, caches, strict=True):
        assert got.offset == 5
        keys, values = got.keys_and_values()
        np.testing.assert_array_equal(np.array(keys), np.array(stored.keys[..., :5, :]))
        np.testing.assert_array_equal(np.array(values), np.array(stored.values[..., :5, :]))


def test_restore_refuses_other_starts_and_used_caches() -> None:
    store = HeadPrefixStore()
    prompt = list(range(10, 20))
    store.store(prompt, filled_caches(9, seed=0), hiddens(10, seed=0))
    fresh = [KVCache(), KVCache()]
    assert store.restore([10, 11, 12, 0, 14], 4, fresh) is None  # differs inside the hit
    assert store.restore([*prompt, 1, 2], 12, fresh) is None  # longer than what was stored
    assert all(c.offset == 0 for c in fresh)
    used = filled_caches(3, seed=1)
    assert store.restore(prompt, 5, used) is None and used[0].offset == 3


def test_writes_to_a_restored_cache_do_not_reach_the_store() -> None:
    store = HeadPrefixStore()
    prompt = list(range(10, 20))
    store.store(prompt, filled_caches(9, seed=0), hiddens(10, seed=0))
    first = [KVCache(), KVCache()]
    store.restore(prompt, 8, first)
    before = np.array(first[0].keys_and_values()[0])
    for cache in first:  # the lane goes on: new positions, then a rollback
        cache.update_and_fetch(mx.ones((1, 2, 4, 3)), mx.ones((1, 2, 4, 3)))
        cache.trim(4)
    second = [KVCache(), KVCache()]
    store.restore(prompt, 8, second)
    np.testing.assert_array_equal(np.array(second[0].keys_and_values()[0]), before)


def test_a_longer_prompt_replaces_the_one_it_extends_and_the_budget_holds() -> None:
    store = HeadPrefixStore()
    short, longer = list(range(10, 16)), list(range(10, 22))
    store.store(short, filled_caches(6, seed=0), hiddens(6, seed=0))
    store.store(longer, filled_caches(12, seed=1), hiddens(12, seed=1))
    assert len(store) == 1  # the longer one serves every start the short one did
    assert store.restore(short, 5, [KVCache(), KVCache()]) is not None
    one_entry = store.num_bytes
    store.max_bytes = 2 * one_entry
    for seed in range(2, 6):
        store.store([seed, *longer[1:]], filled_caches(12, seed), hiddens(12, seed))
    assert len(store) == 2 and store.num_bytes <= store.max_bytes
    assert store.restore(longer, 5, [KVCache(), KVCache()]) is None  # least recent went first


def test_too_short_or_unread_prompts_are_not_stored() -> None:
    store = HeadPrefixStore()
    store.store([5], filled_caches(1, seed=0), hiddens(1, seed=0))  # no pair inside it
    store.store(list(range(10)), filled_caches(4, seed=0), hiddens(10, seed=0))  # head behind
    store.store(list(range(10)), filled_caches(9, seed=0), hiddens(5, seed=0))  # hiddens short
    assert len(store) == 0
