"""How a fitted head does in real draft-verify decoding: acceptance and decode speed.

`measure_acceptance` pools MTPDecoder's acceptance over prompts at one depth; `compare_modes`
times plain decoding against the MTP lane at several depths over the same prompts.
Ignores: fitting and the teacher-forced estimate (mtp_fit), prefill time, and batching (one
sequence at a time, as MTPDecoder decodes).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from inference.mtp_decode import AcceptanceStats, MTPDecoder, Trunk, iter_plain
from inference.mtp_head import MTPHead
from inference.sampling import SamplingParams


@dataclass
class ModeResult:
    """One decoding mode over a set of prompts: pooled tokens and decode time, and for the MTP
    lane the pooled acceptance."""

    mode: str
    num_tokens: int = 0
    decode_seconds: float = 0.0
    stats: AcceptanceStats | None = None

    @property
    def decode_tok_s(self) -> float:
        return self.num_tokens / max(self.decode_seconds, 1e-9)


def compare_modes(
    trunk: Trunk,
    head: MTPHead,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    depths: Sequence[int],
    max_tokens: int,
) -> dict[str, ModeResult]:
    """Plain decoding ("ar") and the MTP lane at each depth ("d1".."d3") over the same prompts,
    modes alternating per prompt; decode time counts from the first token (prefill apart).
    The first prompt is run once untimed to warm up."""
    results = {"ar": ModeResult("ar")}
    results |= {f"d{d}": ModeResult(f"d{d}", stats=AcceptanceStats(d)) for d in depths}
    for index, prompt in enumerate([prompts[0], *prompts]):
        for mode, result in results.items():
            decoder = None
            if mode == "ar":
                tokens = iter_plain(trunk.model, prompt, params)
            else:
                decoder = MTPDecoder(trunk, head, params, int(mode[1:]))
                tokens = decoder.generate(prompt, max_tokens)
            count, first, last = 0, 0.0, 0.0
            for _ in tokens:
                count += 1
                last = time.perf_counter()
                if count == 1:
                    first = last
                if count == max_tokens:
                    break
            if index == 0:
                continue  # warm-up
            result.num_tokens += count - 1
            result.decode_seconds += last - first
            if decoder is not None and result.stats is not None:
                _pool(result.stats, decoder.stats)
    return results


def measure_acceptance(
    trunk: Trunk,
    head: MTPHead,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    depth: int,
    max_tokens: int,
) -> AcceptanceStats:
    """Acceptance of real draft-verify decoding over the prompts, pooled over all cycles."""
    pooled = AcceptanceStats(depth)
    for prompt in prompts:
        decoder = MTPDecoder(trunk, head, params, depth)
        for _ in decoder.generate(prompt, max_tokens):
            pass
        _pool(pooled, decoder.stats)
    return pooled


def _pool(into: AcceptanceStats, stats: AcceptanceStats) -> None:
    into.num_cycles += stats.num_cycles
    into.num_resampled += stats.num_resampled
    for j, count in enumerate(stats.accepted_at):
        into.accepted_at[j] += count
