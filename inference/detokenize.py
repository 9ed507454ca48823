"""Incremental detokenizer: token ids in, text deltas out, never half a UTF-8 character.

Byte-level BPE tokens can end in the middle of a character ("日" is three bytes that may span two
or three tokens), and a tokenizer's decoder may change a token's text by what precedes it (a
SentencePiece word-start "▁" is a space except at the start). So, as vLLM and TGI do, each new
token is decoded together with a short window of earlier tokens, and only the text past what was
already emitted goes out; while the window's text ends in U+FFFD (bytes of an unfinished
character) that character waits for the next token.

    tokens:  [ ... emitted ... | prefix window | new tokens ]
                               ^prefix_offset  ^read_offset
    delta  = decode(prefix window + new tokens) minus decode(prefix window), minus what
             was already sent of it

Concatenated deltas plus `finalize()` equal `tokenizer.decode(all ids)` for byte-level BPE.
mlx-lm's `BPEStreamingDetokenizer` is not used: it drops a leading space and mangles byte 0x00.

Ignores: stop strings and stop tokens (see stopping.py), chat templates, prompt text.
"""

from __future__ import annotations

from typing import Any, Protocol

from tokenizers import Tokenizer

REPLACEMENT_CHAR = "\ufffd"  # what a decoder gives for the bytes of an unfinished character


class Decodes(Protocol):
    """A Hugging Face `tokenizers.Tokenizer`, a transformers tokenizer or mlx-lm's wrapper."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """One request's token stream -> text deltas."""

    def __init__(self, tokenizer: Decodes, *, skip_special_tokens: bool = True) -> None:
        options: dict[str, Any] = {"skip_special_tokens": skip_special_tokens}
        if not isinstance(tokenizer, Tokenizer):
            # transformers' clean-up rewrites " ," to ","; across windows that would drop text.
            options["clean_up_tokenization_spaces"] = False
        self._tokenizer = tokenizer
        self._options = options
        self.token_ids: list[int] = []
        self._prefix_offset = 0  # first token of the context window
        self._read_offset = 0  # tokens before this are fully emitted
        self._prefix_text = ""  # decode(token_ids[prefix_offset:read_offset])
        self._num_partial_chars = 0  # chars emitted past prefix_text while a char is unfinished

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, **self._options)

    def add_token(self, token_id: int) -> str:
        """Take one token; return the text that is now final (maybe '')."""
        self.token_ids.append(token_id)
        text = self._decode(self.token_ids[self._prefix_offset :])
        unfinished = text.endswith(REPLACEMENT_CHAR)
        # Complete characters before an unfinished one can go out now.
        visible = text.rstrip(REPLACEMENT_CHAR) if unfinished else text
        start = len(self._prefix_text) + self._num_partial_chars
        delta = visible[start:]
        if unfinished:
            self._num_partial_chars += len(delta)
        else:
            # All text is final: the new tokens become the next window's context.
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
            self._prefix_text = self._decode(self.token_ids[self._prefix_offset :])
            self._num_partial_chars = 0
        return delta

    def add_tokens(self, token_ids: list[int]) -> str:
        return "".join(self.add_token(token_id) for token_id in token_ids)

    def finalize(self) -> str:
        """The stream has ended: flush held bytes (an unfinished character becomes U+FFFD)."""
        text = self._decode(self.token_ids[self._prefix_offset :])
        delta = text[len(self._prefix_text) + self._num_partial_chars :]
        self._prefix_offset = self._read_offset = len(self.token_ids)
        self._prefix_text = ""
        self._num_partial_chars = 0
        return delta
