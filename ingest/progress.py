"""Progress reporting for an ingest run: a protocol the pipeline calls, and a rich progress bar.

The pipeline reports files done and chunks embedded; it never prints. The bar shows files,
chunks, chunks/s and an ETA by files, on stderr so stdout stays clean for --json.
"""

from __future__ import annotations

import time
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ProgressSink(Protocol):
    def start(self, num_files: int) -> None: ...

    def file_done(self, path: str, status: str, num_chunks: int) -> None: ...

    def chunks_embedded(self, num_chunks: int) -> None: ...

    def finish(self) -> None: ...


class NullProgress:
    """Reports nothing (tests, --json, a non-terminal stderr)."""

    def start(self, num_files: int) -> None:
        pass

    def file_done(self, path: str, status: str, num_chunks: int) -> None:
        pass

    def chunks_embedded(self, num_chunks: int) -> None:
        pass

    def finish(self) -> None:
        pass


class RichProgress:
    """files [bar] n/N · chunks · chunks/s · elapsed · ETA."""

    def __init__(self, console: Console | None = None) -> None:
        self._console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]ingest"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("files"),
            TextColumn("{task.fields[chunks]} chunks"),
            TextColumn("{task.fields[rate]:.1f} chunks/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self._console,
            transient=False,
        )
        self._task: TaskID | None = None
        self._num_chunks = 0
        self._started = time.perf_counter()

    def start(self, num_files: int) -> None:
        self._started = time.perf_counter()
        self._progress.start()
        self._task = self._progress.add_task("ingest", total=num_files, chunks=0, rate=0.0)

    def file_done(self, path: str, status: str, num_chunks: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task)

    def chunks_embedded(self, num_chunks: int) -> None:
        self._num_chunks += num_chunks
        if self._task is not None:
            elapsed = max(time.perf_counter() - self._started, 1e-9)
            self._progress.update(
                self._task, chunks=self._num_chunks, rate=self._num_chunks / elapsed
            )

    def finish(self) -> None:
        self._progress.stop()
