"""SSD tier of the prefix cache: one safetensors file per block, an SQLite index, a writer thread.

    <cache root>/<model fingerprint>/
        index.sqlite        blocks(key, parent, num_bytes, last_used, token_ids): read at start-up
        lock                flock'd by the one engine that owns the folder
        blocks/3f/3fa2....safetensors   one block (kv_ssd_format.py): metadata (key, parent,
                                        fingerprint, checksum ...), keys and values

The engine thread decides (what is stored, what is evicted: a kv_blocks.BlockIndex under the
byte budget); files are read by a reader thread and written by a writer thread, so the engine
waits for neither. A read (`request_reads`, results from `take_reads`) loads the file, checks
its metadata and checksums and converts the tensors (a hook: prefix_cache.py makes MLX arrays)
before the engine sees it. Every change on disk goes through the writer, in order
(write-behind). A write is

    temp file -> fsync -> rename -> fsync folder -> index row (one commit)

so a crash (kill -9, power) leaves at worst a temp file or a file without a row, which the
writer deletes when it starts; a row always names a complete file. A file that fails its
checks (truncated, flipped bits, another model's) is a miss and is deleted with its chain's
tail, never served. Pending writes are bounded by bytes: when the disk falls behind, new blocks
are not spilled (counted in `num_dropped`) rather than stalling the engine.

The index keeps each block's token ids, so a lookup can pick a block whose *leading* tokens
match (kv_blocks.py); the caller checks them against the block's key before use.

Ignores: arrays (numpy in, numpy out; prefix_cache.py converts), which blocks are worth keeping
(the engine spills every block it stores in RAM), and concurrent engines on one folder (the
second one runs without an SSD tier).
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import sqlite3
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from inference.durable_file import TEMP_SUFFIX, write_durably
from inference.kv_blocks import BlockIndex, prefix_closed
from inference.kv_ssd_format import FORMAT_VERSION, HostTensor, decode_block, encode_block

__all__ = ["HostTensor", "SSDRead", "SSDStats", "SSDTier", "decode_block", "encode_block"]

log = logging.getLogger(__name__)

DEFAULT_MAX_PENDING_BYTES = 256 << 20  # ~0.25 s of an SSD's writes; beyond that, drop spills


@dataclass(frozen=True)
class SSDRead:
    """A finished read: `data` is the converted tensors, or None (missing or failed checks)."""

    key: str
    data: object | None
    error: str | None = None  # why data is None


@dataclass(frozen=True)
class SSDStats:
    num_blocks: int  # stored or queued
    num_bytes: int
    num_evictions: int
    num_writes: int  # files written since start
    num_dropped: int  # spills refused: the writer fell behind, or the parent is not on SSD
    num_corrupt: int  # files that failed their checks (misses, deleted)


# -- the index -----------------------------------------------------------------------------------


def _m001_create_blocks(db: sqlite3.Connection) -> None:
    db.execute(
        "CREATE TABLE blocks (key TEXT PRIMARY KEY, parent TEXT, num_bytes INTEGER NOT NULL, "
        "last_used INTEGER NOT NULL)"
    )


def _m002_token_ids(db: sqlite3.Connection) -> None:
    # uint32 little-endian ids of the block's tokens; NULL for blocks stored before: those are
    # found by their key only.
    db.execute("ALTER TABLE blocks ADD COLUMN token_ids BLOB")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_m001_create_blocks, _m002_token_ids]


def open_index(path: Path) -> sqlite3.Connection:
    """Open (and create or migrate) the index; WAL, so a kill -9 never tears a commit."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    (version,) = db.execute("PRAGMA user_version").fetchone()
    for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
        with db:
            db.execute("BEGIN")
            migration(db)
            db.execute(f"PRAGMA user_version={number}")
    return db


# -- the tier ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Write:
    seq: int
    key: str
    parent: str | None
    last_used: int
    num_bytes: int
    metadata: dict[str, str]
    tensors: dict[str, HostTensor]  # the writer thread encodes and checksums them
    token_ids: bytes | None  # uint32 little-endian


