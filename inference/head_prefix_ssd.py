"""SSD tier of the head prefix store: the MTP head's context over prompts survives a restart.

    <cache root>/<model fingerprint>/mtp-head/<head fingerprint>/
        <blake2b of the prompt's tokens>.safetensors    one prompt (kv_ssd_format.py's checked
                                                        file): hiddens, keys.i, values.i
        <...>.safetensors.tmp                           a write that did not finish

The prompt's token ids travel in the header's metadata (base64 int32), so start-up reads only
headers to know what is on disk; a restore reads one file and checks it whole (checksums,
fingerprint, key). Writes run on a writer thread, durably (durable_file.py), so a crash leaves
at worst a temp file, deleted at the next start; a file that fails its checks
is a miss and is deleted. Least recently used files go past the byte budget (a restore touches
its file's mtime, so the order survives restarts). The folder sits inside the trunk's SSD
prefix-cache folder, whose lock (kv_ssd.py) makes one engine its only user.

Ignores: what is worth keeping and the RAM copy (head_prefix_store.py), MLX arrays.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import queue
import struct
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from inference.durable_file import TEMP_SUFFIX, write_durably
from inference.kv_ssd_format import HostTensor, decode_block, encode_block

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "mtp-head-prefix-1"
DEFAULT_HEAD_PREFIX_SSD_BYTES = 512 << 20
_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class _OnDisk:
    tokens: np.ndarray  # int32 x_0 .. x_{P-1}
    num_bytes: int


def prompt_key(tokens: np.ndarray) -> str:
    return hashlib.blake2b(np.asarray(tokens, np.int32).tobytes(), digest_size=16).hexdigest()


class HeadPrefixSSD:
    """Prompts' head context on disk for one (model, head) pair; any thread may call it."""

    def __init__(self, folder: Path, head_fingerprint: str, max_bytes: int) -> None:
        self.folder = folder
        self.fingerprint = head_fingerprint
        self.max_bytes = max_bytes
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._files: OrderedDict[str, _OnDisk] = OrderedDict()  # least recently used first
        self.num_bytes = 0
        self._scan()
        self._commands: queue.Queue[tuple[str, object] | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_main, name="head-ssd", daemon=True)
        self._writer.start()

    def __len__(self) -> int:
        return len(self._files)

    def write(
        self, tokens: np.ndarray, hiddens: HostTensor, layers: list[tuple[HostTensor, HostTensor]]
    ) -> None:
        """Queue one prompt's context for disk; prompts it extends are deleted once it lands."""
        tokens = np.asarray(tokens, np.int32)
        key = prompt_key(tokens)
        tensors = {"hiddens": hiddens}
        for i, (keys, values) in enumerate(layers):
            tensors[f"keys.{i}"], tensors[f"values.{i}"] = keys, values
        with self._lock:
            if key in self._files:
                return
        self._commands.put(("write", (key, tokens, tensors)))

    def find(self, tokens: np.ndarray) -> tuple[np.ndarray, dict[str, HostTensor]] | None:
        """The stored prompt (its tokens and tensors) that starts with `tokens`, most recently
        used first, read and checked now; None on a miss or a file that fails its checks."""
        need = np.asarray(tokens, np.int32)
        with self._lock:
            candidates = [
                (key, entry.tokens)
                for key, entry in reversed(self._files.items())
                if len(entry.tokens) >= len(need)
                and np.array_equal(entry.tokens[: len(need)], need)
            ]
        for key, stored_tokens in candidates:
            path = self.folder / (key + _SUFFIX)
            try:
                tensors = decode_block(path.read_bytes(), {"format": FORMAT, "key": key,
                                                          "fingerprint": self.fingerprint})  # fmt: skip
            except (OSError, ValueError, KeyError) as exc:
                log.warning("head prefix %s unreadable (%s): deleted", path.name, exc)
                self._commands.put(("delete", key))
                with self._lock:
                    self._forget(key)
                continue
            with self._lock:
                if key in self._files:
                    self._files.move_to_end(key)
            self._commands.put(("touch", key))
            return stored_tokens, tensors
        return None

    def flush(self) -> None:
        """Wait for the queued writes (tests, shutdown)."""
        self._commands.join()

    def close(self) -> None:
        self._commands.put(None)
        self._writer.join()

    # -- start-up ---------------------------------------------------------------------------------

    def _scan(self) -> None:
        """Index the files by their headers (oldest mtime first); leftovers of a crash go."""
        found: list[tuple[float, str, _OnDisk]] = []
        for path in self.folder.iterdir():
            if path.name.endswith(TEMP_SUFFIX):
                path.unlink(missing_ok=True)
                continue
            if not path.name.endswith(_SUFFIX):
                continue
            key = path.name[: -len(_SUFFIX)]
            try:
                tokens = _header_tokens(path, key, self.fingerprint)
                stat = path.stat()
            except (OSError, ValueError, KeyError) as exc:
                log.info("head prefix %s skipped and deleted: %s", path.name, exc)
                path.unlink(missing_ok=True)
                continue
            found.append((stat.st_mtime, key, _OnDisk(tokens, stat.st_size)))
        for _, key, entry in sorted(found, key=lambda item: item[0]):
            self._files[key] = entry
            self.num_bytes += entry.num_bytes

    # -- the writer thread ------------------------------------------------------------------------

    def _write_main(self) -> None:
        while True:
            command = self._commands.get()
            try:
                if command is None:
                    return
                kind, payload = command
                if kind == "write":
                    self._write(*payload)  # type: ignore[misc]
                elif kind == "delete":
                    (self.folder / (str(payload) + _SUFFIX)).unlink(missing_ok=True)
                elif kind == "touch":
                    os.utime(self.folder / (str(payload) + _SUFFIX))
            except OSError as exc:  # a full or failing disk: the RAM copy still serves
                log.warning("head prefix store on %s: %s", self.folder, exc)
            finally:
                self._commands.task_done()

    def _write(self, key: str, tokens: np.ndarray, tensors: Mapping[str, HostTensor]) -> None:
        with self._lock:
            if key in self._files:  # queued twice
                return
        metadata = {
            "format": FORMAT,
            "key": key,
            "fingerprint": self.fingerprint,
            "token_ids": base64.b64encode(tokens.tobytes()).decode(),
        }
        parts = encode_block(metadata, tensors)
        size = sum(len(part) for part in parts)
        if size > self.max_bytes:
            return
        write_durably(self.folder / (key + _SUFFIX), parts)
        with self._lock:
            extended = [
                old_key
                for old_key, old in self._files.items()
                if len(old.tokens) <= len(tokens)
                and np.array_equal(old.tokens, tokens[: len(old.tokens)])
            ]
            for old_key in extended:
                self._forget(old_key)
            self._files[key] = _OnDisk(tokens, size)
            self.num_bytes += size
            evicted = []
            while self.num_bytes > self.max_bytes:
                oldest = next(iter(self._files))
                self._forget(oldest)
                evicted.append(oldest)
        for old_key in extended + evicted:
            (self.folder / (old_key + _SUFFIX)).unlink(missing_ok=True)

    def _forget(self, key: str) -> None:
        entry = self._files.pop(key, None)
        if entry is not None:
            self.num_bytes -= entry.num_bytes


def _header_tokens(path: Path, key: str, fingerprint: str) -> np.ndarray:
    """The token ids a file's header names, after checking its format, key and head."""
    with open(path, "rb") as file:
        start = file.read(8)
        if len(start) < 8:
            raise ValueError(f"file of {len(start)} bytes has no header")
        (length,) = struct.unpack("<Q", start)
        if length > 1 << 26:
            raise ValueError(f"header of {length} bytes")
        metadata = json.loads(file.read(length))["__metadata__"]
    expected = {"format": FORMAT, "key": key, "fingerprint": fingerprint}
    for name, value in expected.items():
        if metadata.get(name) != value:
            raise ValueError(f"metadata {name}: got {metadata.get(name)!r}, wanted {value!r}")
    tokens = np.frombuffer(base64.b64decode(metadata["token_ids"]), np.int32)
    if prompt_key(tokens) != key:
        raise ValueError("token ids do not match the file's key")
    return tokens
