"""Detokenizer tests: deltas never split a character, are emitted as early as possible, add up."""

from __future__ import annotations

from pathlib import Path

from inference.detokenize import IncrementalDetokenizer

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers

TEXTS = [
    "The capital of France is Paris.",
    " leading space and  double  spaces\n\nnew lines",
    "日本語のテキスト、中文和한국어",
    "emoji 🙂 thumbs 👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "naïve café, über, Ωμέγα",
    "a\x00b\x7f tab\there",
    "\ufffd is a real replacement character",
]


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The tiny llama fixture's byte-level BPE (GPT-2 / Llama-3 / Qwen style)."""
    from tests.fixtures.tiny_llama import write_bpe_tokenizer

    folder: Path = tmp_path_factory.mktemp("tok")
    write_bpe_tokenizer(folder)
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def sentencepiece_like() -> Tokenizer:
    """A Llama-2 style BPE: "▁" word starts, <0xNN> byte fallback, first space stripped."""
    pieces = ["<unk>", *(f"<0x{i:02X}>" for i in range(256)), "▁", *map(chr, range(33, 127))]
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("▁a", "n"), ("▁an", "d")]
    pieces += ["▁t", "he", "▁the", "▁a", "▁an", "▁and"]
    model = models.BPE(
        vocab={piece: i for i, piece in enumerate(pieces)},
        merges=merges,
        byte_fallback=True,
        unk_token="<unk>",
    )
    tokenizer = Tokenizer(model)
    tokenizer.add_special_tokens(["</s>"])
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return tokenizer


def stream(detokenizer: IncrementalDetokenizer, token_ids: list[int]) -> list[str]:
    return [detokenizer.add_token(token_id) for token_id in token_ids]


def assert_streams_exactly(
    tokenizer, token_ids: list[int], *, eager: bool = True, **options: bool
) -> None:
    """Deltas add up to decode(all), never take anything back, and hold only unfinished text.

    eager: text before an unfinished character is emitted too (byte-level BPE). A byte-fallback
    decoder turns a whole run of byte tokens into U+FFFDs while one is unfinished, so there the
    run waits.
    """
    detokenizer = IncrementalDetokenizer(tokenizer, **options)
    skip = options.get("skip_special_tokens", True)
    full_text = tokenizer.decode(token_ids, skip_special_tokens=skip)
    emitted = ""
    for n, token_id in enumerate(token_ids, start=1):
        emitted += detokenizer.add_token(token_id)
        assert full_text.startswith(emitted)
        expected = tokenizer.decode(token_ids[:n], skip_special_tokens=skip)
        if not expected.endswith("\ufffd"):
            assert emitted == expected
        elif eager:
            assert emitted == expected.rstrip("\ufffd")
    assert emitted + detokenizer.finalize() == full_text


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_deltas_add_up_and_emit_each_character_once_complete(
    byte_level: Tokenizer, text: str
) -> None:
    token_ids = byte_level.encode(text).ids
    assert byte_level.decode(token_ids) == text  # byte-level BPE round-trips
    assert_streams_exactly(byte_level, token_ids)


def test_single_byte_tokens_hold_a_character_until_its_last_byte(byte_level: Tokenizer) -> None:
    byte_to_char = {b: c for c, b in _gpt2_byte_decoder().items()}
    text = "é日🙂"
    token_ids = [byte_level.token_to_id(byte_to_char[b]) for b in text.encode()]
    assert None not in token_ids
    deltas = stream(IncrementalDetokenizer(byte_level), token_ids)
    assert deltas == ["", "é", "", "", "日", "", "", "", "🙂"]


def test_complete_text_before_an_unfinished_character_is_not_held(byte_level: Tokenizer) -> None:
    # A token that ends with the first byte of "ï": its complete "a" goes out at once.
    byte_to_char = {b: c for c, b in _gpt2_byte_decoder().items()}
    detokenizer = IncrementalDetokenizer(byte_level)
    first, second = "ï".encode()
    piece = "a" + byte_to_char[first]
    token_id = byte_level.token_to_id(piece)
    assert token_id is not None, "the fixture's BPE merged 'a' with the lead byte of 'ï'"
    assert detokenizer.add_token(byte_level.token_to_id("n")) == "n"
    assert detokenizer.add_token(token_id) == "a"
    assert detokenizer.add_token(byte_level.token_to_id(byte_to_char[second])) == "ï"


def test_finalize_flushes_an_unfinished_character_as_the_tokenizer_does(
    byte_level: Tokenizer,
) -> None:
    byte_to_char = {b: c for c, b in _gpt2_byte_decoder().items()}
    token_ids = [byte_level.token_to_id("x")] + [
        byte_level.token_to_id(byte_to_char[b]) for b in "🙂".encode()[:2]
    ]
    detokenizer = IncrementalDetokenizer(byte_level)
    assert stream(detokenizer, token_ids) == ["x", "", ""]
    assert "x" + detokenizer.finalize() == byte_level.decode(token_ids)
    assert detokenizer.finalize() == ""


def test_special_tokens_are_skipped_unless_asked(byte_level: Tokenizer) -> None:
    end = byte_level.token_to_id("<|im_end|>")
    token_ids = [*byte_level.encode("Hi").ids, end, *byte_level.encode(" there").ids]
    assert "".join(stream(IncrementalDetokenizer(byte_level), token_ids)) == "Hi there"
    kept = IncrementalDetokenizer(byte_level, skip_special_tokens=False)
    assert "".join(stream(kept, token_ids)) == "Hi<|im_end|> there"
    assert_streams_exactly(byte_level, token_ids, skip_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_style_spaces_and_byte_fallback(
    sentencepiece_like: Tokenizer, text: str
) -> None:
    token_ids = sentencepiece_like.encode(text).ids
    assert sentencepiece_like.decode(token_ids) == text
    byte_fallback_ids = {sentencepiece_like.token_to_id(f"<0x{i:02X}>") for i in range(256)}
    if any(ord(c) > 127 for c in text):
        assert byte_fallback_ids & set(token_ids)  # the test really splits characters
    assert_streams_exactly(sentencepiece_like, token_ids, eager=False)


def test_mlx_lm_tokenizer_wrapper_of_the_tiny_llama(tiny_llama_path: Path) -> None:
    from mlx_lm.tokenizer_utils import load

    wrapper = load(tiny_llama_path)  # transformers tokenizer behind mlx-lm's wrapper
    for text in TEXTS:
        token_ids = wrapper.encode(text, add_special_tokens=False)
        detokenizer = IncrementalDetokenizer(wrapper)
        deltas = stream(detokenizer, token_ids)
        assert "".join(deltas) + detokenizer.finalize() == text
        if "\ufffd" not in text:
            assert all("\ufffd" not in delta for delta in deltas)


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, as byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}
