"""Each loader on real sample files: text, structure, titles, pages, and the reasons for refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.errors import LoadError
from ingest.loaders import SUPPORTED_SUFFIXES, loader_for
from ingest.records import LoadedDocument
from tests.fixtures.ingest_files import SAMPLE_HTML, write_docx, write_pdf


def load(path: Path) -> LoadedDocument:
    loader = loader_for(path)
    assert loader is not None, path
    return loader.load(path.read_bytes(), path)


def block_texts(doc: LoadedDocument) -> list[str]:
    return [doc.text[b.start : b.end] for b in doc.blocks]


def test_registry_by_suffix_case_insensitive() -> None:
    assert loader_for("a/B.MD").name == "markdown"
    assert loader_for("x.htm").name == "html"
    assert loader_for("x.pdf").name == "pdf"
    assert loader_for("x.docx").name == "docx"
    assert loader_for("notes.txt").name == "text"
    assert loader_for("image.png") is None
    assert loader_for("Makefile") is None
    assert {".txt", ".md", ".html", ".htm", ".pdf", ".docx"} <= SUPPORTED_SUFFIXES


def test_text_paragraph_spans_are_spans_of_the_file(tmp_path: Path) -> None:
    raw = "First paragraph\nstill first.\r\n\r\n\n  Second one.\n\n\n"
    path = tmp_path / "a.txt"
    path.write_bytes(raw.encode())
    doc = load(path)
    assert block_texts(doc) == ["First paragraph\nstill first.", "Second one."]
    assert doc.text == raw.replace("\r\n", "\n")  # the file's own text
    assert doc.title is None and doc.kind == "text"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"  \n\t\n", "empty"),
        ("caf\u00e9 latin-1".encode("latin-1"), "not UTF-8"),
        (b"abc\x00\x01\x02", "binary"),
    ],
)
def test_text_refusals_say_why(tmp_path: Path, data: bytes, reason: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    with pytest.raises(LoadError, match=reason):
        load(path)


def test_text_accepts_utf8_bom_and_utf16_bom(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfhello")
    (tmp_path / "b.txt").write_bytes("h\u00e9llo".encode("utf-16"))
    assert load(tmp_path / "a.txt").text == "hello"
    assert load(tmp_path / "b.txt").text == "h\u00e9llo"


MARKDOWN = """---
title: "Front Title"
tags: [a]
---
# Top heading

Intro paragraph
on two lines.

Setext Section
--------------

```python
# a comment, not a heading

print("hi")
```

### Deep **bold** [link](x.md) ###
- item one
- item two

***

