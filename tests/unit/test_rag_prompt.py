"""Prompt layout: repeated parts first and byte-stable, context budgeted in whole passages."""

from __future__ import annotations

from rag.prompt import SYSTEM_PROMPT, Passage, assemble_prompt


def words(text: str) -> int:
    return len(text.split())


def passages() -> list[Passage]:
    return [
        Passage(7, "alpha beta gamma", "b.md", title="B", rank=0),
        Passage(3, "delta epsilon", "a.md", title="A", page=2, rank=1),
        Passage(9, "zeta eta theta iota kappa lambda", "c.md", heading="Intro", rank=2),
    ]


def test_layout_puts_system_then_context_then_question() -> None:
    prompt = assemble_prompt("What is beta?", passages(), count_tokens=words, max_prompt_tokens=500)
    assert prompt.messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
    user = prompt.messages[1]["content"]
    assert user.startswith("Sources:\n\n[1] A - page 2\ndelta epsilon\n\n[2] B\nalpha beta gamma")
    assert user.endswith("Question: What is beta?")
    assert [p.chunk_id for p in prompt.passages] == [3, 7, 9]  # stable source order
    assert prompt.num_dropped == 0


def test_same_context_in_any_rank_order_renders_identical_prefix() -> None:
    a = assemble_prompt("q1", passages(), count_tokens=words, max_prompt_tokens=500)
    b = assemble_prompt("q2", passages()[::-1], count_tokens=words, max_prompt_tokens=500)
    prefix_a = a.messages[1]["content"].rsplit("Question:", 1)[0]
    prefix_b = b.messages[1]["content"].rsplit("Question:", 1)[0]
    assert prefix_a == prefix_b


def test_budget_drops_lowest_ranked_passages_whole() -> None:
    full = assemble_prompt("q", passages(), count_tokens=words, max_prompt_tokens=500)
    needed = words(SYSTEM_PROMPT) + words(full.messages[1]["content"])
    trimmed = assemble_prompt("q", passages(), count_tokens=words, max_prompt_tokens=needed - 1)
    assert [p.chunk_id for p in trimmed.passages] == [3, 7]  # rank 2 (chunk 9) went first
    assert trimmed.num_dropped == 1
    nothing = assemble_prompt("q", passages(), count_tokens=words, max_prompt_tokens=1)
    assert nothing.passages == [] and nothing.num_dropped == 3
