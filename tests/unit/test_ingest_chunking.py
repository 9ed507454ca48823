"""Chunking in the embedder's tokens: limits, overlap, structure, spans, and pathological input."""

from __future__ import annotations

import itertools
import re

import pytest

from ingest.chunking import ChunkLimits, chunk_document, make_limits
from ingest.loaders.base import DocumentBuilder
from ingest.loaders.text import paragraph_blocks
from ingest.records import Chunk, LoadedDocument
from tests.fixtures.ingest_fakes import HashingEmbedder

EMBEDDER = HashingEmbedder()
TOKENS = EMBEDDER.token_spans


def text_doc(text: str) -> LoadedDocument:
    return LoadedDocument(text, paragraph_blocks(text), None, "text")


def sentences(num: int, words: int = 9) -> str:
    return " ".join(
        f"Sentence {i} has " + " ".join(f"w{i}x{j}" for j in range(words)) + "." for i in range(num)
    )


def check_invariants(doc: LoadedDocument, chunks: list[Chunk], limits: ChunkLimits) -> None:
    for ordinal, chunk in enumerate(chunks):
        assert chunk.ordinal == ordinal
        assert doc.text[chunk.char_start : chunk.char_end] == chunk.text
        assert chunk.text == chunk.text.strip() and chunk.text
        assert chunk.num_tokens <= limits.max_tokens
        assert len(TOKENS(chunk.text)) <= limits.max_tokens  # standalone re-count too


def test_short_document_is_one_chunk() -> None:
    doc = text_doc("Hello there.\n\nA second paragraph.")
    chunks = chunk_document(doc, TOKENS, ChunkLimits(32, 4))
    assert [c.text for c in chunks] == ["Hello there.\n\nA second paragraph."]
    assert chunks[0].num_tokens == 7


def test_long_text_respects_limit_and_overlaps() -> None:
    doc = text_doc(sentences(40))
    limits = ChunkLimits(48, 8)
    chunks = chunk_document(doc, TOKENS, limits)
    check_invariants(doc, chunks, limits)
    assert len(chunks) > 5
    for previous, chunk in itertools.pairwise(chunks):
        assert chunk.char_start < previous.char_end  # overlap
        shared = doc.text[chunk.char_start : previous.char_end]
        assert 1 <= len(TOKENS(shared)) <= limits.overlap
    assert chunks[-1].char_end == len(doc.text)  # nothing lost at the end
    covered = set()
    for chunk in chunks:
        covered.update(range(chunk.char_start, chunk.char_end))
    assert all(i in covered for i in range(len(doc.text)) if not doc.text[i].isspace())


def test_cuts_prefer_sentence_ends() -> None:
    doc = text_doc(sentences(30))
    chunks = chunk_document(doc, TOKENS, ChunkLimits(40, 0))
    assert all(c.text.endswith(".") for c in chunks)


def test_cuts_prefer_paragraph_ends() -> None:
    paragraphs = [" ".join(f"p{p}w{i}" for i in range(20)) for p in range(6)]
    doc = text_doc("\n\n".join(paragraphs))
    chunks = chunk_document(doc, TOKENS, ChunkLimits(30, 0))
    assert [c.text for c in chunks] == paragraphs


def test_no_overlap_means_disjoint_and_complete() -> None:
    doc = text_doc(sentences(25))
    chunks = chunk_document(doc, TOKENS, ChunkLimits(32, 0))
    assert sum(c.num_tokens for c in chunks) == len(TOKENS(doc.text))
    for previous, chunk in itertools.pairwise(chunks):
        assert chunk.char_start >= previous.char_end


