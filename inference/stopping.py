"""Stop conditions of one request: stop token ids, stop strings, max_tokens.

A stop string can span tokens ("\\n\\n" from "\\n" + "\\n", "</answer>" from "</" + "answer>"), so
text is held back while its end could still be the start of a stop string, and released as soon as
it cannot be:

    emitted so far | held: a suffix that is a prefix of some stop string | (next delta)

A match can only start inside the held text, so each check scans held + new text, not the whole
output. Finish reasons are OpenAI's: "stop" (a stop token or string; neither is emitted) and
"length" (max_tokens generated).

Ignores: how token ids become text (any `TokenTexts`, e.g. detokenize.IncrementalDetokenizer),
sampling, and scheduling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class StopParams:
    """When a request stops; stop_token_ids usually include the tokenizer's EOS ids."""

    max_tokens: int | None = None  # None: the engine's context limit applies
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Lists are welcome at the boundary; stored as tuples so the params stay immutable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise ValueError(f"max_tokens must be a positive int or None, got {self.max_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be ids >= 0, got {self.stop_token_ids!r}")


@dataclass(frozen=True)
class StopUpdate:
    """What one token releases: text safe to stream, and why the request ended, if it did."""

    text: str
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that matched


class TokenTexts(Protocol):
    """Turns a request's token ids into text deltas (detokenize.IncrementalDetokenizer)."""

    def add_token(self, token_id: int) -> str: ...

    def finalize(self) -> str: ...


class StopChecker:
    """Feeds one request's tokens through its detokenizer and stop conditions."""

    def __init__(self, params: StopParams, detokenizer: TokenTexts) -> None:
        self.params = params
        self.detokenizer = detokenizer
        self.num_tokens = 0
        self.finish_reason: FinishReason | None = None
        self._held = ""
        self._stop_token_ids = frozenset(params.stop_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def add_token(self, token_id: int) -> StopUpdate:
        """One sampled token -> the text it releases and, maybe, a finish reason."""
        assert not self.is_finished, "token added after the request finished"
        self.num_tokens += 1
        if token_id in self._stop_token_ids:
            # The stop token's own text is not part of the output; what was held back is.
            released, matched = self._drain("")
            return self._finish("stop", released, token_id if matched is None else matched)
        text = self.detokenizer.add_token(token_id)
        if self.params.max_tokens is not None and self.num_tokens >= self.params.max_tokens:
            released, matched = self._drain(text)
            return self._finish("stop" if matched else "length", released, matched)
        released, matched = self._scan(text)
        if matched is not None:
            return self._finish("stop", released, matched)
        return StopUpdate(released)

    def flush(self) -> str:
        """The request ends for another reason (context full): release what is held."""
        released, _ = self._drain("")
        return released

    def _drain(self, text: str) -> tuple[str, str | None]:
        """Like _scan, for the last text: the detokenizer's tail joins and nothing stays held."""
        released, matched = self._scan(text + self.detokenizer.finalize())
        if matched is None:
            released += self._held
        self._held = ""
        return released, matched

    def _scan(self, text: str) -> tuple[str, str | None]:
        """Add text to the held tail; return (text safe to emit, the stop string that matched)."""
        held = self._held + text
        stops = self.params.stop
        matches = [(held.find(s), i) for i, s in enumerate(stops) if s in held]
        if matches:
            position, index = min(matches)  # earliest match; the first listed breaks ties
            self._held = ""
            return held[:position], stops[index]
        num_held = max((_overlap(held, s) for s in stops), default=0)
        self._held = held[len(held) - num_held :]
        return held[: len(held) - num_held], None

    def _finish(self, reason: FinishReason, text: str, stop_reason: str | int | None) -> StopUpdate:
        self.finish_reason = reason
        self._held = ""
        return StopUpdate(text, reason, stop_reason)


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for length in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:length]):
            return length
    return 0
