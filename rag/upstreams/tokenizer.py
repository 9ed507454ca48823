"""The tokenizer and chat template of a remote model, loaded from a local model folder.

The appliance tokenizes (chat template, RAG prompt budget, /v1/messages/count_tokens) and sends
token ids, so every upstream receives byte-identical prompts: their prefix caches can only hit
on identical ids, and one tokenizer makes the affinity key mean the same prefix everywhere.

The folder is what mlx-lm's `load` reads for the local engine (tokenizer.json and
tokenizer_config.json with its chat_template); this loads the same files with the same
`transformers.AutoTokenizer` mlx-lm wraps, without the weights. (`rag` may not import mlx_lm.)

Ignores: the model's weights, EOS handling (the upstream stops on its own EOS).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class LocalTokenizer:
    """encode / decode / count_tokens / apply_chat_template, as the MLX engine offers them."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer  # slow import; only servers with upstreams pay

        if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
            raise ValueError(f"{folder} has no tokenizer.json: not a tokenizer folder")
        self.folder = folder
        self._tokenizer = AutoTokenizer.from_pretrained(str(folder))

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
            [dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=False,  # transformers 5 returns a dict unless told (mlx-lm says so too)
        )
        return list(ids)

    def context_length(self) -> int | None:
        """The model's own context length from the folder's config.json, if it names one."""
        value = self._config().get("max_position_embeddings")
        return int(value) if value else None

    def vocab_size(self) -> int:
        """Token ids the model takes: its config's vocab_size, else the tokenizer's."""
        value = self._config().get("vocab_size")
        return int(value) if value else len(self._tokenizer)

    def _config(self) -> dict[str, Any]:
        path = self.folder / "config.json"
        if not path.is_file():
            return {}
        config = json.loads(path.read_text(encoding="utf-8"))
        return config.get("text_config", config)
