"""Stop condition tests: stop strings across tokens, minimal hold-back, stop ids, max_tokens."""

from __future__ import annotations

from pathlib import Path

from inference.detokenize import IncrementalDetokenizer
from inference.stopping import StopChecker, StopParams, StopUpdate

import pytest


class PieceTexts:
    """A detokenizer where token id i is the i-th text piece; finalize returns `tail` once."""

    def __init__(self, pieces: list[str], tail: str = "") -> None:
        self.pieces = pieces
        self.tail = tail

    def add_token(self, token_id: int) -> str:
        return self.pieces[token_id]

    def finalize(self) -> str:
        tail, self.tail = self.tail, ""
        return tail


def run(
    pieces: list[str], tail: str = "", **params: object
) -> tuple[list[str], StopUpdate, StopChecker]:
    """Feed pieces in order until the checker finishes; return each step's text and the last update."""
    checker = StopChecker(StopParams(**params), PieceTexts(pieces, tail))  # type: ignore[arg-type]
    released = []
    update = StopUpdate("")
    for token_id in range(len(pieces)):
        update = checker.add_token(token_id)
        released.append(update.text)
        if update.finish_reason:
            break
    return released, update, checker


# -- params -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0},
        {"max_tokens": 1.5},
        {"stop": [""]},
        {"stop": [3]},
        {"stop_token_ids": [-1]},
    ],
)
def test_params_reject_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        StopParams(**kwargs)


def test_params_turn_lists_into_tuples() -> None:
    params = StopParams(stop=["a", "b"], stop_token_ids=[2])  # type: ignore[arg-type]
    assert params.stop == ("a", "b")
    assert params.stop_token_ids == (2,)


# -- stop strings -------------------------------------------------------------------------------


def test_text_flows_through_without_stop_conditions() -> None:
    released, update, checker = run(["Hel", "lo", " world"])
    assert released == ["Hel", "lo", " world"]
    assert update.finish_reason is None
    assert checker.num_tokens == 3 and not checker.is_finished


def test_stop_string_spanning_tokens_is_cut_and_not_emitted() -> None:
    released, update, _ = run(["Hel", "lo\n", "\nWorld"], stop=["\n\n"])
    assert released == ["Hel", "lo", ""]
    assert update == StopUpdate("", "stop", "\n\n")


def test_stop_string_inside_one_token_keeps_the_text_before_it() -> None:
    released, update, _ = run(["ab", "xENDy", "never"], stop=["END"])
    assert released == ["ab", "x"]
    assert update.stop_reason == "END"


def test_text_is_held_only_while_it_could_start_a_stop_string() -> None:
    released, update, _ = run(["a <", "/b", "> c", "</", "answer", ">tail"], stop=["</answer>"])
    # "<" and "</" might begin "</answer>"; "</b" cannot, so it is released at once.
    assert released == ["a ", "</b", "> c", "", "", ""]
    assert update.stop_reason == "</answer>"


def test_hold_back_is_the_longest_suffix_that_prefixes_a_stop() -> None:
    released, _, _ = run(["xab", "d", "aab", "c"], stop=["abc"])
    assert released == ["x", "abd", "a", ""]


def test_overlapping_prefixes_find_the_match() -> None:
    released, update, _ = run(["a", "a", "a", "b"], stop=["aab"])
    assert released == ["", "", "a", ""]
    assert update.finish_reason == "stop"


def test_earliest_stop_string_wins_and_list_order_breaks_ties() -> None:
    _, update, _ = run(["xyz"], stop=["z", "y"])
    assert update.stop_reason == "y"
    released, update, _ = run(["ab"], stop=["b", "ab", "a"])
    assert released == [""]
    assert update.stop_reason == "ab"


def test_unicode_stop_strings() -> None:
    released, update, _ = run(["答案：", "日", "本。", "x"], stop=["本。"])
    assert released == ["答案：", "日", ""]
    assert update.stop_reason == "本。"


# -- stop tokens and max_tokens -------------------------------------------------------------------


def test_stop_token_ends_without_its_text_but_with_held_text() -> None:
    released, update, checker = run(
        ["Hi", " <", "<|im_end|>", "more"], stop=["<e>"], stop_token_ids=[2]
    )
    assert released == ["Hi", " ", "<"]
    assert update == StopUpdate("<", "stop", 2)
    assert checker.finish_reason == "stop"


def test_max_tokens_finishes_with_length_and_releases_held_text() -> None:
    released, update, checker = run(["a", "b", "<", "c"], max_tokens=3, stop=["<x>"])
    assert released == ["a", "b", "<"]
    assert update == StopUpdate("<", "length", None)
    assert checker.num_tokens == 3


def test_stop_string_on_the_last_allowed_token_reports_stop() -> None:
    _, update, _ = run(["a", "b!", "c"], max_tokens=2, stop=["!"])
    assert update == StopUpdate("b", "stop", "!")


def test_detokenizer_tail_is_released_and_scanned_at_the_end() -> None:
    _, update, _ = run(["a", "b"], tail="\ufffd", max_tokens=2)
    assert update == StopUpdate("b\ufffd", "length", None)
    _, update, _ = run(["a", "<"], tail="x>", max_tokens=2, stop=["<x>"])
    assert update == StopUpdate("", "stop", "<x>")


def test_flush_releases_held_text_when_the_engine_ends_the_request() -> None:
    released, _, checker = run(["a", "</"], stop=["</s>"])
    assert released == ["a", ""]
    assert checker.flush() == "</"
    assert checker.flush() == ""


def test_adding_after_finish_is_a_bug() -> None:
    _, _, checker = run(["a"], max_tokens=1)
    with pytest.raises(AssertionError):
        checker.add_token(0)


# -- with the real detokenizer --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from tokenizers import Tokenizer

    from tests.fixtures.tiny_llama import write_bpe_tokenizer

    folder: Path = tmp_path_factory.mktemp("tok")
    write_bpe_tokenizer(folder)
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_cjk_stop_string_split_across_byte_tokens(tokenizer) -> None:
    text = "The capital 日本語 is 🙂 here"
    ids = tokenizer.encode(text).ids
    checker = StopChecker(StopParams(stop=["語 is 🙂"]), IncrementalDetokenizer(tokenizer))
    released = []
    for token_id in ids:
        update = checker.add_token(token_id)
        released.append(update.text)
        if update.finish_reason:
            break
    assert "".join(released) == "The capital 日本"
    assert update.stop_reason == "語 is 🙂"
    assert all("\ufffd" not in piece for piece in released)
