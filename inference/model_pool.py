"""Model pool: several chat models served at once by name, within a memory limit.

    pool.get("qwen3-8b")  ->  its backend: already loaded, or loaded now after unloading the
                              least recently used idle models until it fits

Rules, in order:
- pinned models are loaded up front and never unloaded;
- a model with requests in flight is never unloaded, nor one handed out in the last
  HANDOUT_GRACE_S seconds (its caller may be about to submit);
- when nothing can be unloaded yet, `get` waits up to `wait_s` for a model to go idle, then
  raises PoolFullError (a 503: try again);
- a model unused for its idle TTL is unloaded by a background reaper.

Memory is the model's weights on disk (safetensors bytes) plus its KV budget estimate, against
`memory_limit_bytes` (default: physical RAM minus 8 GiB, at least half the RAM).

Ignores: how a model is loaded or run (the `load` and `resolve` callables), HTTP.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from inference.backend import GenerationBackend

log = logging.getLogger(__name__)

RESERVED_BYTES = 8 * 1024**3  # left to the OS, the embedder, the index and the page cache
HANDOUT_GRACE_S = 2.0
_POLL_S = 0.05


class PoolFullError(RuntimeError):
    """No room for the model: every loaded model is pinned or busy (try again later)."""


@dataclass(frozen=True)
class PoolConfig:
    memory_limit_bytes: int | None = None  # None: physical RAM minus RESERVED_BYTES
    pinned: tuple[str, ...] = ()  # loaded at start, never unloaded
    idle_ttl_s: float | None = None  # unload a model unused this long; None: never
    idle_ttl_overrides: Mapping[str, float] = field(default_factory=dict)  # per model name
    wait_s: float = 30.0  # how long `get` waits for a busy model to go idle before giving up

    def __post_init__(self) -> None:
        object.__setattr__(self, "pinned", tuple(self.pinned))
        if self.memory_limit_bytes is not None and self.memory_limit_bytes < 1:
            raise ValueError(f"memory_limit_bytes must be >= 1, got {self.memory_limit_bytes}")
        ttls = [self.idle_ttl_s, *self.idle_ttl_overrides.values()]
        if any(ttl is not None and ttl <= 0 for ttl in ttls):
            raise ValueError("idle TTLs must be > 0 seconds (or None for never)")
        if self.wait_s < 0:
            raise ValueError("wait_s must be >= 0")

    def ttl_of(self, name: str) -> float | None:
        return self.idle_ttl_overrides.get(name, self.idle_ttl_s)


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_memory_limit(total: int | None = None) -> int:
    total = total or physical_memory_bytes()
    return max(total - RESERVED_BYTES, total // 2)


def weights_bytes(folder: Path) -> int:
    """Bytes of a model folder's weights (what loading it costs in RAM, before the KV cache)."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def kv_bytes_per_token(folder: Path) -> int:
    """K and V bytes one token takes across all layers, from the folder's config.json."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config = config.get("text_config", config)  # multimodal configs nest the language model
    num_heads = int(config.get("num_attention_heads", 1))
    num_kv_heads = int(config.get("num_key_value_heads") or num_heads)
    head_dim = int(config.get("head_dim") or config.get("hidden_size", 0) // num_heads)
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float16")
    itemsize = 4 if "32" in dtype else 2
    return 2 * int(config.get("num_hidden_layers", 0)) * num_kv_heads * head_dim * itemsize


@dataclass(frozen=True)
class ModelSpec:
    """A model the pool can load: its name, its cost in bytes, and how to load it."""

    name: str
    size_bytes: int
    load: Callable[[], GenerationBackend]


@dataclass
class _Loaded:
    backend: GenerationBackend
    size_bytes: int
    last_used: float


class ModelPool:
    """Backends by name, loaded on demand and unloaded least-recently-used first."""

    def __init__(
        self,
        resolve: Callable[[str], ModelSpec],
        config: PoolConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`resolve(name)` says what loading `name` costs and how; raises for an unknown name."""
        self.config = config or PoolConfig()
        self.memory_limit = self.config.memory_limit_bytes or default_memory_limit()
        self._resolve = resolve
        self._clock = clock
        self._lock = threading.Lock()
        self._loaded: dict[str, _Loaded] = {}  # insertion order is irrelevant: last_used decides
        self._loading: dict[str, threading.Event] = {}
        self._reserved_bytes = 0  # models being loaded right now
        self._closed = False
        self._num_evictions = 0
        self._reaper: threading.Thread | None = None
        self._stop_reaper = threading.Event()
        for name in self.config.pinned:
            self.get(name)
        if self.config.idle_ttl_s is not None or self.config.idle_ttl_overrides:
            self._reaper = threading.Thread(
                target=self._reap, name="model-pool-reaper", daemon=True
            )
            self._reaper.start()

    # -- queries -------------------------------------------------------------------------------

    def loaded_names(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(m.size_bytes for m in self._loaded.values())

    @property
    def num_evictions(self) -> int:
        return self._num_evictions

    def loaded_backends(self) -> dict[str, GenerationBackend]:
        with self._lock:
            return {name: m.backend for name, m in self._loaded.items()}

    # -- get, load and unload ------------------------------------------------------------------

    def get(self, name: str) -> GenerationBackend:
        """The backend for `name`, loading it (and unloading idle ones) if needed."""
        while True:
            with self._lock:
                if self._closed:
                    raise PoolFullError("the model pool is closed")
                if (entry := self._loaded.get(name)) is not None:
                    entry.last_used = self._clock()
                    return entry.backend
                loading = self._loading.get(name)
                if loading is None:
                    self._loading[name] = threading.Event()
                    break
            loading.wait()  # another thread is loading it: use its result (or retry on failure)
        try:
            return self._load(name)
        finally:
            with self._lock:
                self._loading.pop(name).set()

    def _load(self, name: str) -> GenerationBackend:
        spec = self._resolve(name)
        if spec.size_bytes > self.memory_limit:
            raise PoolFullError(
                f"model {name} needs {_gib(spec.size_bytes)} but the pool's memory limit is "
                f"{_gib(self.memory_limit)}"
            )
        self._make_room(spec)
        log.info("loading model %s (%s)", name, _gib(spec.size_bytes))
        try:
            backend = spec.load()
        finally:
            with self._lock:
                self._reserved_bytes -= spec.size_bytes
        with self._lock:
            self._loaded[name] = _Loaded(backend, spec.size_bytes, self._clock())
        return backend

    def _make_room(self, spec: ModelSpec) -> None:
        """Unload idle models until `spec` fits, and reserve its bytes; waits up to wait_s."""
        deadline = self._clock() + self.config.wait_s
        while True:
            with self._lock:
                need = self._used_bytes_locked() + spec.size_bytes - self.memory_limit
                victims = self._victims_locked(need) if need > 0 else []
                evicted = [(name, self._loaded.pop(name)) for name in victims]
                self._num_evictions += len(evicted)
                if need <= 0 or evicted:
                    self._reserved_bytes += spec.size_bytes
            for name, entry in evicted:
                log.info("unloading model %s to make room for %s", name, spec.name)
                entry.backend.close()
            if need <= 0 or evicted:
                return
            if self._clock() >= deadline:
                raise PoolFullError(
                    f"no room for model {spec.name} ({_gib(spec.size_bytes)}): "
                    f"{', '.join(self.loaded_names())} are pinned or busy within the "
                    f"{_gib(self.memory_limit)} limit; try again later"
                )
            time.sleep(_POLL_S)

    def _victims_locked(self, need: int) -> list[str]:
        """Least recently used idle models whose unloading frees `need` bytes; [] if impossible."""
        now = self._clock()
        candidates = sorted(
            (
                (entry.last_used, name)
                for name, entry in self._loaded.items()
                if name not in self.config.pinned
                and now - entry.last_used >= HANDOUT_GRACE_S
                and _is_idle(entry.backend)
            ),
        )
        victims: list[str] = []
        freed = 0
        for _, name in candidates:
            if freed >= need:
                break
            victims.append(name)
            freed += self._loaded[name].size_bytes
        return victims if freed >= need else []

    def _used_bytes_locked(self) -> int:
        # Models being loaded count too, so two loads at once cannot both squeeze in.
        return sum(m.size_bytes for m in self._loaded.values()) + self._reserved_bytes

    def unload(self, name: str) -> bool:
        """Unload `name` now if it is loaded (pinned or not); False if it was not loaded."""
        with self._lock:
            entry = self._loaded.pop(name, None)
        if entry is None:
            return False
        entry.backend.close()
        return True

    def evict_idle(self) -> list[str]:
        """Unload unpinned models idle past their TTL; returns their names."""
        now = self._clock()
        with self._lock:
            expired = [
                name
                for name, entry in self._loaded.items()
                if name not in self.config.pinned
                and (ttl := self.config.ttl_of(name)) is not None
                and now - entry.last_used >= ttl
                and _is_idle(entry.backend)
            ]
            entries = [self._loaded.pop(name) for name in expired]
            self._num_evictions += len(expired)
        for name, entry in zip(expired, entries, strict=True):
            log.info("unloading model %s: idle for its TTL", name)
            entry.backend.close()
        return expired

    def _reap(self) -> None:
        ttls = [t for t in (self.config.idle_ttl_s, *self.config.idle_ttl_overrides.values()) if t]
        period = max(0.05, min(ttls) / 4)
        while not self._stop_reaper.wait(period):
            self.evict_idle()

    def close(self) -> None:
        self._stop_reaper.set()
        with self._lock:
            self._closed = True
            entries, self._loaded = list(self._loaded.values()), {}
        for entry in entries:
            entry.backend.close()


def _is_idle(backend: GenerationBackend) -> bool:
    probe = getattr(backend, "load", None)
    if not callable(probe):
        return True
    load = probe()
    return load.num_waiting == 0 and load.num_running == 0


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 1024**3:.2f} GiB"
