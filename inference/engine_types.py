"""The engine's boundary types: its config, the record of one step, and its errors.

Ignores: everything the engine does with them (engine.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from inference.backend import GenerationError
from inference.kv_blocks import DEFAULT_BLOCK_SIZE
from inference.prefix_cache import DEFAULT_RAM_BYTES, DEFAULT_SSD_BYTES, PrefixCacheConfig
from inference.runner import RunnerConfig
from inference.scheduler import ScheduledItem, SchedulerConfig


class ContextLengthError(ValueError):
    """The prompt leaves no room to generate within the model's context (OpenAI's 400)."""


class EngineClosedError(GenerationError):
    """The engine was closed before the request finished."""


@dataclass(frozen=True)
class EngineConfig:
    """Batching limits of one engine; the server's flags mirror these fields."""

    max_num_seqs: int = 16  # requests decoding at once
    max_num_batched_tokens: int = 256  # tokens through the model per step (the prefill chunk)
    max_model_len: int | None = None  # prompt + completion; None: the model's own limit
    max_kv_tokens: int | None = None  # KV budget; None: max_num_seqs * max_model_len
    pass_cost_tokens: int = 8  # padding vs another forward pass; see RunnerConfig
    # Shared-prefix KV cache (prefix_cache.py): 0 RAM bytes turns it off; 0 SSD bytes keeps it
    # in RAM. The SSD tier needs the model's fingerprint (Engine.from_path computes it).
    prefix_cache_ram_bytes: int = DEFAULT_RAM_BYTES
    prefix_cache_ssd_bytes: int = DEFAULT_SSD_BYTES
    prefix_cache_block_size: int = DEFAULT_BLOCK_SIZE  # tokens per cached block
    prefix_cache_dir: Path | None = None  # None: $RAG_DATA_DIR/kv-cache; one folder per model
    # MTP lane (engine_mtp.py): speculative decoding with the model's draft head, when it has
    # one, for requests running while the engine holds at most mtp_max_requests of them.
    mtp: bool = True
    mtp_depth: int | None = None  # None: as `rag tune` chose, else adaptive; 1..3: that depth
    mtp_tuned: bool = True  # False: ignore `rag tune`'s choice (mtp_depth None is then adaptive)
    mtp_max_requests: int = 1

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_kv_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 2):
                raise ValueError(f"{name} must be an int >= 2 or None, got {value!r}")
        if self.mtp_depth is not None and self.mtp_depth not in (1, 2, 3):
            raise ValueError(
                f"mtp_depth must be 1, 2, 3 or None (adaptive), got {self.mtp_depth!r}"
            )
        if self.mtp_max_requests < 1:
            raise ValueError(f"mtp_max_requests must be >= 1, got {self.mtp_max_requests}")
        if isinstance(self.prefix_cache_dir, str):  # from a CLI flag or a JSON config
            object.__setattr__(self, "prefix_cache_dir", Path(self.prefix_cache_dir))
        # SchedulerConfig, RunnerConfig and PrefixCacheConfig check the rest.
        self.scheduler_config()
        RunnerConfig(num_slots=self.max_num_seqs, pass_cost_tokens=self.pass_cost_tokens)
        self.prefix_cache_config(None)

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens)

    def prefix_cache_config(self, ssd_dir: Path | None) -> PrefixCacheConfig:
        return PrefixCacheConfig(
            block_size=self.prefix_cache_block_size,
            ram_bytes=self.prefix_cache_ram_bytes,
            ssd_bytes=self.prefix_cache_ssd_bytes,
            ssd_dir=ssd_dir,
        )


@dataclass(frozen=True)
class EngineLoad:
    """How busy the engine is now, for metrics and routing (a snapshot; read on any thread)."""

    num_waiting: int  # submitted, not yet admitted to the batch (incl. preempted ones)
    num_running: int  # in the batch: prefilling or decoding


@dataclass(frozen=True)
class StepRecord:
    """What one engine step did, for tests and metrics (the callback runs on the engine thread)."""

    index: int
    items: tuple[ScheduledItem, ...]
    preempted_ids: tuple[str, ...]
    sampled: Mapping[str, int]  # request id -> the (last) token it got this step
    finished_ids: tuple[str, ...]
    num_passes: int
    duration_s: float
    committed: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # MTP lane: all tokens
