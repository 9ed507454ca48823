"""Prefix affinity: which upstream a prompt goes to, on a consistent-hash ring with bounded load.

    key   = hash(first affinity_tokens prompt ids)      (the whole prompt when it is shorter)
    order = upstreams met walking the ring clockwise from the key, each once
    pick  = the first in order whose in-flight count stays under
            load_factor x mean in-flight + load_slack, else the least loaded

Prompts that share their first N tokens (a RAG prompt's system prompt, instructions and first
passages; a chat's system prompt and first turn) share a key, so they meet the upstream whose
prefix cache already holds those tokens. Each upstream owns `virtual_nodes` points on the ring,
so adding one takes about 1/(n+1) of the keys, from every other upstream evenly, and removing
one (down) moves only its own keys, to the next upstream on the ring. The load bound is
"consistent hashing with bounded loads" (Mirrokni, Thorup, Zadimoghaddam 2018): a hot prefix
spills to its ring successor, so a second upstream warms up for it instead of a random one.

Ignores: health (callers pass the upstreams that may be used), HTTP, what a token is.
"""

from __future__ import annotations

import bisect
import hashlib
from array import array
from collections.abc import Iterable, Mapping, Sequence


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def prefix_key(prompt_ids: Sequence[int], num_tokens: int) -> int:
    """A 64-bit key of the prompt's first num_tokens ids (all of them for a shorter prompt)."""
    head = array("q", prompt_ids[:num_tokens])
    return _hash64(head.tobytes())


class HashRing:
    """Upstream names placed on a 64-bit ring, `virtual_nodes` points each."""

    def __init__(self, names: Iterable[str], virtual_nodes: int = 64) -> None:
        self.virtual_nodes = virtual_nodes
        self._points: list[tuple[int, str]] = []
        self._names: set[str] = set()
        for name in names:
            self.add(name)

    @property
    def names(self) -> list[str]:
        return sorted(self._names)

    def add(self, name: str) -> None:
        if name in self._names:
            raise ValueError(f"{name!r} is on the ring already")
        self._names.add(name)
        for i in range(self.virtual_nodes):
            bisect.insort(self._points, (_hash64(f"{name}#{i}".encode()), name))

    def remove(self, name: str) -> None:
        self._names.discard(name)
        self._points = [p for p in self._points if p[1] != name]

    def order(self, key: int) -> list[str]:
        """Every upstream once, in the order met walking clockwise from key."""
        if not self._points:
            return []
        start = bisect.bisect_left(self._points, (key, ""))
        seen: list[str] = []
        num_names = len(self._names)
        for i in range(len(self._points)):
            name = self._points[(start + i) % len(self._points)][1]
            if name not in seen:
                seen.append(name)
                if len(seen) == num_names:
                    break
        return seen

    def owner(self, key: int) -> str:
        return self.order(key)[0]


def bounded_pick(
    order: Sequence[str], in_flight: Mapping[str, int], load_factor: float, load_slack: int
) -> str:
    """The first of `order` (ring order, usable upstreams only) that is not overloaded.

    Overloaded: taking this request would put it above load_factor x the mean in-flight count
    (this request included) + load_slack.
    """
    assert order, "bounded_pick needs at least one upstream"
    total = sum(in_flight.get(name, 0) for name in order) + 1
    limit = load_factor * total / len(order) + load_slack
    for name in order:
        if in_flight.get(name, 0) + 1 <= limit:
            return name
    return min(order, key=lambda name: in_flight.get(name, 0))
