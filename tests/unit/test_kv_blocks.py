"""Prefix-cache bookkeeping without arrays: chained keys, pins and the exact eviction order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from inference.kv_blocks import (
    BlockIndex,
    block_keys,
    chain_key,
    common_length,
    extend_keys,
    prefix_closed,
    root_key,
)

import pytest

REPO = Path(__file__).resolve().parents[2]
FP = "model-a"


def ids(n: int, offset: int = 0) -> list[int]:
    return [(offset + 7 * i) % 50_000 for i in range(n)]


def test_keys_are_chained_and_cover_full_blocks_only() -> None:
    a = block_keys(ids(4 * 16 + 5), 16, FP)
    assert len(a) == 4 and len(set(a)) == 4  # the 5-token tail has no key
    b = ids(4 * 16)
    b[40] += 1  # differs in block 2
    kb = block_keys(b, 16, FP)
    assert kb[:2] == a[:2] and kb[2] != a[2] and kb[3] != a[3]  # ... and so does block 3
    # A block's key depends on its parents, not only its tokens.
    shifted = block_keys(ids(16) + ids(16), 16, FP)
    assert shifted[1] != shifted[0]
    assert block_keys(ids(15), 16, FP) == []
    assert block_keys(ids(64), 16, "model-b")[0] != a[0]  # another model: other keys
    assert root_key(FP) != root_key("model-b")


def test_keys_are_the_same_in_another_process() -> None:
    script = (
        "import sys, json; sys.path.insert(0, sys.argv[1]);"
        "from inference.kv_blocks import block_keys;"
        "print(json.dumps(block_keys([(7 * i) % 50000 for i in range(100)], 32, 'model-a')))"
    )
    # PYTHONHASHSEED differs per process by default: keys must not depend on hash().
    out = subprocess.run(
        [sys.executable, "-c", script, str(REPO)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str(block_keys(ids(100), 32, FP)).replace("'", '"')


def chain(index: BlockIndex, names: str, parent: str | None = None) -> None:
    for name in names:
        assert index.add(name, parent, 1) == []
        parent = name


def test_lru_evicts_leaves_before_their_ancestors() -> None:
    index = BlockIndex(capacity_bytes=6)
    chain(index, "abc")  # a <- b <- c
    chain(index, "de", parent="a")  # a <- d <- e
    index.add("x", None, 1)
    # Oldest first is a, but a and b have children: the LRU *leaf* is c, then b (now a leaf).
    assert index.add("y", None, 2) == ["c", "b"]
    assert index.add("z", None, 1) == ["e"]
    assert index.add("w", None, 2) == ["d", "a"]  # a goes only after both its chains
    assert sorted(index.keys()) == ["w", "x", "y", "z"]
    assert index.num_evictions == 5 and index.num_bytes == 6


def test_touch_makes_a_chain_recent_tail_first() -> None:
    index = BlockIndex(capacity_bytes=5)
    chain(index, "abc")
    chain(index, "pq")
    index.touch(["a", "b", "c"])  # now p, q are older than the whole chain a-b-c
    assert index.add("x", None, 1) == ["q"]
    assert index.add("y", None, 1) == ["p"]
    # The touched chain: its tail goes first (touch marked c before b before a), all older
    # than x and y.
    assert index.add("z", None, 3) == ["c", "b", "a"]


def test_pinned_blocks_and_their_ancestors_stay() -> None:
    index = BlockIndex(capacity_bytes=4)
    chain(index, "abc")
    for key in "abc":
        index.pin("req1", key)
    index.pin("req2", "a")  # a second request shares the prefix
    index.add("x", None, 1)
    assert index.add("y", None, 1) == ["x"]
    assert index.add("big", None, 2) is None  # only pinned blocks are left to evict
    assert sorted(index.keys()) == ["a", "b", "c", "y"] and index.num_bytes == 4
    index.release("req1")
    assert index.num_pins("a") == 1 and index.num_pins("c") == 0
    assert index.add("big", None, 3) == ["c", "b", "y"]  # a is still pinned by req2
    index.release("req2")
    assert index.evict(1) == ["a"]


def test_add_refuses_a_block_bigger_than_the_budget_or_without_its_parent() -> None:
    index = BlockIndex(capacity_bytes=4)
    assert index.add("huge", None, 5) is None
    with pytest.raises(KeyError, match="parent"):
        index.add("orphan", "nowhere", 1)
    chain(index, "ab")
    # Adding c under b must not evict b itself, even though it is the LRU leaf.
    index.add("x", None, 2)
    assert index.add("c", "b", 1) == ["x"]


def test_remove_subtree_drops_descendants_leaves_first() -> None:
    index = BlockIndex(capacity_bytes=10)
    chain(index, "abc")
    chain(index, "d", parent="a")
    index.pin("r", "c")
    assert index.remove_subtree("b") == ["c", "b"]
    assert sorted(index.keys()) == ["a", "d"] and index.num_bytes == 2
    index.release("r")  # the pin went with the block
    assert index.remove_subtree("missing") == []


def test_saved_recency_is_restored() -> None:
    index = BlockIndex(capacity_bytes=2)
    index.add("old", None, 1, last_used=10)
    index.add("new", None, 1, last_used=20)
    assert index.add("next", None, 1) == ["old"]
    assert index.get("next").last_used == 21  # type: ignore[union-attr]


def test_prefix_closed_drops_orphans_and_their_descendants() -> None:
    rows = [("a", None), ("b", "a"), ("c", "b"), ("x", "gone"), ("y", "x"), ("z", None)]
    assert prefix_closed(rows) == {"a", "b", "c", "z"}
    assert prefix_closed([("p", "q"), ("q", "p")]) == set()  # a cycle in a damaged index


def test_tail_keys_differ_from_full_keys_and_extend_keys_continues_a_chain() -> None:
    full = block_keys(ids(40), 16, FP)
    assert chain_key(None, ids(16), FP, 16) == full[0]
    assert chain_key(full[0], ids(16)[:5], FP, 16) != chain_key(full[0], ids(16)[:6], FP, 16)
    # A tail never takes the key of the full block it starts.
    assert chain_key(full[0], ids(32)[16:31], FP, 16) not in full
    with pytest.raises(ValueError, match=r"1\.\.16"):
        chain_key(None, [], FP, 16)
    keys = block_keys(ids(20), 16, FP)
    extend_keys(keys, ids(40), 16, FP)  # the answer grew the sequence by two blocks
    assert keys == full


def test_common_length_and_children() -> None:
    assert common_length([1, 2, 3], (1, 2, 4, 5)) == 2
    assert common_length((1, 2), [1, 2, 3]) == 2
    assert common_length([], [1]) == 0
    index = BlockIndex(capacity_bytes=10)
    chain(index, "ab")
    chain(index, "c", parent="a")
    index.add("r", None, 1)
    assert sorted(index.children("a")) == ["b", "c"] and sorted(index.children(None)) == ["a", "r"]
    index.evict(1)  # b: the LRU leaf
    assert index.children("a") == ["c"]
    index.remove_subtree("a")
    assert index.children("a") == [] and index.children(None) == ["r"]
