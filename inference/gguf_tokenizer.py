"""Rebuild a Hugging Face tokenizer (tokenizer.json and its configs) from GGUF metadata.

Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) are handled; SentencePiece
("llama") vocabularies raise `GGUFError`. The pre-tokenizer is chosen from `tokenizer.ggml.pre`,
llama.cpp's name for the regex family the original tokenizer used; an unknown name is an error,
never a silent guess, because a wrong split changes token ids without any visible failure.

This module takes plain Python metadata (see `gguf_convert.read_gguf`) and knows nothing of
tensors or mlx.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

# llama.cpp's token types (gguf llama_token_type).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class GGUFError(ValueError):
    """A GGUF file this converter cannot turn into an mlx-lm folder; says what and why."""


@dataclass(frozen=True)
class SpecialTokenIds:
    """The ids GGUF metadata names for the roles a chat runtime needs; None when absent."""

    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None


def _byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


def make_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The HF pre-tokenizer for llama.cpp's `tokenizer.ggml.pre` name."""
    if pre == "smollm":
        # SmolLM's tokenizer.json: every digit is its own pre-token, then GPT-2's byte-level regex.
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), _byte_level()]
        )
    if pre in ("gpt2", "default"):
        # llama.cpp writes "default" when it does not recognise the vocab; GPT-2's regex is the
        # convention for byte-level BPE vocabularies without a named family.
        return _byte_level()
    raise GGUFError(
        f"unsupported tokenizer.ggml.pre {pre!r}: this converter knows 'smollm', 'gpt2' and "
        "'default'; add its pre-tokenizer to inference/gguf_tokenizer.py"
    )


def special_token_ids(metadata: Mapping[str, Any]) -> SpecialTokenIds:
    """BOS/EOS/UNK/PAD ids from the metadata, checked against the vocabulary size."""
    num_tokens = len(_require(metadata, "tokenizer.ggml.tokens"))

    def get(key: str) -> int | None:
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is None:
            return None
        if not 0 <= int(value) < num_tokens:
            raise GGUFError(
                f"tokenizer.ggml.{key} = {value} is outside the {num_tokens}-token vocab"
            )
        return int(value)

    return SpecialTokenIds(
        bos_id=get("bos_token_id"),
        eos_id=get("eos_token_id"),
        unk_id=get("unknown_token_id"),
        pad_id=get("padding_token_id"),
    )


def _require(metadata: Mapping[str, Any], key: str) -> Any:
    if key not in metadata:
        raise GGUFError(f"GGUF metadata has no {key!r}; cannot rebuild the tokenizer")
    return metadata[key]


def build_tokenizer(metadata: Mapping[str, Any]) -> Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to the one the GGUF was converted from."""
    kind = _require(metadata, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(
            f"unsupported tokenizer.ggml.model {kind!r}: only byte-level BPE ('gpt2') is supported"
        )
    tokens: list[str] = list(_require(metadata, "tokenizer.ggml.tokens"))
    merges: list[str] = list(_require(metadata, "tokenizer.ggml.merges"))
    token_types: list[int] = list(
        metadata.get("tokenizer.ggml.token_type", [TOKEN_TYPE_NORMAL] * len(tokens))
    )
    if len(token_types) != len(tokens):
        raise GGUFError(f"{len(token_types)} token types for {len(tokens)} tokens")
    ids = special_token_ids(metadata)

    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)  # encoding can use one id per string: keep the first
    merge_pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    unk = tokens[ids.unk_id] if ids.unk_id is not None else None
    bpe = models.BPE(vocab=vocab, merges=merge_pairs, unk_token=unk, fuse_unk=False)

    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = make_pre_tokenizer(str(metadata.get("tokenizer.ggml.pre", "default")))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _post_processor(metadata, tokens, ids)

    role_ids = {i for i in (ids.bos_id, ids.eos_id, ids.unk_id, ids.pad_id) if i is not None}
    special = [
        AddedToken(token, special=True, normalized=False)
        for token_id, (token, kind) in enumerate(zip(tokens, token_types, strict=True))
        if kind == TOKEN_TYPE_CONTROL or token_id in role_ids
    ]
    user = [
        AddedToken(token, special=False, normalized=False)
        for token, kind in zip(tokens, token_types, strict=True)
        if kind == TOKEN_TYPE_USER_DEFINED
    ]
    # Added tokens already in the vocab keep their ids; they are matched before BPE runs.
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user)
    return tokenizer


def _post_processor(
    metadata: Mapping[str, Any], tokens: list[str], ids: SpecialTokenIds
) -> processors.PostProcessor:
    """Byte-level offsets, plus a template that adds BOS/EOS when the GGUF asks for them."""
    byte_level = processors.ByteLevel(trim_offsets=False)
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    bos = tokens[ids.bos_id] if add_bos and ids.bos_id is not None else None
    eos = tokens[ids.eos_id] if add_eos and ids.eos_id is not None else None
    if bos is None and eos is None:
        return byte_level

    def wrap(sequence: str, type_id: int) -> str:
        parts = [f"{bos}:{type_id}"] if bos else []
        parts.append(f"${sequence}:{type_id}")
        parts += [f"{eos}:{type_id}"] if eos else []
        return " ".join(parts)

    specials = {t: i for t, i in ((bos, ids.bos_id), (eos, ids.eos_id)) if t is not None}
    template = processors.TemplateProcessing(
        single=wrap("A", 0),
        pair=f"{wrap('A', 0)} {wrap('B', 1)}",
        special_tokens=list(specials.items()),
    )
    return processors.Sequence([byte_level, template])


def tokenizer_config(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json: role tokens, chat template, and the class transformers should use."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    config.update(special_tokens_map(metadata))
    context = metadata.get(f"{metadata.get('general.architecture', 'llama')}.context_length")
    if context is not None:
        config["model_max_length"] = int(context)
    template = metadata.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = str(template)
    return config


def special_tokens_map(metadata: Mapping[str, Any]) -> dict[str, Any]:
    tokens: list[str] = list(_require(metadata, "tokenizer.ggml.tokens"))
    ids = special_token_ids(metadata)
    roles = {"bos_token": ids.bos_id, "eos_token": ids.eos_id}
    roles |= {"unk_token": ids.unk_id, "pad_token": ids.pad_id}
    named = {role: tokens[i] for role, i in roles.items() if i is not None}
    token_types = metadata.get("tokenizer.ggml.token_type", [])
    role_tokens = set(named.values())
    extra = [
        tokens[i]
        for i, kind in enumerate(token_types)
        if kind == TOKEN_TYPE_CONTROL and tokens[i] not in role_tokens
    ]
    return named | ({"additional_special_tokens": extra} if extra else {})


def write_tokenizer_files(metadata: Mapping[str, Any], out_dir: Path) -> SpecialTokenIds:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir."""
    build_tokenizer(metadata).save(str(out_dir / "tokenizer.json"))
    for name, content in (
        ("tokenizer_config.json", tokenizer_config(metadata)),
        ("special_tokens_map.json", special_tokens_map(metadata)),
    ):
        (out_dir / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return special_token_ids(metadata)
