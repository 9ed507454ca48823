"""Plain text (.txt, .text, .rst, .log): paragraphs are runs of lines between blank lines.

The document text is the file's own text (newlines normalised), so chunk spans are file spans.
"""

from __future__ import annotations

import re
from pathlib import Path

from ingest.loaders.base import Loader, decode_text, require_text
from ingest.records import Block, LoadedDocument

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")


def paragraph_blocks(text: str, start: int = 0, end: int | None = None) -> list[Block]:
    """Blocks for the non-blank paragraphs of text[start:end], as spans of `text`."""
    end = len(text) if end is None else end
    blocks = []
    position = start
    for match in _PARAGRAPH_BREAK.finditer(text, start, end):
        blocks.extend(_trimmed(text, position, match.start()))
        position = match.end()
    blocks.extend(_trimmed(text, position, end))
    return blocks


def _trimmed(text: str, start: int, end: int) -> list[Block]:
    piece = text[start:end]
    stripped = piece.strip()
    if not stripped:
        return []
    lead = len(piece) - len(piece.lstrip())
    return [Block(start + lead, start + lead + len(stripped))]


def load_text(data: bytes, path: Path) -> LoadedDocument:
    text = decode_text(data)
    require_text(text)
    return LoadedDocument(text, paragraph_blocks(text), None, "text")


TEXT_LOADER = Loader("text", 1, (".txt", ".text", ".rst", ".log"), load_text)
