"""A request's stream of chunks: filled by the engine's thread, read by a thread or an event loop.

    engine thread --put()--> [ deque under a lock ] --> `for chunk in stream`   (blocks a thread)
                                     |
                                     +--call_soon_threadsafe(wake)--> `async for chunk in stream`

The lock is held only to move a chunk in or out, never while MLX computes, so an asyncio loop
reading a stream is never blocked by the engine; the engine wakes a waiting task with
`loop.call_soon_threadsafe`. A stream has one consumer at a time.

Ignores: what produces the chunks (any backend thread may), and what the consumer does with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from types import TracebackType

from inference.backend import GenerationChunk


class GenerationHandle:
    """One request's chunks; iterate it (sync or async), cancel it, or use it as a context."""

    def __init__(self, request_id: str, on_cancel: Callable[[str], None]) -> None:
        self._request_id = request_id
        self._on_cancel = on_cancel
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._items: deque[GenerationChunk | BaseException] = deque()
        self._ended = False  # the last chunk (or an error) was queued
        self._consumed = False  # ... and taken by the consumer
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None

    @property
    def request_id(self) -> str:
        return self._request_id

    @property
    def finished(self) -> bool:
        """The producer has queued the last chunk (the consumer may not have read it yet)."""
        with self._lock:
            return self._ended

    # -- producer side (the engine's thread) -------------------------------------------------

    def put(self, chunk: GenerationChunk) -> None:
        self._push(chunk, last=chunk.finish_reason is not None)

    def fail(self, error: BaseException) -> None:
        """End the stream with an error, raised to the consumer after the queued chunks."""
        self._push(error, last=True)

    def _push(self, item: GenerationChunk | BaseException, *, last: bool) -> None:
        with self._lock:
            if self._ended:
                return  # a late error after the last chunk changes nothing
            self._items.append(item)
            self._ended = last
            self._ready.notify_all()
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, future = waiter
            # RuntimeError: the consumer's loop is closed, so nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_wake, future)

    # -- consumer side -----------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop generating; the stream ends with a "cancelled" chunk at the engine's next step."""
        if not self.finished:
            self._on_cancel(self._request_id)

    def __iter__(self) -> GenerationHandle:
        return self

    def __next__(self) -> GenerationChunk:
        with self._ready:
            while not self._items:
                if self._consumed:
                    raise StopIteration
                self._ready.wait()
            return self._pop()

    def __aiter__(self) -> GenerationHandle:
        return self

    async def __anext__(self) -> GenerationChunk:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._items:
                    return self._pop()
                if self._consumed:
                    raise StopAsyncIteration
                future: asyncio.Future[None] = loop.create_future()
                self._waiter = (loop, future)
            await future

    def _pop(self) -> GenerationChunk:
        """Take the next item; the caller holds the lock."""
        item = self._items.popleft()
        if self._ended and not self._items:
            self._consumed = True
        if isinstance(item, BaseException):
            raise item
        return item

    # -- `with stream:` / `async with stream:` cancel an unfinished request on the way out ----

    def __enter__(self) -> GenerationHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cancel()

    async def __aenter__(self) -> GenerationHandle:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cancel()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
