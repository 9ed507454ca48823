"""HTML (.html, .htm, .xhtml) with the standard library's tolerant `html.parser`.

Keeps the page title and the text of headings, paragraphs, list items, table rows and <pre>
blocks; drops scripts, styles, inline SVG and MathML, forms, and site chrome: <nav>, <footer>,
ARIA navigation/banner roles, and elements whose class or id says nav, menu, sidebar,
breadcrumb, toc, banner, tagline or nosearch/noindex.
Headings h1-h6 give each block its heading path. Malformed HTML (unclosed <p>, <li>) is normal.
"""

from __future__ import annotations

import codecs
import re
from html.parser import HTMLParser
from pathlib import Path

from ingest.errors import LoadError
from ingest.loaders.base import (
    DocumentBuilder,
    HeadingStack,
    Loader,
    collapse_whitespace,
    decode_text,
)
from ingest.records import LoadedDocument

_DROPPED_TAGS = frozenset(
    {
        "script", "style", "svg", "math", "noscript", "template", "nav", "footer",
        "form", "button", "select", "textarea", "iframe", "object", "canvas",
    }
)  # fmt: skip
_DROPPED_ROLES = frozenset({"navigation", "menu", "menubar", "banner", "contentinfo", "search"})
# Words in a class or id that mark site chrome: navigation, banners, "do not index" wrappers.
_CHROME_WORDS = frozenset(
    {"nav", "navbar", "navigation", "menu", "mainmenu", "submenu", "sidebar", "breadcrumb",
     "breadcrumbs", "toc", "pagination", "skip", "banner", "masthead", "tagline", "nosearch",
     "noindex"}
)  # fmt: skip
_BLOCK_TAGS = frozenset(
    {
        "p", "div", "section", "article", "main", "header", "aside", "li", "ul", "ol", "dl",
        "dt", "dd", "table", "tr", "thead", "tbody", "tfoot", "caption", "pre", "blockquote",
        "br", "hr", "figure", "figcaption", "address", "details", "summary", "body", "center",
    }
)  # fmt: skip
_VOID_TAGS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
     "source", "track", "wbr"}
)  # fmt: skip
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
_CELL_TAGS = frozenset({"td", "th"})
_WORD_SPLIT = re.compile(r"[\s_-]+")
_META_CHARSET = re.compile(rb"""charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)


def _is_chrome(tag: str, attrs: list[tuple[str, str | None]]) -> bool:
    if tag in _DROPPED_TAGS:
        return True
    for name, value in attrs:
        if not value:
            continue
        if name == "role" and value.strip().lower() in _DROPPED_ROLES:
            return True
        if name in ("class", "id") and _CHROME_WORDS.intersection(_WORD_SPLIT.split(value.lower())):
            return True
        if name == "aria-hidden" and value.lower() == "true":
            return True
    return False


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.builder = DocumentBuilder()
        self.headings = HeadingStack()
        self.title: str | None = None
        self.first_h1: str | None = None
        self._stack: list[tuple[str, bool]] = []  # open elements: (tag, dropped here)
        self._num_dropped = 0  # open dropped elements; text is kept only at 0
        self._in_title = False
        self._title_parts: list[str] = []
        self._pre_depth = 0
        self._heading_level = 0
        self._buffer: list[str] = []

    # -- text ----------------------------------------------------------------------------

    def _flush(self) -> None:
        raw = "".join(self._buffer)
        self._buffer = []
        if self._heading_level:
            return  # heading text is flushed by its end tag
        text = raw.strip("\n") if self._pre_depth else collapse_whitespace(raw)
        self.builder.add(text, heading_path=self.headings.path)

    def _end_heading(self) -> None:
        text = collapse_whitespace("".join(self._buffer))
        self._buffer = []
        level, self._heading_level = self._heading_level, 0
        if not text:
            return
        if level == 1 and self.first_h1 is None:
            self.first_h1 = text
        path = self.headings.push(level, text)
        self.builder.add(text, heading_path=path, is_heading=True)

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self._title_parts.append(data)
        elif self._num_dropped == 0:
            self._buffer.append(data)

    # -- tags ----------------------------------------------------------------------------

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title" and self.title is None and not self._in_graphics():
            self._in_title = True
            return
        if tag in _VOID_TAGS:
            if tag in _BLOCK_TAGS and self._num_dropped == 0 and not self._heading_level:
                self._flush()
            return
        dropped = _is_chrome(tag, attrs)
        self._stack.append((tag, dropped))
        if dropped:
            self._num_dropped += 1
        if self._num_dropped:
            return
        if tag in _HEADINGS:
            self._flush()
            self._heading_level = _HEADINGS[tag]
        elif tag in _BLOCK_TAGS and not self._heading_level:
            self._flush()
            if tag == "pre":
                self._pre_depth += 1
        elif tag in _CELL_TAGS and "".join(self._buffer).strip():
            self._buffer.append(" | ")

    def _in_graphics(self) -> bool:
        return any(
            tag in ("svg", "math") for tag, _ in self._stack
        )  # their <title> is no page title

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS and self._num_dropped == 0 and not self._heading_level:
            self._flush()  # <br/>, <hr/>

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            if self._in_title:
                self._in_title = False
                self.title = collapse_whitespace("".join(self._title_parts)) or None
            return
        if not any(open_tag == tag for open_tag, _ in self._stack):
            return  # a stray end tag: ignore, as browsers do
        while self._stack:
            open_tag, dropped = self._stack.pop()
            if dropped:
                self._num_dropped -= 1
            elif self._num_dropped == 0:
                self._close(open_tag)
            if open_tag == tag:
                break

    def _close(self, tag: str) -> None:
        if tag in _HEADINGS and self._heading_level:
            self._end_heading()
        elif tag in _BLOCK_TAGS and not self._heading_level:
            self._flush()
            if tag == "pre" and self._pre_depth:
                self._pre_depth -= 1

    def finish(self) -> None:
        self.close()
        if self._heading_level:
            self._end_heading()
        self._flush()


def decode_html(data: bytes) -> str:
    """UTF-8 first; else the charset the page declares in its first 4 KB (<meta charset>)."""
    try:
        return decode_text(data)
    except LoadError as utf8_error:
        declared = _META_CHARSET.search(data[:4096])
        if declared is None:
            raise
        encoding = declared.group(1).decode("ascii")
        try:
            codecs.lookup(encoding)
            return data.decode(encoding).replace("\r\n", "\n").replace("\r", "\n")
        except (LookupError, UnicodeDecodeError) as exc:
            raise LoadError(f"{utf8_error}; declared charset {encoding!r} fails too") from exc


def load_html(data: bytes, path: Path) -> LoadedDocument:
    text = decode_html(data)
    extractor = _TextExtractor()
    extractor.feed(text)
    extractor.finish()
    return extractor.builder.build(title=extractor.title or extractor.first_h1, kind="html")


HTML_LOADER = Loader("html", 1, (".html", ".htm", ".xhtml"), load_html)