Tail.
"""


def test_markdown_headings_fences_front_matter(tmp_path: Path) -> None:
    path = tmp_path / "guide.md"
    path.write_text(MARKDOWN)
    doc = load(path)
    assert doc.title == "Front Title"
    assert doc.text == MARKDOWN  # spans are spans of the file
    headings = [(b.heading_path, doc.text[b.start : b.end]) for b in doc.blocks if b.is_heading]
    assert headings == [
        (("Top heading",), "# Top heading"),
        (("Top heading", "Setext Section"), "Setext Section\n--------------"),
        (("Top heading", "Setext Section", "Deep bold link"), "### Deep **bold** [link](x.md) ###"),
    ]
    body = {doc.text[b.start : b.end]: b.heading_path for b in doc.blocks if not b.is_heading}
    fence = '```python\n# a comment, not a heading\n\nprint("hi")\n```'
    assert body[fence] == ("Top heading", "Setext Section")
    assert body["Intro paragraph\non two lines."] == ("Top heading",)
    assert body["Tail."] == ("Top heading", "Setext Section", "Deep bold link")
    assert "title:" not in "".join(block_texts(doc))
    assert "***" not in block_texts(doc)


def test_markdown_title_falls_back_to_first_h1(tmp_path: Path) -> None:
    path = tmp_path / "x.md"
    path.write_text("Some intro.\n\n# Real Title\n\ntext\n\n# Second\n")
    assert load(path).title == "Real Title"


def test_html_drops_scripts_styles_svg_navigation(tmp_path: Path) -> None:
    path = tmp_path / "page.html"
    path.write_text(SAMPLE_HTML)
    doc = load(path)
    assert doc.title == "Harbour Tides & Ferries"
    for hidden in ("SCRIPT_SECRET", "color:", "SVG_TITLE", "SVG_TEXT", "NAVLINK", "SIDEBAR_LINK",
                   "FOOTER_TEXT", "NOSCRIPT_TEXT", "TAGLINE_TEXT", "BANNER_TEXT", "NOSEARCH_TEXT"):  # fmt: skip
        assert hidden not in doc.text, hidden
    texts = block_texts(doc)
    assert (
        "The morning ferry leaves the north pier at 07:15 & arrives at 08:05. It carries bicycles free of charge."
        in texts
    )
    assert "First item of an unclosed list" in texts and "Second item" in texts
    assert "Wind | Service" in texts and "Gale | Suspended" in texts
    assert "timetable.txt\n    07:15  north pier" in texts  # <pre> keeps its lines
    by_text = {doc.text[b.start : b.end]: b for b in doc.blocks}
    assert by_text["Storm days"].is_heading
    assert by_text["Gale | Suspended"].heading_path == (
        "Ferry timetable",
        "Winter schedule",
        "Storm days",
    )
    assert by_text["Cash only."].heading_path == ("Ferry timetable", "Tickets")


def test_html_declared_charset_is_honoured(tmp_path: Path) -> None:
    page = '<html><head><meta charset="iso-8859-1"><title>Caf\u00e9</title></head><body><p>cr\u00e8me</p></body></html>'
    path = tmp_path / "latin.htm"
    path.write_bytes(page.encode("latin-1"))
    doc = load(path)
    assert doc.title == "Caf\u00e9" and block_texts(doc) == ["cr\u00e8me"]


def test_html_without_text_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "blank.html"
    path.write_text(
        "<html><head><title>t</title><script>x=1</script></head><body><nav>menu</nav></body></html>"
    )
    with pytest.raises(LoadError, match="empty"):
        load(path)


def test_pdf_pages_title_and_outline(tmp_path: Path) -> None:
    path = write_pdf(
        tmp_path / "report.pdf",
        [["Intro line one.", "Intro line two."], ["Second page (with parens)."], ["Third page."]],
        title="Quarterly Report",
        outline=[("Chapter A", 0), ("Chapter B", 2)],
    )
    doc = load(path)
    assert doc.title == "Quarterly Report" and doc.kind == "pdf"
    pages = [(b.page, b.heading_path, doc.text[b.start : b.end]) for b in doc.blocks]
    assert pages == [
        (1, ("Chapter A",), "Intro line one.\nIntro line two."),
        (2, ("Chapter A",), "Second page (with parens)."),
        (3, ("Chapter B",), "Third page."),
    ]


def test_pdf_encrypted_with_password_is_refused(tmp_path: Path) -> None:
    path = write_pdf(tmp_path / "secret.pdf", [["classified"]], password="hunter2")
    with pytest.raises(LoadError, match="password"):
        load(path)


def test_pdf_corrupt_and_textless(tmp_path: Path) -> None:
    good = write_pdf(tmp_path / "good.pdf", [["hello world"]]).read_bytes()
    (tmp_path / "truncated.pdf").write_bytes(good[: len(good) // 3])
    (tmp_path / "garbage.pdf").write_bytes(b"%PDF-1.4\nnot really a pdf\n")
    for name in ("truncated.pdf", "garbage.pdf"):
        with pytest.raises(LoadError):
            load(tmp_path / name)
    blank = write_pdf(tmp_path / "scan.pdf", [[], []])
    with pytest.raises(LoadError, match="no extractable text"):
        load(blank)


def test_docx_headings_table_title(tmp_path: Path) -> None:
    path = write_docx(
        tmp_path / "handbook.docx",
        [("Title", "Handbook"), ("Heading1", "Roles"), ("", "Guides greet visitors."),
         ("Heading2", "Operators"), ("", "Operators open the dome.")],
        title="",
        table=[["Role", "Training"], ["Guide", "one evening"]],
    )  # fmt: skip
    doc = load(path)
    assert doc.title == "Handbook"
    rows = [(b.heading_path, b.is_heading, doc.text[b.start : b.end]) for b in doc.blocks]
    assert rows == [
        ((), True, "Handbook"),
        (("Roles",), True, "Roles"),
        (("Roles",), False, "Guides greet visitors."),
        (("Roles", "Operators"), True, "Operators"),
        (("Roles", "Operators"), False, "Operators open the dome."),
        (("Roles", "Operators"), False, "Role | Training"),
        (("Roles", "Operators"), False, "Guide | one evening"),
    ]


def test_docx_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "locked.docx"
    path.write_bytes(b"\xd0\xcf\x11\xe0 an OLE file, e.g. a password-protected document")
    with pytest.raises(LoadError, match="zip"):
        load(path)
