"""Split a loaded document into chunks measured in the embedder's own tokens.

The chunker knows nothing about files or the index: it gets a `LoadedDocument` and a function
that returns the character spans of a text's tokens (`TextEmbedder.token_spans`).

1. Sections: consecutive blocks with the same heading path and page. A chunk never spans two
   sections, so each chunk has one heading path and one page. Sections holding only a heading
   are dropped when the document has body text (the heading lives on in its children's paths).
2. Tokens: each block is tokenized in pieces of at most `_PIECE_CHARS` characters (memory stays
   bounded on a file that is one huge paragraph); every token gets a break score saying how good
   a place to cut after it is:

       4 end of a block (paragraph, list item, heading)    2 end of a line
       3 end of a sentence                                 1 between words    0 inside a word

3. Windows: once more than `max_tokens` tokens are buffered, cut at the best-scoring token in the
   last half of the window (the latest one among equals), emit that chunk, and start the next
   one `overlap` tokens earlier, at a word start. The section's remainder is the last chunk.

A chunk is the document's text between its first and last token, so its span maps back to the
document. Cuts between words keep the chunk's standalone tokenization equal to the counted one;
a rare cut inside a word (a URL longer than half a chunk) is re-counted and shrunk if needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ingest.records import Block, Chunk, LoadedDocument

TokenSpans = Callable[[str], list[tuple[int, int]]]

_PIECE_CHARS = 8192
_SENTENCE_END = frozenset(".!?。！？")
_CLOSERS = frozenset("\"')]”’»")


@dataclass(frozen=True)
class ChunkLimits:
    """`max_tokens` content tokens per chunk (no special tokens), `overlap` shared with the previous."""

    max_tokens: int
    overlap: int

    def __post_init__(self) -> None:
        if self.max_tokens < 8:
            raise ValueError(f"max_tokens must be at least 8, got {self.max_tokens}")
        if not 0 <= self.overlap <= self.max_tokens // 2:
            raise ValueError(
                f"overlap must be between 0 and half of max_tokens ({self.max_tokens // 2}), "
                f"got {self.overlap}"
            )


def make_limits(
    chunk_tokens: int, overlap: int, model_max_tokens: int, num_special: int
) -> ChunkLimits:
    """The effective limits: never above what the model takes; overlap at most a quarter."""
    max_tokens = min(chunk_tokens, model_max_tokens - num_special)
    return ChunkLimits(max_tokens, min(overlap, max_tokens // 4))


@dataclass(frozen=True)
class _Token:
    start: int
    end: int
    score: int
    word_start: bool  # preceded by whitespace or a block start: a clean place to begin a chunk


def _sections(doc: LoadedDocument) -> list[list[Block]]:
    sections: list[list[Block]] = []
    for block in doc.blocks:
        key = (block.heading_path, block.page)
        previous = sections[-1][-1] if sections else None
        if previous is None or block.is_heading or (previous.heading_path, previous.page) != key:
            sections.append([block])
        else:
            sections[-1].append(block)
    with_body = [s for s in sections if not all(b.is_heading for b in s)]
    return with_body or sections


def _pieces(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Split text[start:end] into spans of at most _PIECE_CHARS, at whitespace where possible."""
    while end - start > _PIECE_CHARS:
        limit = start + _PIECE_CHARS
        cut = max(text.rfind(" ", start, limit), text.rfind("\n", start, limit))
        cut = cut if cut > start else limit
        yield start, cut
        start = cut
    yield start, end


def _score(text: str, end: int, block_end: int) -> int:
    if end >= block_end:
        return 4
    after = text[end] if end < len(text) else "\n"
    if not after.isspace():
        return 0
    last = end - 1
    while last > 0 and text[last] in _CLOSERS:
        last -= 1
    if text[last] in _SENTENCE_END:
        return 3
    return 2 if after == "\n" else 1


def _tokens(text: str, block: Block, token_spans: TokenSpans) -> Iterator[_Token]:
    for piece_start, piece_end in _pieces(text, block.start, block.end):
        for span_start, span_end in token_spans(text[piece_start:piece_end]):
            start, end = piece_start + span_start, piece_start + span_end
            if end <= start:
                continue
            word_start = start == block.start or text[start - 1].isspace() or text[start].isspace()
            yield _Token(start, end, _score(text, end, block.end), word_start)


def _best_cut(window: list[_Token], max_tokens: int) -> int:
    """Number of tokens to put in the next chunk: the best break in the window's second half."""
    best, best_score = max_tokens, -1
    for count in range(max_tokens, max_tokens // 2, -1):
        score = window[count - 1].score
        if score > best_score:
            best, best_score = count, score
            if score == 4:
                break
    return best


def _next_start(window: list[_Token], cut: int, overlap: int) -> int:
    """Index where the next chunk starts: `overlap` tokens back, moved forward to a word start."""
    if overlap == 0:
        return cut
    for index in range(max(cut - overlap, 1), cut):
        if window[index].word_start:
            return index
    return cut


class _ChunkBuilder:
    def __init__(self, doc: LoadedDocument, token_spans: TokenSpans, limits: ChunkLimits) -> None:
        self.doc = doc
        self.token_spans = token_spans
        self.limits = limits
        self.chunks: list[Chunk] = []

    def emit(self, tokens: list[_Token], block: Block) -> int:
        """Append a chunk of `tokens`; returns how many tokens it really took (after re-count)."""
        count = len(tokens)
        clean = tokens[0].word_start and tokens[-1].score > 0
        while True:
            start, end = tokens[0].start, tokens[count - 1].end
            raw = self.doc.text[start:end]
            text = raw.strip()
            start += len(raw) - len(raw.lstrip())
            end = start + len(text)
            if clean or count == 1:
                break
            num_real = len(self.token_spans(text))
            if num_real <= self.limits.max_tokens:
                break
            count -= max(1, num_real - self.limits.max_tokens)  # a word was split: shrink
        if text:
            self.chunks.append(
                Chunk(
                    ordinal=len(self.chunks),
                    text=text,
                    char_start=start,
                    char_end=end,
                    num_tokens=count,
                    heading_path=block.heading_path,
                    page=block.page,
                )
            )
        return count

    def section(self, blocks: list[Block]) -> None:
        limits = self.limits
        window: list[_Token] = []
        num_carried = 0  # tokens at the window's start that the previous chunk already holds
        for block in blocks:
            for token in _tokens(self.doc.text, block, self.token_spans):
                window.append(token)
                if len(window) <= limits.max_tokens:
                    continue
                cut = self.emit(window[: _best_cut(window, limits.max_tokens)], block)
                start = _next_start(window, cut, limits.overlap)
                window = window[start:]
                num_carried = cut - start
        # The remainder: one chunk, or more if a re-count shrank it.
        while len(window) > num_carried:
            cut = self.emit(window, blocks[-1])
            if cut >= len(window):
                break
            start = _next_start(window, cut, limits.overlap)
            window = window[start:]
            num_carried = cut - start


def chunk_document(
    doc: LoadedDocument, token_spans: TokenSpans, limits: ChunkLimits
) -> list[Chunk]:
    """All chunks of `doc`, in order, each at most `limits.max_tokens` tokens."""
    builder = _ChunkBuilder(doc, token_spans, limits)
    for blocks in _sections(doc):
        builder.section(blocks)
    return builder.chunks
