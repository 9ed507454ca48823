"""A chat model's tokenizer without its weights: mlx-lm's tokenizer wrapper for a model folder.

    tokenizer = load_chat_tokenizer(folder)
    tokenizer.apply_chat_template(messages) -> ids     the same ids the local Engine builds
    tokenizer.encode / decode / count_tokens / eos_token_ids / vocab_size / context_length

For a model served elsewhere (rag.upstreams): the appliance still tokenizes, so its prompts, token
counts and prefix keys are the local engine's. The wrapper is the one `mlx_lm.load` gives the
Engine (`mlx_lm.utils.load_tokenizer`: chat template, thinking switch, EOS ids from the config),
and the Engine makes its own tokenizer calls through this class.

Ignores: the weights and everything about generating.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class ChatTokenizer:
    """encode / decode / count_tokens / apply_chat_template, exactly as the Engine calls them."""

    def __init__(self, tokenizer: Any, folder: Path | None = None) -> None:
        self.folder = folder  # None: no config.json to read (vocab_size / context_length)
        self._tokenizer = tokenizer  # mlx_lm.tokenizer_utils.TokenizerWrapper
        self._config = {} if folder is None else _text_config(folder)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(token_ids))

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        ids = self._tokenizer.apply_chat_template(
            [dict(m) for m in messages], add_generation_prompt=add_generation_prompt, tokenize=True
        )
        return list(ids)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = getattr(self._tokenizer, "eos_token_ids", None) or {self._tokenizer.eos_token_id}
        return tuple(sorted(t for t in eos if t is not None))

    def vocab_size(self) -> int:
        """Token ids the model takes: its config's vocab_size, else the tokenizer's."""
        value = self._config.get("vocab_size")
        return int(value) if value else len(self._tokenizer.vocab)

    def context_length(self) -> int | None:
        """The model's own context length from config.json, if it names one."""
        value = self._config.get("max_position_embeddings")
        return int(value) if value else None


def load_chat_tokenizer(folder: Path) -> ChatTokenizer:
    """The tokenizer of a local model folder; ValueError if the folder has none (never the hub)."""
    folder = folder.expanduser()
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise ValueError(f"{folder} has no tokenizer.json: not a tokenizer folder")
    from mlx_lm.utils import load_tokenizer  # slow import: only callers that tokenize pay

    return ChatTokenizer(load_tokenizer(folder), folder)


def _text_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text(encoding="utf-8"))
    return config.get("text_config", config)
