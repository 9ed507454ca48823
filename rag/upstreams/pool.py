"""The upstreams of one model: pick one per request, stream from it, fail over, keep them probed.

Everything runs on one I/O thread with its own asyncio loop, so the server's event loop never
waits on an upstream and a `rag ask` thread can use it too:

    submit (any thread) --run_coroutine_threadsafe--> _serve(request) task on the I/O loop
        attempt 1: pick (ring or round robin, healthy upstreams first) -> client.stream(...)
                   each chunk -> handle.put (GenerationHandle wakes the consumer's loop)
        failure before the first token: take that upstream out, wait retry_backoff_s x 2^k,
                   attempt k+2 on the next upstream (ring order), up to max_attempts
        failure after tokens: the stream ends with a GenerationError (its text can't be unsaid),
                   unless the request is restartable (non-streamed): its chunks are held until
                   the end, so they are dropped and the request runs again on another upstream
        cancel: the task is cancelled, which closes the HTTP stream; ends with "cancelled"
    probe task: every upstream's /health when due (health.py decides when)

Ignores: tokenization and the GenerationBackend surface (backend.py), the wire format (wire.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from inference.backend import GenerationChunk, GenerationError, GenerationRequest, Usage
from inference.engine_stream import GenerationHandle

from rag.upstreams.client import UpstreamClient, UpstreamFailure, UpstreamRequestError
from rag.upstreams.config import RouterConfig, UpstreamSpec
from rag.upstreams.health import HealthPolicy, UpstreamHealth
from rag.upstreams.ring import HashRing, bounded_pick, prefix_key
from rag.upstreams.wire import ChunkDecoder, completion_body

log = logging.getLogger(__name__)

_PROBE_TICK_S = 0.05  # how often the probe task looks for a due check
T = TypeVar("T")


class NoUpstreamError(GenerationError):
    """Every attempt failed before the first token: no upstream could take the request."""

    status_code = 503  # try again later (the HTTP layer may map it so)


@dataclass(frozen=True)
class UpstreamStats:
    """One upstream as /metrics shows it (a snapshot)."""

    name: str
    up: bool
    in_flight: int
    num_requests: int  # attempts sent to it
    num_failures: int  # attempts it failed, and failed probes
    last_error: str | None
    num_restarts: int = 0  # restartable requests it failed mid-answer, run again elsewhere


@dataclass
class _Upstream:
    client: UpstreamClient
    health: UpstreamHealth
    in_flight: int = 0
    num_requests: int = 0
    num_failures: int = 0
    num_restarts: int = 0


class _Progress:
    """One request across its attempts: the current decoder and, if restartable, held chunks."""

    def __init__(self, request: GenerationRequest, encode: Callable[[str], list[int]]) -> None:
        self._request = request
        self._encode = encode
        self.held: list[GenerationChunk] = []
        self.decoder = ChunkDecoder(request.request_id, len(request.prompt_ids), encode)

    def start_over(self) -> None:
        """Drop what an attempt produced (never shown: the chunks were held)."""
        self.held = []
        r = self._request
        self.decoder = ChunkDecoder(r.request_id, len(r.prompt_ids), self._encode)


class UpstreamPool:
    """N upstreams serving one model; `start` streams a request into a GenerationHandle."""

    def __init__(
        self,
        specs: Sequence[UpstreamSpec],
        config: RouterConfig,
        *,
        model: str,
        max_model_len: int,
        encode: Callable[[str], list[int]],
    ) -> None:
        if not specs:
            raise ValueError("at least one upstream is needed")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"the same upstream is given twice: {', '.join(names)}")
        # httpx logs every request at INFO: a probe every 2 s per upstream would flood the log.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        self.config = config
        self.model = model
        self.max_model_len = max_model_len
        self._encode = encode
        policy = HealthPolicy(
            config.health_interval_s, config.probe_backoff_s, config.probe_backoff_max_s
        )
        self._lock = threading.Lock()  # counters and health: written on the loop, read anywhere
        self._ring = HashRing(names, config.virtual_nodes)
        self._round_robin = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="upstreams", daemon=True
        )
        self._thread.start()

        async def make() -> dict[str, _Upstream]:  # httpx clients belong to the loop they run on
            return {
                s.name: _Upstream(UpstreamClient(s, config), UpstreamHealth(policy)) for s in specs
            }

        self._upstreams = self._call(make())
        self._tasks: dict[str, Future[None]] = {}
        self._closed = False
        self._prober = asyncio.run_coroutine_threadsafe(self._probe_forever(), self._loop)

    def _call(self, coro: Coroutine[object, object, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # -- requests (any thread) -------------------------------------------------------------------

    def start(self, request: GenerationRequest) -> GenerationHandle:
        handle = GenerationHandle(request.request_id, self._cancel)
        with self._lock:
            if self._closed:
                raise GenerationError("the upstream pool is closed")
            if request.request_id in self._tasks:
                raise ValueError(f"request id {request.request_id!r} is already in flight")
            future = asyncio.run_coroutine_threadsafe(self._serve(request, handle), self._loop)
            self._tasks[request.request_id] = future
        future.add_done_callback(lambda f: self._done(request, handle, f))
        return handle

    def _cancel(self, request_id: str) -> None:
        with self._lock:
            future = self._tasks.get(request_id)
        if future is not None:
            future.cancel()  # cancels the task on the loop, which closes its HTTP stream

    def _done(self, request: GenerationRequest, handle: GenerationHandle, future: Future) -> None:
        with self._lock:
            self._tasks.pop(request.request_id, None)
        if future.cancelled():  # maybe before the task ran: the stream still needs its end
            usage = Usage(len(request.prompt_ids), 0, 0)
            handle.put(GenerationChunk(request.request_id, "", (), usage, "cancelled"))

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return sum(u.in_flight for u in self._upstreams.values())

    def stats(self) -> list[UpstreamStats]:
        with self._lock:
            return [
                UpstreamStats(
                    name,
                    u.health.up,
                    u.in_flight,
                    u.num_requests,
                    u.num_failures,
                    u.health.last_error,
                    u.num_restarts,
                )
                for name, u in sorted(self._upstreams.items())
            ]

    # -- on the loop -----------------------------------------------------------------------------

    async def _serve(self, request: GenerationRequest, handle: GenerationHandle) -> None:
        progress = _Progress(request, self._encode)
        try:
            await self._attempts(request, handle, progress)
        except asyncio.CancelledError:
            usage = progress.decoder.usage
            handle.put(GenerationChunk(request.request_id, "", (), usage, "cancelled"))
        except GenerationError as exc:
            handle.fail(exc)
        except Exception as exc:  # a bug here must still end the consumer's stream
            log.exception("upstream request %s failed", request.request_id)
            handle.fail(GenerationError(f"{type(exc).__name__}: {exc}"))

    async def _attempts(
        self, request: GenerationRequest, handle: GenerationHandle, progress: _Progress
    ) -> None:
        body = completion_body(request, self.model, self.max_model_len)  # same seed every attempt
        key = prefix_key(request.prompt_ids, self.config.affinity_tokens)
        # A restartable request's consumer sees nothing before the end: hold its chunks.
        emit = (lambda c: progress.held.append(c)) if request.restartable else handle.put
        tried: list[str] = []
        errors: list[str] = []
        for attempt in range(self.config.max_attempts):
            if attempt:
                await asyncio.sleep(self.config.retry_backoff_s * 2 ** (attempt - 1))
            name = self._pick(key, tried)
            tried.append(name)
            upstream = self._upstreams[name]
            with self._lock:
                upstream.in_flight += 1
                upstream.num_requests += 1
            try:
                await upstream.client.stream(body, progress.decoder, emit)
                for chunk in progress.held:
                    handle.put(chunk)
                return
            except UpstreamRequestError:
                raise  # the request itself is refused: the same anywhere
            except UpstreamFailure as exc:
                self._failed(upstream, str(exc))
                if exc.num_tokens and not request.restartable:
                    raise GenerationError(
                        f"{exc} (after {exc.num_tokens} tokens of this answer had been sent; "
                        "it cannot be resumed elsewhere)"
                    ) from exc
                if exc.num_tokens:
                    with self._lock:
                        upstream.num_restarts += 1
                    log.warning(
                        "%s failed after %d tokens of %s; starting it over elsewhere",
                        name,
                        exc.num_tokens,
                        request.request_id,
                    )
                    progress.start_over()
                errors.append(str(exc))
                log.warning("attempt %d of %s failed: %s", attempt + 1, request.request_id, exc)
            finally:
                with self._lock:
                    upstream.in_flight -= 1
        raise NoUpstreamError(
            f"no upstream could take the request after {len(errors)} attempts: " + "; ".join(errors)
        )

    def _pick(self, key: int, tried: Sequence[str]) -> str:
        """Healthy upstreams not tried yet first; then healthy ones; then any (it may be back)."""
        with self._lock:
            up = [n for n, u in self._upstreams.items() if u.health.up]
            candidates = [n for n in up if n not in tried] or up or list(self._upstreams)
            in_flight = {n: self._upstreams[n].in_flight for n in candidates}
        if self.config.policy == "round_robin":
            ordered = sorted(candidates)
            return ordered[next(self._round_robin) % len(ordered)]
        allowed = set(candidates)
        order = [n for n in self._ring.order(key) if n in allowed]
        return bounded_pick(order, in_flight, self.config.load_factor, self.config.load_slack)

    def _failed(self, upstream: _Upstream, error: str) -> None:
        with self._lock:
            upstream.num_failures += 1
            was_up = upstream.health.up
            upstream.health.record_failure(error)
        if was_up:
            log.warning("taken out of service: %s", error)

    async def _probe_forever(self) -> None:
        probing: dict[str, asyncio.Task[None]] = {}  # one probe per upstream at a time
        while True:
            with self._lock:
                due = [
                    name
                    for name, u in self._upstreams.items()
                    if u.health.check_due() and name not in probing
                ]
            for name in due:
                task = asyncio.create_task(self._probe(self._upstreams[name]))
                probing[name] = task
                task.add_done_callback(lambda _, name=name: probing.pop(name, None))
            await asyncio.sleep(_PROBE_TICK_S)

    async def _probe(self, upstream: _Upstream) -> None:
        ok, error = await upstream.client.healthy()
        with self._lock:
            was_up = upstream.health.up
            upstream.health.record_check(ok, error)
            if not ok:
                upstream.num_failures += 1
        if ok and not was_up:
            log.warning("upstream %s is back in service", upstream.client.name)
        elif not ok and was_up:
            log.warning("upstream %s taken out: %s", upstream.client.name, error)

    # -- shutdown --------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            futures = list(self._tasks.values())
        self._prober.cancel()
        for future in futures:
            future.cancel()

        async def shutdown() -> None:
            await asyncio.sleep(0)  # let the cancelled tasks end their streams first
            for upstream in self._upstreams.values():
                await upstream.client.aclose()

        with contextlib.suppress(Exception):
            self._call(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()
