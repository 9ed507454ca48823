"""PDF (.pdf) with pypdf: text per page, page numbers kept, headings from the PDF's outline.

Paragraphs are split at blank lines in pypdf's extracted text; a page is never merged with the
next one, so every block (and chunk) has one page number. Encrypted files open only when they
have an empty user password; scanned PDFs without a text layer are reported (no OCR here).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

from ingest.errors import LoadError
from ingest.loaders.base import DocumentBuilder, Loader, normalise_newlines
from ingest.loaders.text import paragraph_blocks
from ingest.records import LoadedDocument

# pypdf logs every recoverable defect of a file as a warning; failures reach us as exceptions.
logging.getLogger("pypdf").setLevel(logging.ERROR)


def _outline_starts(reader: Any) -> list[tuple[int, tuple[str, ...]]]:
    """(0-based page, heading path) for each outline entry, sorted by page."""
    starts: list[tuple[int, tuple[str, ...]]] = []

    def walk(items: list[Any], parents: tuple[str, ...]) -> None:
        last: tuple[str, ...] = parents
        for item in items:
            if isinstance(item, list):
                walk(item, last)
                continue
            title = " ".join(str(getattr(item, "title", "") or "").split())
            if not title:
                continue
            last = (*parents, title)
            page = reader.get_destination_page_number(item)
            if page is not None and page >= 0:
                starts.append((page, last))

    try:
        walk(reader.outline, ())
    except Exception:  # a broken outline is common and never worth failing the file for
        return []
    return sorted(starts, key=lambda start: start[0])


def load_pdf(data: bytes, path: Path) -> LoadedDocument:
    import pypdf
    from pypdf.errors import DependencyError, PdfReadError

    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                unlocked = reader.decrypt("")
            except DependencyError as exc:
                raise LoadError("encrypted PDF (AES): pip install cryptography to read it") from exc
            if not unlocked:
                raise LoadError("encrypted PDF: it needs a password")
        pages = list(reader.pages)
        title = None
        if reader.metadata is not None and reader.metadata.title:
            title = " ".join(str(reader.metadata.title).split()) or None
        outline = _outline_starts(reader)
    except LoadError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        raise LoadError(f"corrupt PDF: {exc}") from exc

    builder = DocumentBuilder()
    heading_path: tuple[str, ...] = ()
    next_outline = 0
    for number, page in enumerate(pages, start=1):
        while next_outline < len(outline) and outline[next_outline][0] <= number - 1:
            heading_path = outline[next_outline][1]
            next_outline += 1
        try:
            text = normalise_newlines(page.extract_text() or "")
        except Exception as exc:  # pypdf raises many types on broken content streams
            raise LoadError(f"corrupt PDF: page {number}: {exc}") from exc
        for block in paragraph_blocks(text):
            builder.add(text[block.start : block.end], heading_path=heading_path, page=number)
    if builder.num_blocks == 0:
        raise LoadError(
            f"no extractable text in {len(pages)} page(s): a scanned PDF? (OCR is not supported)"
        )
    return builder.build(title=title, kind="pdf")


PDF_LOADER = Loader("pdf", 1, (".pdf",), load_pdf)
