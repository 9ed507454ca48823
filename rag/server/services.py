"""What the server serves: the loaded models and the index, shared by every route.

    Services
      models    ModelRegistry: chat backends by name (one MLX engine today; the model pool later)
      embedder  TextEmbedder or None          reranker  Reranker or None
      index_path  the sqlite-vec index of the RAG and document routes, or None
      encoder   EncoderWorker: the one thread that runs embedder and reranker calls
      metrics   ServerMetrics

Ignores: HTTP (routes), loading models from disk (loading.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from inference.backend import GenerationBackend
from inference.chat_model import ModelNotFoundError
from inference.model_pool import ModelPool, PoolFullError
from inference.thread_exit import wait_os_thread_exit

from ingest.protocols import TextEmbedder
from rag.reranking import Reranker
from rag.server.errors import APIError
from rag.server.metrics import ServerMetrics

T = TypeVar("T")


class ModelRegistry(Protocol):
    """Chat models by the name clients send in `model`."""

    @property
    def default_name(self) -> str: ...

    def names(self) -> list[str]: ...

    def loaded_names(self) -> list[str]:
        """The models in memory now (the others load on first use)."""
        ...

    def get(self, name: str | None) -> GenerationBackend:
        """The backend for `name` (None: the default); raises APIError 404 for an unknown one."""
        ...

    def load(self) -> dict[str, tuple[int, int]]:
        """Model name -> (requests waiting, requests running), for /metrics."""
        ...

    def cache_stats(self) -> dict[str, Any]:
        """Model name -> its prefix cache's stats, for loaded models that have one (/metrics)."""
        ...

    def mtp_stats(self) -> dict[str, Any]:
        """Model name -> its MTP lane's counters, for loaded models that have a lane (/metrics)."""
        ...

    def close(self) -> None: ...


def _loads(backends: Mapping[str, GenerationBackend]) -> dict[str, tuple[int, int]]:
    loads: dict[str, tuple[int, int]] = {}
    for name, backend in backends.items():
        probe = getattr(backend, "load", None)  # the MLX engine reports its queue
        if callable(probe):
            snapshot = probe()
            loads[name] = (snapshot.num_waiting, snapshot.num_running)
    return loads


def _probe(backends: Mapping[str, GenerationBackend], method: str) -> dict[str, Any]:
    """Model name -> backend.method() for the backends that have it and answer (the MLX engine)."""
    stats: dict[str, Any] = {}
    for name, backend in backends.items():
        probe = getattr(backend, method, None)
        if callable(probe) and (value := probe()) is not None:
            stats[name] = value
    return stats


class StaticModelRegistry:
    """Backends loaded up front and kept for the server's life."""

    def __init__(self, backends: Sequence[GenerationBackend], *, aliases: Mapping[str, str] = {}):
        if not backends:
            raise ValueError("at least one chat model is needed")
        self._backends = {b.model_name: b for b in backends}
        self._aliases = dict(aliases)
        self._default = backends[0].model_name

    @property
    def default_name(self) -> str:
        return self._default

    def names(self) -> list[str]:
        return list(self._backends)

    def loaded_names(self) -> list[str]:
        return list(self._backends)

    def get(self, name: str | None) -> GenerationBackend:
        if not name:
            return self._backends[self._default]
        name = self._aliases.get(name, name)
        backend = self._backends.get(name)
        if backend is None:
            raise APIError(
                404,
                f"model {name!r} does not exist; available: {', '.join(self._backends)}",
                param="model",
                code="model_not_found",
            )
        return backend

    def load(self) -> dict[str, tuple[int, int]]:
        return _loads(self._backends)

    def cache_stats(self) -> dict[str, Any]:
        return _probe(self._backends, "prefix_cache_stats")

    def mtp_stats(self) -> dict[str, Any]:
        return _probe(self._backends, "mtp_stats")

    def close(self) -> None:
        for backend in self._backends.values():
            backend.close()


class PooledModelRegistry:
    """Chat models from a ModelPool: any available model loads on first use, LRU-unloaded."""

    def __init__(self, pool: ModelPool, default_name: str, available: Callable[[], list[str]]):
        self._pool = pool
        self._default = default_name
        self._available = available  # names the pool can load (the model dir may change)

    @property
    def default_name(self) -> str:
        return self._default

    def names(self) -> list[str]:
        names = self._available()
        return names if self._default in names else [self._default, *names]

    def loaded_names(self) -> list[str]:
        return self._pool.loaded_names()

    def get(self, name: str | None) -> GenerationBackend:
        name = name or self._default
        try:
            return self._pool.get(name)
        except ModelNotFoundError as exc:
            raise APIError(404, str(exc), param="model", code="model_not_found") from exc
        except PoolFullError as exc:
            raise APIError(503, str(exc), code="model_pool_full") from exc

    def load(self) -> dict[str, tuple[int, int]]:
        return _loads(self._pool.loaded_backends())

    def cache_stats(self) -> dict[str, Any]:
        return _probe(self._pool.loaded_backends(), "prefix_cache_stats")

    def mtp_stats(self) -> dict[str, Any]:
        return _probe(self._pool.loaded_backends(), "mtp_stats")

    def close(self) -> None:
        self._pool.close()


class EncoderWorker:
    """One thread for embedder and reranker calls: they run beside the engine, never block the loop."""

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="encoder", initializer=self._started
        )

    def _started(self) -> None:
        self._threads.append(threading.current_thread())

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, *args)

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """The same thread, from synchronous code (e.g. a streaming worker thread)."""
        return self._pool.submit(fn, *args).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for thread in self._threads:  # it ran compiled MLX functions (the embedder's GELU)
            wait_os_thread_exit(thread)


@dataclass
class Services:
    models: ModelRegistry
    embedder: TextEmbedder | None = None
    reranker: Reranker | None = None
    index_path: Path | None = None
    encoder: EncoderWorker = field(default_factory=EncoderWorker)
    metrics: ServerMetrics | None = None
    started_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = ServerMetrics(
                self.models.load, self.models.cache_stats, self.models.mtp_stats
            )

    def require_embedder(self) -> TextEmbedder:
        if self.embedder is None:
            raise APIError(404, "this server has no embedding model loaded", code="model_not_found")
        return self.embedder

    def close(self) -> None:
        self.encoder.close()
        # Models with threads or connections of their own (the MLX embedder's lanes, a remote
        # embedder's client); the TextEmbedder protocol does not require a close.
        for model in (self.embedder, self.reranker):
            close = getattr(model, "close", None)
            if callable(close):
                close()
        self.models.close()
