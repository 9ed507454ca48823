"""Lay out a grounded RAG prompt so the parts that repeat come first and stay byte-identical.

Order: system prompt, fixed instructions, then the retrieved context in a stable order, then the
question. Everything before the question is shared by every turn about the same context, so a
prefix KV cache turns its prefill into a hit. This module knows nothing about models or stores:
it takes passages and a token counter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

SYSTEM_PROMPT = (
    "You are a careful assistant that answers questions using only the numbered sources "
    "provided. Cite the sources you use with their numbers in square brackets, like [1]. "
    "If the sources do not contain the answer, say that you could not find it in the documents."
)


@dataclass(frozen=True)
class Passage:
    """One retrieved chunk as the prompt sees it; `rank` 0 is the most relevant."""

    chunk_id: int
    text: str
    source: str
    title: str | None = None
    page: int | None = None
    heading: str | None = None
    rank: int = 0


@dataclass(frozen=True)
class AssembledPrompt:
    messages: list[dict[str, str]]
    passages: list[Passage]  # the passages kept, in prompt order; citation n is passages[n-1]
    num_dropped: int  # passages left out to fit the context budget


def _label(passage: Passage) -> str:
    parts = [passage.title or passage.source]
    if passage.heading:
        parts.append(passage.heading)
    if passage.page is not None:
        parts.append(f"page {passage.page}")
    return " - ".join(parts)


def format_context(passages: Sequence[Passage]) -> str:
    return "\n\n".join(f"[{n}] {_label(p)}\n{p.text.strip()}" for n, p in enumerate(passages, 1))


def _user_message(passages: Sequence[Passage], question: str) -> str:
    return f"Sources:\n\n{format_context(passages)}\n\nQuestion: {question.strip()}"


def _stable_order(passages: Sequence[Passage]) -> list[Passage]:
    # By source and position, not by score: the same context set always renders the same bytes.
    return sorted(passages, key=lambda p: (p.source, p.page or 0, p.chunk_id))


def assemble_prompt(
    question: str,
    passages: Sequence[Passage],
    *,
    count_tokens: Callable[[str], int],
    max_prompt_tokens: int,
) -> AssembledPrompt:
    """Keep the best-ranked passages that fit `max_prompt_tokens`, drop the rest whole."""
    kept = sorted(passages, key=lambda p: p.rank)

    def size(selection: Sequence[Passage]) -> int:
        return count_tokens(SYSTEM_PROMPT) + count_tokens(_user_message(selection, question))

    while kept and size(_stable_order(kept)) > max_prompt_tokens:
        kept.pop()  # the lowest-ranked passage goes first
    ordered = _stable_order(kept)
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": _user_message(ordered, question)},
    ]
    return AssembledPrompt(messages, ordered, len(passages) - len(kept))
