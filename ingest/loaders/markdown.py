"""Markdown (.md, .markdown): blocks between blank lines, ATX and setext headings, fenced code.

The document text is the file's own text (newlines normalised), so chunk spans are file spans;
a YAML front matter block is not indexed, but its `title:` is used. Headings inside fenced code
are code, not headings. Everything else (lists, tables, inline markup) stays as written: the
embedder reads markdown fine.
"""

from __future__ import annotations

import re
from pathlib import Path

from ingest.errors import LoadError
from ingest.loaders.base import HeadingStack, Loader, decode_text, require_text
from ingest.records import Block, LoadedDocument

_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_THEMATIC_BREAK = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_FRONT_MATTER_TITLE = re.compile(r"^title:\s*(.+?)\s*$", re.MULTILINE)
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_MARKUP = re.compile(r"[*_`]+")


def heading_text(raw: str) -> str:
    """'**Install** [guide](x.md)' -> 'Install guide'."""
    return _MARKUP.sub("", _LINK.sub(r"\1", raw)).strip()


def _front_matter(text: str) -> tuple[int, str | None]:
    """(offset where the body starts, title) for a leading '---' YAML block."""
    if not text.startswith("---\n"):
        return 0, None
    match = re.search(r"^(---|\.\.\.)[ \t]*$", text[4:], re.MULTILINE)
    if match is None:
        return 0, None
    block = text[4 : 4 + match.start()]
    title = _FRONT_MATTER_TITLE.search(block)
    value = title.group(1).strip("\"'") if title else None
    return 4 + match.end(), value


class _Parser:
    """A line scanner that emits blocks as spans of the text."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.blocks: list[Block] = []
        self.headings = HeadingStack()
        self.first_h1: str | None = None
        self._para_start: int | None = None  # open paragraph span
        self._para_end = 0

    def _flush(self) -> None:
        if self._para_start is not None:
            self.blocks.append(Block(self._para_start, self._para_end, self.headings.path))
        self._para_start = None

    def _heading(self, level: int, title: str, start: int, end: int) -> None:
        title = heading_text(title)
        if not title:
            return
        if level == 1 and self.first_h1 is None:
            self.first_h1 = title
        path = self.headings.push(level, title)
        self.blocks.append(Block(start, end, path, is_heading=True))

    def parse(self, start: int) -> None:
        text = self.text
        lines = text[start:].split("\n")
        position = start
        fence: str | None = None
        fence_start = 0
        for line in lines:
            line_start, line_end = position, position + len(line)
            position = line_end + 1
            if fence is not None:
                stripped = line.strip()
                if stripped.startswith(fence) and set(stripped) == {fence[0]}:
                    self.blocks.append(Block(fence_start, line_end, self.headings.path))
                    fence = None
                continue
            fence_match = _FENCE.match(line)
            if fence_match:
                self._flush()
                fence, fence_start = fence_match.group(1), line_start
                continue
            if not line.strip():
                self._flush()
                continue
            atx = _ATX.match(line)
            if atx:
                self._flush()
                self._heading(len(atx.group(1)), atx.group(2) or "", line_start, line_end)
                continue
            setext = _SETEXT.match(line)
            if setext and self._para_start is not None:
                level = 1 if setext.group(1)[0] == "=" else 2
                raw = text[self._para_start : self._para_end]
                para_start = self._para_start
                self._para_start = None
                self._heading(level, " ".join(raw.split()), para_start, line_end)
                continue
            if _THEMATIC_BREAK.match(line):
                self._flush()
                continue
            if self._para_start is None:
                self._para_start = line_start + (len(line) - len(line.lstrip()))
            self._para_end = line_start + len(line.rstrip())
        if fence is not None:  # unclosed fence: keep what is there
            self.blocks.append(Block(fence_start, len(text), self.headings.path))
        self._flush()


def load_markdown(data: bytes, path: Path) -> LoadedDocument:
    text = decode_text(data)
    require_text(text)
    body_start, front_title = _front_matter(text)
    parser = _Parser(text)
    parser.parse(body_start)
    blocks = [block for block in parser.blocks if text[block.start : block.end].strip()]
    if not blocks:
        raise LoadError("empty: only front matter, no text")
    return LoadedDocument(text, blocks, front_title or parser.first_h1, "markdown")


MARKDOWN_LOADER = Loader("markdown", 1, (".md", ".markdown"), load_markdown)