def test_chunks_never_cross_headings_or_pages() -> None:
    builder = DocumentBuilder()
    builder.add("Install", heading_path=("Install",), is_heading=True)
    builder.add("Run the installer.", heading_path=("Install",))
    builder.add("Use", heading_path=("Use",), is_heading=True)
    builder.add("Open the app.", heading_path=("Use",))
    builder.add("Page two text.", heading_path=("Use",), page=2)
    doc = builder.build(title="t", kind="pdf")
    chunks = chunk_document(doc, TOKENS, ChunkLimits(256, 16))
    assert [(c.text, c.heading_path, c.page) for c in chunks] == [
        ("Install\n\nRun the installer.", ("Install",), None),
        ("Use\n\nOpen the app.", ("Use",), None),
        ("Page two text.", ("Use",), 2),
    ]


def test_heading_only_sections_are_dropped_when_there_is_body() -> None:
    builder = DocumentBuilder()
    builder.add("Guide", heading_path=("Guide",), is_heading=True)
    builder.add("Part", heading_path=("Guide", "Part"), is_heading=True)
    builder.add("Body.", heading_path=("Guide", "Part"))
    chunks = chunk_document(builder.build(title=None, kind="markdown"), TOKENS, ChunkLimits(64, 8))
    assert [(c.text, c.heading_path) for c in chunks] == [("Part\n\nBody.", ("Guide", "Part"))]
    only_heading = DocumentBuilder()
    only_heading.add("Lonely title", heading_path=("Lonely title",), is_heading=True)
    chunks = chunk_document(
        only_heading.build(title=None, kind="markdown"), TOKENS, ChunkLimits(64, 8)
    )
    assert [c.text for c in chunks] == ["Lonely title"]


def test_one_huge_paragraph_without_spaces_is_cut_and_recounted() -> None:
    # 60k characters, a few "words" joined by punctuation: cuts must fall inside words.
    blob = "-".join(f"seg{i}" for i in range(12_000))
    doc = text_doc(blob)
    limits = ChunkLimits(64, 8)
    chunks = chunk_document(doc, TOKENS, limits)
    check_invariants(doc, chunks, limits)
    assert chunks[-1].char_end == len(blob)


def test_pieces_keep_tokenization_bounded_for_a_huge_file() -> None:
    calls: list[int] = []

    def spans(text: str) -> list[tuple[int, int]]:
        calls.append(len(text))
        return TOKENS(text)

    doc = text_doc(sentences(3000))  # ~200k characters, one paragraph
    limits = ChunkLimits(128, 16)
    chunks = chunk_document(doc, spans, limits)
    assert max(calls) <= 8192  # the tokenizer never sees more than one piece
    check_invariants(doc, chunks, limits)


class WordPieceLike:
    """Splits long words into 3-character pieces, like WordPiece: a mid-word cut re-tokenizes."""

    def __call__(self, text: str) -> list[tuple[int, int]]:
        spans = []
        for match in re.finditer(r"\S+", text):
            start = match.start()
            spans.append((start, min(start + 2, match.end())))  # a 2-char first piece
            spans.extend((i, min(i + 3, match.end())) for i in range(start + 2, match.end(), 3))
        return spans


def test_mid_word_cut_is_recounted_with_a_subword_tokenizer() -> None:
    tokens = WordPieceLike()
    doc = text_doc("x" * 500 + " tail words here")
    limits = ChunkLimits(32, 4)
    chunks = chunk_document(doc, tokens, limits)
    assert all(len(tokens(c.text)) <= limits.max_tokens for c in chunks)
    assert chunks[-1].text.endswith("tail words here")


def test_make_limits_caps_at_model_maximum() -> None:
    assert make_limits(256, 32, model_max_tokens=256, num_special=2) == ChunkLimits(254, 32)
    assert make_limits(256, 32, model_max_tokens=64, num_special=2) == ChunkLimits(62, 15)
    assert make_limits(100, 10, model_max_tokens=512, num_special=2) == ChunkLimits(100, 10)


@pytest.mark.parametrize(("max_tokens", "overlap"), [(4, 0), (32, 17), (32, -1)])
def test_limits_validation(max_tokens: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        ChunkLimits(max_tokens, overlap)
