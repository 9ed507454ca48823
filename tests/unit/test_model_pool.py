"""Model pool bookkeeping on fake backends and a fake clock: LRU order, pins, busy models, TTLs."""

from __future__ import annotations

import threading
from pathlib import Path

from inference.engine import Engine
from inference.engine_types import EngineLoad
from inference.model_pool import (
    HANDOUT_GRACE_S,
    ModelPool,
    ModelSpec,
    PoolConfig,
    PoolFullError,
    default_memory_limit,
    weights_bytes,
)

import pytest

GiB = 1024**3


class FakeBackend:
    def __init__(self, name: str) -> None:
        self.model_name = name
        self.busy = 0
        self.closed = False

    def load(self) -> EngineLoad:
        return EngineLoad(num_waiting=0, num_running=self.busy)

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Catalog:
    """Resolves names to fake specs and records every load."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes
        self.loaded: list[str] = []
        self.backends: dict[str, FakeBackend] = {}

    def __call__(self, name: str) -> ModelSpec:
        if name not in self.sizes:
            raise KeyError(name)

        def load() -> FakeBackend:
            self.loaded.append(name)
            self.backends[name] = FakeBackend(name)
            return self.backends[name]

        return ModelSpec(name, self.sizes[name], load)


def make_pool(sizes: dict[str, int], **config: object) -> tuple[ModelPool, Catalog, Clock]:
    catalog, clock = Catalog(sizes), Clock()
    config.setdefault("memory_limit_bytes", 10 * GiB)
    config.setdefault("wait_s", 0.0)
    return ModelPool(catalog, PoolConfig(**config), clock=clock), catalog, clock


def test_loads_once_and_reuses() -> None:
    pool, catalog, _ = make_pool({"a": 2 * GiB})
    assert pool.get("a") is pool.get("a")
    assert catalog.loaded == ["a"]
    assert pool.used_bytes() == 2 * GiB


def test_unloads_least_recently_used_first() -> None:
    pool, catalog, clock = make_pool({"a": 4 * GiB, "b": 4 * GiB, "c": 4 * GiB, "d": 2 * GiB})
    pool.get("a")
    clock.advance(10)
    pool.get("b")
    clock.advance(10)
    pool.get("a")  # a is now more recent than b
    clock.advance(10)
    pool.get("c")  # 12 GiB > 10: b goes
    assert pool.loaded_names() == ["a", "c"]
    assert catalog.backends["b"].closed and not catalog.backends["a"].closed
    assert pool.num_evictions == 1


def test_unloads_several_when_one_is_not_enough() -> None:
    pool, _, clock = make_pool({"a": 3 * GiB, "b": 3 * GiB, "c": 3 * GiB, "big": 8 * GiB})
    for name in ("a", "b", "c"):
        pool.get(name)
        clock.advance(10)
    pool.get("big")  # needs 8 of 10: a, b and c must all go (9 used, 1 free, need 7 more)
    assert pool.loaded_names() == ["big"]


def test_pinned_models_load_at_start_and_stay() -> None:
    pool, catalog, clock = make_pool({"a": 6 * GiB, "b": 3 * GiB, "c": 3 * GiB}, pinned=("a",))
    assert catalog.loaded == ["a"]
    clock.advance(100)
    pool.get("b")
    clock.advance(10)
    pool.get("c")  # 12 GiB: b goes, never the older but pinned a
    assert sorted(pool.loaded_names()) == ["a", "c"]


def test_busy_and_just_handed_out_models_are_not_unloaded() -> None:
    pool, catalog, clock = make_pool({"a": 6 * GiB, "b": 6 * GiB})
    pool.get("a")
    with pytest.raises(PoolFullError, match="pinned or busy"):
        pool.get("b")  # a was handed out less than the grace period ago
    clock.advance(HANDOUT_GRACE_S + 1)
    catalog.backends["a"].busy = 1
    with pytest.raises(PoolFullError):
        pool.get("b")
    catalog.backends["a"].busy = 0
    pool.get("b")
    assert pool.loaded_names() == ["b"]


def test_waits_for_a_busy_model_to_finish() -> None:
    catalog = Catalog({"a": 6 * GiB, "b": 6 * GiB})
    pool = ModelPool(catalog, PoolConfig(memory_limit_bytes=10 * GiB, wait_s=10.0))
    pool.get("a")
    catalog.backends["a"].busy = 1
    # Real clock here: the grace period and the busy request both end within the wait.
    threading.Timer(
        HANDOUT_GRACE_S + 0.2, lambda: setattr(catalog.backends["a"], "busy", 0)
    ).start()
    assert pool.get("b") is catalog.backends["b"]


def test_too_big_for_the_limit_says_so() -> None:
    pool, _, _ = make_pool({"huge": 11 * GiB})
    with pytest.raises(PoolFullError, match="memory limit"):
        pool.get("huge")


def test_unknown_name_raises_resolver_error_and_pool_stays_usable() -> None:
    pool, _, _ = make_pool({"a": GiB})
    with pytest.raises(KeyError):
        pool.get("nope")
    assert pool.get("a") is not None


def test_idle_ttl_unloads_unpinned_idle_models() -> None:
    pool, catalog, clock = make_pool(
        {"a": GiB, "b": GiB, "c": GiB},
        pinned=("a",),
        idle_ttl_s=60.0,
        idle_ttl_overrides={"c": 600.0},
    )
    pool.get("b")
    pool.get("c")
    clock.advance(61)
    catalog.backends["b"].busy = 1
    assert pool.evict_idle() == []  # b is busy
    catalog.backends["b"].busy = 0
    assert pool.evict_idle() == ["b"]  # c has a longer TTL, a is pinned
    clock.advance(600)
    assert pool.evict_idle() == ["c"]
    assert pool.loaded_names() == ["a"]
    pool.close()


def test_concurrent_gets_load_once() -> None:
    catalog = Catalog({"a": GiB})
    gate = threading.Event()
    original = catalog.__call__

    def slow(name: str) -> ModelSpec:
        spec = original(name)
        return ModelSpec(spec.name, spec.size_bytes, lambda: (gate.wait(5), spec.load())[1])

    pool = ModelPool(slow, PoolConfig(memory_limit_bytes=10 * GiB))
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(pool.get("a"))) for _ in range(4)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(5)
    assert catalog.loaded == ["a"] and len(results) == 4 and len({id(r) for r in results}) == 1


def test_default_limit_leaves_room_for_the_system() -> None:
    assert default_memory_limit(64 * GiB) == 56 * GiB
    assert default_memory_limit(8 * GiB) == 4 * GiB  # small machines: half


def test_real_engines_from_tiny_model(tiny_llama_path: Path) -> None:
    size = weights_bytes(tiny_llama_path)
    assert size > 0

    def resolve(name: str) -> ModelSpec:
        return ModelSpec(name, size, lambda: Engine.from_path(tiny_llama_path, model_name=name))

    pool = ModelPool(resolve, PoolConfig(memory_limit_bytes=size + size // 2, wait_s=0))
    first = pool.get("one")
    assert first.count_tokens("hello") > 0
    pool.close()
