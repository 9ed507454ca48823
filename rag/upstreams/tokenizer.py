"""The tokenizer and chat template of a remote model, loaded from a local model folder.

The appliance tokenizes (chat template, RAG prompt budget, /v1/messages/count_tokens) and sends
token ids, so every upstream receives byte-identical prompts: their prefix caches can only hit
on identical ids, and one tokenizer makes the affinity key mean the same prefix everywhere.

The folder is what mlx-lm's `load` reads for the local engine (tokenizer.json and
tokenizer_config.json with its chat template); `inference.chat_tokenizer` loads it with the same
mlx-lm tokenizer wrapper the Engine uses, without the weights, so a prompt has the same ids
whether the model runs here or on an upstream. (`rag` may not import mlx_lm itself.)

Ignores: the model's weights, EOS handling (the upstream stops on its own EOS).
"""

from __future__ import annotations

from pathlib import Path

from inference.chat_tokenizer import ChatTokenizer, load_chat_tokenizer

LocalTokenizer = ChatTokenizer  # what the RemoteBackend tokenizes with


def load_local_tokenizer(folder: Path) -> LocalTokenizer:
    """The chat model's tokenizer from `folder`; ValueError when it holds none."""
    return load_chat_tokenizer(folder)
