"""Word documents (.docx) with the standard library: a DOCX is a zip of WordprocessingML XML.

Reads paragraphs and tables from word/document.xml in order; 'Heading N' styles (or an outline
level) become the heading path, the 'Title' style or docProps/core.xml gives the title. No
python-docx dependency: it would add lxml for the few elements read here. Legacy .doc is not
supported (it is not XML).
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from xml.etree import ElementTree

from ingest.errors import LoadError
from ingest.loaders.base import DocumentBuilder, HeadingStack, Loader, collapse_whitespace
from ingest.records import LoadedDocument

_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
_DC_TITLE = "{http://purl.org/dc/elements/1.1/}title"
_HEADING_STYLE = re.compile(r"heading\s*(\d)", re.IGNORECASE)


def _paragraph_text(paragraph: ElementTree.Element) -> str:
    parts = []
    for node in paragraph.iter():
        if node.tag == f"{_W}t" and node.text:
            parts.append(node.text)
        elif node.tag == f"{_W}tab":
            parts.append("\t")
        elif node.tag in (f"{_W}br", f"{_W}cr"):
            parts.append("\n")
    return "".join(parts)


def _style(paragraph: ElementTree.Element) -> tuple[str, int | None]:
    """(style id, heading level or None)."""
    properties = paragraph.find(f"{_W}pPr")
    if properties is None:
        return "", None
    style_node = properties.find(f"{_W}pStyle")
    style = style_node.get(f"{_W}val", "") if style_node is not None else ""
    match = _HEADING_STYLE.fullmatch(style.replace(" ", ""))
    if match:
        return style, int(match.group(1))
    outline = properties.find(f"{_W}outlineLvl")
    if outline is not None and outline.get(f"{_W}val", "").isdigit():
        level = int(outline.get(f"{_W}val", "0")) + 1
        return style, level if level <= 9 else None
    return style, None


def load_docx(data: bytes, path: Path) -> LoadedDocument:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        body_xml = archive.read("word/document.xml")
        core_xml = (
            archive.read("docProps/core.xml") if "docProps/core.xml" in archive.namelist() else None
        )
        root = ElementTree.fromstring(body_xml)
    except zipfile.BadZipFile as exc:
        raise LoadError("not a DOCX zip archive (corrupt, or password-protected)") from exc
    except KeyError as exc:
        raise LoadError("not a Word document: word/document.xml is missing") from exc
    except ElementTree.ParseError as exc:
        raise LoadError(f"corrupt DOCX XML: {exc}") from exc

    title = None
    if core_xml is not None:
        try:
            node = ElementTree.fromstring(core_xml).find(_DC_TITLE)
            title = collapse_whitespace(node.text or "") if node is not None else None
        except ElementTree.ParseError:
            pass  # the title is optional; the body parsed fine

    builder = DocumentBuilder()
    headings = HeadingStack()
    body = root.find(f"{_W}body")
    for element in body if body is not None else []:
        if element.tag == f"{_W}p":
            text = _paragraph_text(element).strip()
            style, level = _style(element)
            if not text:
                continue
            if style.lower() == "title":
                title = title or collapse_whitespace(text)
                builder.add(text, heading_path=headings.path, is_heading=True)
            elif level is not None:
                path = headings.push(level, collapse_whitespace(text))
                builder.add(text, heading_path=path, is_heading=True)
            else:
                builder.add(text, heading_path=headings.path)
        elif element.tag == f"{_W}tbl":
            for row in element.iter(f"{_W}tr"):
                cells = [
                    collapse_whitespace(" ".join(_paragraph_text(p) for p in cell.iter(f"{_W}p")))
                    for cell in row.iter(f"{_W}tc")
                ]
                builder.add(" | ".join(cell for cell in cells if cell), heading_path=headings.path)
    return builder.build(title=title, kind="docx")


DOCX_LOADER = Loader("docx", 1, (".docx",), load_docx)