class SSDTier:
    """Blocks on disk for one model; engine-thread API, disk changes on a writer thread."""

    @classmethod
    def open(
        cls,
        folder: Path,
        capacity_bytes: int,
        fingerprint: str,
        *,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        convert: Callable[[dict[str, HostTensor]], object] | None = None,
    ) -> SSDTier | None:
        """The tier in folder, or None (logged) when another engine holds it.

        convert: run by the reader thread on a read block's tensors (else they come as is)."""
        folder.mkdir(parents=True, exist_ok=True)
        lock = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            log.warning("prefix cache: %s is in use by another engine; no SSD tier", folder)
            return None
        return cls(folder, capacity_bytes, fingerprint, lock, max_pending_bytes, convert)

    def __init__(
        self,
        folder: Path,
        capacity_bytes: int,
        fingerprint: str,
        lock_fd: int,
        max_pending_bytes: int,
        convert: Callable[[dict[str, HostTensor]], object] | None = None,
    ) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self.max_pending_bytes = max_pending_bytes
        self._lock_fd = lock_fd
        self._blocks_dir = folder / "blocks"
        self._blocks_dir.mkdir(exist_ok=True)
        self._index = BlockIndex(capacity_bytes)
        self._stored: set[str] = set()  # on disk with a row: readable
        self._pending: dict[str, tuple[int, int]] = {}  # key -> (write seq, bytes) queued
        self._token_ids: dict[str, bytes] = {}  # key -> its token ids, where known
        self._seq = 0
        self.num_writes = self.num_dropped = self.num_corrupt = 0
        self._commands: queue.Queue[tuple[str, object]] = queue.Queue()
        self._done: queue.SimpleQueue[tuple[str, str, int]] = queue.SimpleQueue()
        self._convert = convert
        self.on_read: Callable[[], None] | None = None  # called by the reader after each batch
        self._reads: queue.Queue[list[str] | None] = queue.Queue()
        self._read_results: queue.SimpleQueue[SSDRead] = queue.SimpleQueue()
        self._reading: set[str] = set()  # requested, result not taken yet

        self._db = open_index(folder / "index.sqlite")
        stale = self._load_index()
        self._closed = False
        self._writer = threading.Thread(
            target=self._writer_main,
            args=(set(self._stored), stale),
            name=f"kv-ssd-{fingerprint[:8]}",
            daemon=True,
        )
        self._writer.start()
        self._reader = threading.Thread(
            target=self._reader_main, name=f"kv-ssd-read-{fingerprint[:8]}", daemon=True
        )
        self._reader.start()

    def _load_index(self) -> list[str]:
        """Rows -> the in-memory index (prefix-closed, within budget); returns keys to delete."""
        rows = self._db.execute(
            "SELECT key, parent, num_bytes, last_used, token_ids FROM blocks"
        ).fetchall()
        by_key = {
            key: (parent or None, num_bytes, last_used)
            for key, parent, num_bytes, last_used, _ in rows
        }
        self._token_ids = {key: bytes(ids) for key, _, _, _, ids in rows if ids is not None}
        good = prefix_closed((key, parent) for key, (parent, _, _) in by_key.items())
        children: dict[str | None, list[str]] = {}
        for key in good:
            children.setdefault(by_key[key][0], []).append(key)
        stale = [key for key in by_key if key not in good]
        level = sorted(children.get(None, []), key=lambda k: by_key[k][2])
        while level:  # parents before children
            next_level: list[str] = []
            for key in level:
                parent, num_bytes, last_used = by_key[key]
                if parent is not None and parent not in self._index:
                    stale.append(key)  # its parent did not fit the budget
                    continue
                evicted = self._index.add(key, parent, num_bytes, last_used=last_used)
                if evicted is None:
                    stale.append(key)
                    continue
                for victim in evicted:
                    self._stored.discard(victim)
                    self._token_ids.pop(victim, None)
                    stale.append(victim)
                self._stored.add(key)
                next_level.extend(children.get(key, []))
            level = next_level
        for key in stale:
            self._token_ids.pop(key, None)
        return stale

    # -- engine thread ---------------------------------------------------------------------------

    def __contains__(self, key: object) -> bool:
        """The block is on disk and may be read."""
        return key in self._stored

    def holds(self, key: str) -> bool:
        """The block is on disk or queued for it."""
        return key in self._index

    def children(self, parent: str | None) -> list[tuple[str, tuple[int, ...]]]:
        """(key, token ids) of the readable blocks after parent whose token ids are known."""
        out = []
        for key in self._index.children(parent):
            ids = self._token_ids.get(key)
            if ids is not None and key in self._stored:
                out.append((key, struct.unpack(f"<{len(ids) // 4}I", ids)))
        return out

    def write(
        self,
        key: str,
        parent: str | None,
        tensors: Mapping[str, HostTensor],
        num_tokens: int,
        token_ids: Sequence[int] | None = None,
    ) -> bool:
        """Queue a block for the disk; False (not queued) when it cannot be spilled now."""
        if key in self._index:
            return True
        if parent is not None and parent not in self._index:
            self.num_dropped += 1  # its chain is not on disk: the block could never be reached
            return False
        metadata = {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "key": key,
            "parent": parent or "",
            "num_tokens": str(num_tokens),
        }
        num_bytes = sum(t.array.nbytes for t in tensors.values())  # data; headers are ~300 B
        pending = sum(n for _, n in self._pending.values())
        if pending + num_bytes > self.max_pending_bytes:
            self.num_dropped += 1
            return False
        evicted = self._index.add(key, parent, num_bytes)
        if evicted is None:
            self.num_dropped += 1
            return False
        self._forget(evicted)
        self._seq += 1
        self._pending[key] = (self._seq, num_bytes)
        entry = self._index.get(key)
        assert entry is not None
        ids = None if token_ids is None else struct.pack(f"<{len(token_ids)}I", *token_ids)
        if ids is not None:
            self._token_ids[key] = ids
        write = _Write(
            self._seq, key, parent, entry.last_used, num_bytes, metadata, dict(tensors), ids
        )
        self._commands.put(("write", write))
        return True

    def read(self, key: str) -> dict[str, HostTensor] | None:
        """The block's tensors, or None (a miss) when it is not on disk or its file is bad."""
        if key not in self._stored:
            return None
        try:
            return self._load(key)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._bad(key, repr(exc))
            return None

    def request_reads(self, keys: Sequence[str]) -> list[str]:
        """Queue reads of readable blocks for the reader thread; returns the keys queued (not
        those unreadable or queued already). Results come from take_reads, in this order."""
        batch = [key for key in keys if key in self._stored and key not in self._reading]
        if batch:
            self._reading.update(batch)
            self._reads.put(batch)
        return batch

    def is_reading(self, key: str) -> bool:
        return key in self._reading

    def take_reads(self) -> list[SSDRead]:
        """Finished reads, in the order requested. A failed check drops the block and its
        descendants (counted in num_corrupt); a block evicted meanwhile is a plain miss."""
        out: list[SSDRead] = []
        while True:
            try:
                result = self._read_results.get_nowait()
            except queue.Empty:
                return out
            self._reading.discard(result.key)
            if result.data is None and result.key in self._stored:
                self._bad(result.key, result.error or "unreadable")
            out.append(result)

    def has_reads(self) -> bool:
        """Finished reads are waiting to be taken (any thread may ask)."""
        return not self._read_results.empty()

    def _load(self, key: str) -> dict[str, HostTensor]:
        """Read and check a block file (any thread); raises on a missing or bad file."""
        expected = {"format_version": FORMAT_VERSION, "fingerprint": self.fingerprint, "key": key}
        with self._path(key).open("rb") as f:
            raw = f.read()
        return decode_block(raw, expected)

    def _bad(self, key: str, why: str) -> None:
        log.warning("prefix cache: dropping SSD block %s: %s", key, why)
        self.num_corrupt += 1
        self._forget(self._index.remove_subtree(key))

    def touch(self, chain: Sequence[str]) -> None:
        """The chain was used: refresh its recency here and, later, in the index."""
        known = [key for key in chain if key in self._index]
        if not known:
            return
        self._index.touch(known)
        recency = []
        for key in known:
            entry = self._index.get(key)
            assert entry is not None
            recency.append((entry.last_used, key))
        self._commands.put(("touch", recency))

    def poll(self) -> None:
        """Take in the writer's results: written blocks become readable."""
        while True:
            try:
                what, key, seq = self._done.get_nowait()
            except queue.Empty:
                return
            if self._pending.get(key, (None, 0))[0] != seq:
                continue  # evicted or replaced while queued; its delete is queued after it
            del self._pending[key]
            if what == "written":
                self._stored.add(key)
                self.num_writes += 1
            else:
                self._forget(self._index.remove_subtree(key))

    def flush(self) -> None:
        """Wait until everything queued is on disk."""
        if self._closed:
            return
        done = threading.Event()
        self._commands.put(("flush", done))
        done.wait()
        self.poll()

    def close(self) -> None:
        """Finish the queued writes, stop the reader and the writer, release the folder."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._reads.put(None)
        self._reader.join()
        self._commands.put(("stop", None))
        self._writer.join()
        self._db.close()
        os.close(self._lock_fd)

    def stats(self) -> SSDStats:
        return SSDStats(
            num_blocks=len(self._index),
            num_bytes=self._index.num_bytes,
            num_evictions=self._index.num_evictions,
            num_writes=self.num_writes,
            num_dropped=self.num_dropped,
            num_corrupt=self.num_corrupt,
        )

    def _forget(self, keys: Sequence[str]) -> None:
        """Blocks left the index: unreadable now, deleted from disk in queue order."""
        for key in keys:
            self._stored.discard(key)
            self._pending.pop(key, None)
            self._token_ids.pop(key, None)
            self._commands.put(("delete", key))

    # -- reader thread ---------------------------------------------------------------------------

    def _reader_main(self) -> None:
        while True:
            batch = self._reads.get()
            if batch is None:
                return
            for key in batch:
                try:
                    tensors = self._load(key)
                    data = tensors if self._convert is None else self._convert(tensors)
                    result = SSDRead(key, data)
                except FileNotFoundError:  # deleted meanwhile (evicted): a plain miss
                    result = SSDRead(key, None, "missing")
                except Exception as exc:  # a bad file (or a bug) must never reach a request
                    result = SSDRead(key, None, repr(exc))
                self._read_results.put(result)
            if self.on_read is not None:
                self.on_read()

    def _path(self, key: str) -> Path:
        return self._blocks_dir / key[:2] / f"{key}.safetensors"

    # -- writer thread ---------------------------------------------------------------------------

    def _writer_main(self, on_disk: set[str], stale: list[str]) -> None:
        for key in stale:
            self._delete(key, on_disk)
        self._remove_strays(on_disk)
        while True:
            what, arg = self._commands.get()
            try:
                if what == "write":
                    assert isinstance(arg, _Write)
                    self._write(arg, on_disk)
                elif what == "delete":
                    assert isinstance(arg, str)
                    self._delete(arg, on_disk)
                elif what == "touch":
                    with self._db:
                        self._db.execute("BEGIN")
                        self._db.executemany("UPDATE blocks SET last_used = ? WHERE key = ?", arg)  # type: ignore[arg-type]
                elif what == "flush":
                    assert isinstance(arg, threading.Event)
                    arg.set()
                elif what == "stop":
                    return
            except Exception as exc:  # the writer must outlive any one bad command
                log.warning("prefix cache: SSD %s failed: %r", what, exc)
                if isinstance(arg, _Write):
                    self._done.put(("failed", arg.key, arg.seq))

    def _write(self, write: _Write, on_disk: set[str]) -> None:
        if write.parent is not None and write.parent not in on_disk:
            self._done.put(("failed", write.key, write.seq))  # its parent never made it
            return
        path = self._path(write.key)
        path.parent.mkdir(exist_ok=True)
        write_durably(path, encode_block(write.metadata, write.tensors))
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT OR REPLACE INTO blocks (key, parent, num_bytes, last_used, token_ids) "
                "VALUES (?, ?, ?, ?, ?)",
                (write.key, write.parent, write.num_bytes, write.last_used, write.token_ids),
            )
        on_disk.add(write.key)
        self._done.put(("written", write.key, write.seq))

    def _delete(self, key: str, on_disk: set[str]) -> None:
        # The row goes first: a crash in between leaves a stray file, never a row without one.
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM blocks WHERE key = ?", (key,))
        on_disk.discard(key)
        self._path(key).unlink(missing_ok=True)

    def _remove_strays(self, on_disk: set[str]) -> None:
        """Delete temp files and files without a row (a crash between rename and commit)."""
        for sub in self._blocks_dir.iterdir():
            if not sub.is_dir():
                continue
            for file in sub.iterdir():
                name = file.name
                if name.endswith(TEMP_SUFFIX) or name.removesuffix(".safetensors") not in on_disk:
                    file.unlink(missing_ok=True)
