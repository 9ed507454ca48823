"""File formats ingest reads, by suffix. Anything else is skipped and counted, never an error.

| suffix                          | loader   | library                          |
|---------------------------------|----------|----------------------------------|
| .txt .text .rst .log            | text     | -                                |
| .md .markdown                   | markdown | -                                |
| .html .htm .xhtml               | html     | html.parser (standard library)   |
| .pdf                            | pdf      | pypdf                            |
| .docx                           | docx     | zipfile + ElementTree (stdlib)   |
"""

from __future__ import annotations

from pathlib import Path

from ingest.loaders.base import Loader
from ingest.loaders.docx import DOCX_LOADER
from ingest.loaders.html import HTML_LOADER
from ingest.loaders.markdown import MARKDOWN_LOADER
from ingest.loaders.pdf import PDF_LOADER
from ingest.loaders.text import TEXT_LOADER

LOADERS: tuple[Loader, ...] = (TEXT_LOADER, MARKDOWN_LOADER, HTML_LOADER, PDF_LOADER, DOCX_LOADER)
_BY_SUFFIX = {suffix: loader for loader in LOADERS for suffix in loader.suffixes}
SUPPORTED_SUFFIXES: frozenset[str] = frozenset(_BY_SUFFIX)


def loader_for(path: Path | str) -> Loader | None:
    """The loader for a file name by its (case-insensitive) suffix, or None if unsupported."""
    return _BY_SUFFIX.get(Path(path).suffix.lower())


__all__ = ["LOADERS", "SUPPORTED_SUFFIXES", "Loader", "loader_for"]
