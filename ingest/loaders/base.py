"""What every loader shares: the Loader record, decoding bytes to text, and assembling blocks.

A loader turns a file's bytes into a `LoadedDocument` (text + blocks with heading paths and
pages) or raises `LoadError` with a reason a user can read. Loaders know nothing about tokens,
chunks or the index.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ingest.errors import LoadError
from ingest.records import Block, LoadedDocument

BLOCK_SEPARATOR = "\n\n"
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Loader:
    """One file format. Bump `version` when its output changes: stored files get re-chunked."""

    name: str
    version: int
    suffixes: tuple[str, ...]  # lower case, with the dot
    load: Callable[[bytes, Path], LoadedDocument]


def decode_text(data: bytes) -> str:
    """Strict UTF-8 (a BOM is allowed; UTF-16 only with a BOM), newlines normalised to '\\n'."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise LoadError(f"invalid UTF-16 text: {exc.reason} at byte {exc.start}") from exc
    else:
        if b"\x00" in data:
            raise LoadError("binary data (NUL bytes), not a text file")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise LoadError(
                f"not UTF-8 text: invalid byte 0x{data[exc.start]:02x} at offset {exc.start} "
                "(convert it, e.g. `iconv -f latin1 -t utf-8`)"
            ) from exc
    if _looks_binary(text):
        raise LoadError("binary data (control characters), not a text file")
    return normalise_newlines(text)


def _looks_binary(text: str, sample: int = 10_000) -> bool:
    """More than 1% control characters in the first `sample` characters.

    Whitespace and ESC (colour codes in logs) do not count.
    """
    head = text[:sample]
    controls = sum(1 for ch in head if (ch < " " and ch not in "\n\r\t\f\v\x1b") or ch == "\x7f")
    return controls > len(head) / 100


def normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def require_text(text: str) -> None:
    if not text.strip():
        raise LoadError("empty: no text in the file")


def collapse_whitespace(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


class HeadingStack:
    """The current heading path: a level-n heading replaces everything at level >= n."""

    def __init__(self) -> None:
        self._entries: list[tuple[int, str]] = []

    def push(self, level: int, text: str) -> tuple[str, ...]:
        while self._entries and self._entries[-1][0] >= level:
            self._entries.pop()
        self._entries.append((level, text))
        return self.path

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(text for _, text in self._entries)


class DocumentBuilder:
    """Joins extracted blocks with blank lines into one text and records each block's span."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._blocks: list[Block] = []
        self._length = 0

    def add(
        self,
        text: str,
        *,
        heading_path: tuple[str, ...] = (),
        page: int | None = None,
        is_heading: bool = False,
    ) -> None:
        text = text.strip()
        if not text:
            return
        if self._parts:
            self._parts.append(BLOCK_SEPARATOR)
            self._length += len(BLOCK_SEPARATOR)
        start = self._length
        self._parts.append(text)
        self._length += len(text)
        self._blocks.append(Block(start, self._length, heading_path, page, is_heading))

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    def build(self, *, title: str | None, kind: str) -> LoadedDocument:
        if not self._blocks:
            raise LoadError("empty: no text found")
        return LoadedDocument("".join(self._parts), self._blocks, title or None, kind)
