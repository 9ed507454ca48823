"""The prefix-affinity ring: stable when upstreams come and go, even spread, bounded load."""

from __future__ import annotations

import random

import pytest

from rag.upstreams.ring import HashRing, bounded_pick, prefix_key

NUM_KEYS = 20_000


@pytest.fixture(scope="module")
def keys() -> list[int]:
    rng = random.Random(0)
    return [rng.getrandbits(64) for _ in range(NUM_KEYS)]


def owners(ring: HashRing, keys: list[int]) -> list[str]:
    return [ring.owner(k) for k in keys]


def test_adding_an_upstream_moves_only_its_share_and_only_to_it(keys: list[int]) -> None:
    names = [f"10.0.0.{i}:8000" for i in range(4)]
    ring = HashRing(names, virtual_nodes=64)
    before = owners(ring, keys)
    ring.add("10.0.0.9:8000")
    after = owners(ring, keys)
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert all(a == "10.0.0.9:8000" for _, a in moved)  # nothing shuffles between old ones
    assert 0.12 < len(moved) / NUM_KEYS < 0.28  # about 1/5 of the keys
    # ... taken from every old upstream, not from one neighbour.
    assert {b for b, _ in moved} == set(names)


def test_removing_an_upstream_moves_only_its_keys(keys: list[int]) -> None:
    ring = HashRing([f"u{i}" for i in range(5)])
    before = owners(ring, keys)
    ring.remove("u2")
    after = owners(ring, keys)
    for b, a in zip(before, after, strict=True):
        assert a == b or b == "u2"
    assert "u2" not in after


def test_keys_spread_evenly(keys: list[int]) -> None:
    ring = HashRing([f"u{i}" for i in range(4)], virtual_nodes=64)
    counts = {name: 0 for name in ring.names}
    for owner in owners(ring, keys):
        counts[owner] += 1
    shares = [c / NUM_KEYS for c in counts.values()]
    assert min(shares) > 0.15 and max(shares) < 0.35, counts


def test_order_lists_every_upstream_once_owner_first() -> None:
    ring = HashRing(["a", "b", "c"])
    for key in (0, 1 << 63, (1 << 64) - 1, 12345):
        order = ring.order(key)
        assert sorted(order) == ["a", "b", "c"]
        assert order[0] == ring.owner(key)
    with pytest.raises(ValueError, match="already"):
        ring.add("a")
    assert HashRing([]).order(5) == []


def test_prefix_key_reads_only_the_first_tokens() -> None:
    shared = list(range(300))
    assert prefix_key([*shared, 1, 2], 256) == prefix_key([*shared, 9, 9, 9], 256)
    assert prefix_key([*shared], 256) != prefix_key([7, *shared[1:]], 256)
    # A prompt shorter than the window is keyed by all of it.
    assert prefix_key([1, 2, 3], 256) != prefix_key([1, 2, 3, 4], 256)


def test_bounded_load_keeps_the_target_until_it_is_far_above_the_mean() -> None:
    order = ["a", "b"]
    assert bounded_pick(order, {"a": 0, "b": 0}, 1.25, 2) == "a"
    # 4 + this one = 5 <= 1.25 x (5 / 2) + 2 = 5.125: stays.
    assert bounded_pick(order, {"a": 4, "b": 0}, 1.25, 2) == "a"
    # 6 > 1.25 x 3 + 2 = 5.75: spills to the next on the ring.
    assert bounded_pick(order, {"a": 5, "b": 0}, 1.25, 2) == "b"
    # Everyone busy alike: the ring's choice still holds.
    assert bounded_pick(order, {"a": 9, "b": 9}, 1.25, 2) == "a"
    # Spill goes in ring order, not to the least loaded.
    assert bounded_pick(["a", "b", "c"], {"a": 12, "b": 2, "c": 0}, 1.25, 2) == "b"


def test_bounded_load_without_slack_falls_back_to_the_least_loaded() -> None:
    assert bounded_pick(["a"], {"a": 50}, 1.0, 0) == "a"
    assert bounded_pick(["a", "b", "c"], {"a": 3, "b": 3, "c": 1}, 1.0, 0) == "c"
    # Equal loads and no slack: nobody is under the bound, so the least loaded (first) wins.
    assert bounded_pick(["b", "a"], {"a": 2, "b": 2}, 1.0, 0) == "b"
