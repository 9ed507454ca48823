"""Generation engine: one dedicated MLX thread runs continuous batching for one model.

Callers on any thread (an HTTP event loop, `rag ask`) call `submit()` and read the returned stream;
the engine thread owns every MLX array, the scheduler and the KV cache, and loops:

    1. take in new requests and cancellations (sleep while there is nothing to do)
    2. schedule: which requests run this step and how many tokens each (scheduler.py)
    3. run: launch the step's forward passes over the slot KV cache (runner.py); a request's
       input may be the token the previous step is still sampling
    5. stop and detokenize the previous step's tokens (stop tokens and strings, max_tokens,
       UTF-8-safe text) while this step computes
    6. deliver: one chunk per token to its stream; finished requests leave the batch
    4. sample this step: each request's fp32 distribution, one seeded draw (sampling.py), now
       that the histories its penalties read are complete

So Python's work for one step overlaps the model's work for the next, as mlx-lm's generate_step
does; a request that stops has one wasted token computed. A step that samples some request's
first token is delivered before the next launch instead: on a CPU, MLX's async_eval computes
most of a step before it returns, so launching first would add a decode step to that request's
time to first token. A long prompt is prefilled in budget-sized chunks beside the running
decodes, so it never freezes the other streams; a cancelled request leaves the batch at the next
step scheduled after the cancel.

The prefix cache (prefix_cache.py, through engine_prefix.py) joins the loop at four points:

    1. admission: the prompt is looked up; the scheduler counts the tokens found (all but the
       last prompt token at most) as computed. A request whose blocks are being read from SSD,
       or computed by another request, waits outside the scheduler until they are cached
    3. launch: a request's first step loads the found blocks into its slot first; after the
       step's passes, every block its chunk completed is copied out of the slot into RAM, so
       even a request cancelled mid-prefill leaves its prefix behind
    5. completion: the blocks of the step just computed are spilled to SSD (write-behind)
    6. finish: the blocks and tail of a finished request's answer are cached too

The MTP lane (engine_mtp.py) joins when the engine holds at most `mtp_max_requests` requests and
the model has a draft head: such a request drafts before its step, its step verifies [x_n, drafts]
as one chunk, and the step is not overlapped with the next (its tokens decide the next drafts).

Ignores: HTTP and chat formats (callers pass token ids; `apply_chat_template` helps), how drafts
are made and accepted (engine_mtp.py), and several models (one engine, one model; a pool of engines is the model pool's job).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from inference.backend import GenerationChunk, GenerationError, GenerationRequest, Usage
from inference.chat_tokenizer import ChatTokenizer
from inference.engine_mtp import LaneTotals, MTPLane, verify_rows
from inference.engine_prefix import PrefixSharing
from inference.engine_requests import RequestState
from inference.engine_stream import GenerationHandle
from inference.engine_types import (
    ContextLengthError,
    EngineClosedError,
    EngineConfig,
    EngineLoad,
    StepRecord,
)
from inference.fused_attention import fuse_attention_layers
from inference.fused_mlp import fuse_swiglu_mlps
from inference.fused_norm import fuse_rms_norms
from inference.fused_rope import fuse_rope
from inference.head_prefix_ssd import DEFAULT_HEAD_PREFIX_SSD_BYTES, HeadPrefixSSD
from inference.model_fingerprint import fingerprint_model_dir, parameters_dtype
from inference.model_settings import read_model_settings
from inference.mtp_head import MTPHead, fingerprint_head, load_head
from inference.paths import data_dir
from inference.prefix_cache import (
    PrefixCache,
    PrefixCacheStats,
    disabled_stats,
    unsupported_reason,
)
from inference.runner import ModelRunner, RunnerConfig, RunOutput
from inference.sampling import compute_logprobs, compute_probs, sample
from inference.scheduler import CountingKVCapacity, ScheduledStep, Scheduler
from inference.thread_exit import wait_os_thread_exit

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

__all__ = [
    "ContextLengthError",
    "Engine",
    "EngineClosedError",
    "EngineConfig",
    "EngineLoad",
    "GenerationChunk",
    "GenerationHandle",
    "GenerationRequest",
    "PrefixCacheStats",
    "StepRecord",
    "Usage",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 4096  # for models whose config names no context length
CLEAR_CACHE_EVERY = 256  # steps between returning MLX's freed buffers to the system
PLAIN_SAMPLE_STEPS = 4  # plain steps of a streak averaged into one price for the MTP policy


@dataclass
class _InFlight:
    """A launched step: its forward passes (and later its sampling) compute in the background."""

    step: ScheduledStep
    out: RunOutput
    started: float
    states: list[RequestState] | None = None  # the requests sampled, one per row of tokens
    tokens: mx.array | None = None  # (rows,) lazy
    logits: mx.array | None = None  # the rows sampled, for logprobs
    stored_keys: list[str] = field(default_factory=list)  # prefix blocks the step computed
    has_first_token: bool = False  # some request samples its first token
    lane_open: bool = False  # the MTP lane ran this step: complete it before the next launch
    ran_ahead: bool = False  # launched before the step before it completed (pipelined)
    verified: dict[str, int] = field(default_factory=dict)  # request -> drafts it verifies
    committed: dict[str, tuple[int, ...]] = field(default_factory=dict)  # its verdict's tokens


class Engine:
    """A continuous-batching generator for one mlx-lm model; implements GenerationBackend."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        config: EngineConfig | None = None,
        model_name: str = "model",
        on_step: Callable[[StepRecord], None] | None = None,
        model_fingerprint: str | None = None,
        mtp_head: MTPHead | None = None,
    ) -> None:
        """model_fingerprint (model_fingerprint.py) names the model's SSD prefix cache; without
        one the prefix cache stays in RAM. mtp_head: the model's draft head, for the MTP lane."""
        self.config = config or EngineConfig()
        self._model_name = model_name
        self._chat = ChatTokenizer(tokenizer)  # encode / decode / chat template, as upstreams do
        # The Rust tokenizer decodes fastest; transformers' wrapper is the fallback.
        self._decoder = getattr(tokenizer, "backend_tokenizer", None) or tokenizer
        self._eos_token_ids = self._chat.eos_token_ids
        args = getattr(model, "args", None)
        self._vocab_size: int | None = getattr(args, "vocab_size", None)
        self._max_model_len = self.config.max_model_len or int(
            getattr(args, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN
        )
        max_kv_tokens = self.config.max_kv_tokens or self.config.max_num_seqs * self._max_model_len
        if max_kv_tokens < self._max_model_len:
            raise ValueError(
                f"max_kv_tokens ({max_kv_tokens}) must hold one request of max_model_len "
                f"({self._max_model_len}) tokens"
            )
        self._runner = ModelRunner(
            model,
            RunnerConfig(
                num_slots=self.config.max_num_seqs,
                pass_cost_tokens=self.config.pass_cost_tokens,
            ),
        )
        self._scheduler = Scheduler(
            self.config.scheduler_config(), CountingKVCapacity(max_kv_tokens)
        )
        # Shared with callers' threads, under _lock.
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)

        self._prefix_cache_off = ""  # why there is no prefix cache
        self._prefix_cache = self._make_prefix_cache(model, model_fingerprint)
        self._prefix = (
            None if self._prefix_cache is None else PrefixSharing(self._prefix_cache, self._runner)
        )
        self._mtp_off = ""  # why there is no MTP lane
        self._mtp = self._make_mtp_lane(model, mtp_head)
        self._on_step = on_step
        self._states: dict[str, RequestState] = {}  # engine thread only, parked ones included
        self._num_steps = 0
        self._last_done: float | None = None  # when the last step completed
        # (since, steps): lone plain steps run ahead, completed in a row since `since`
        self._plain_streak: tuple[float, int] | None = None

        self._inbox: list[tuple[GenerationRequest, GenerationHandle]] = []
        self._cancelled: set[str] = set()
        self._active_ids: set[str] = set()
        self._num_running = 0  # as of the last step
        self._closing = False
        self._failure: GenerationError | None = None  # set when the thread has stopped
        self._thread = threading.Thread(target=self._run, name=f"engine-{model_name}", daemon=True)
        self._thread.start()

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        *,
        config: EngineConfig | None = None,
        model_name: str | None = None,
        on_step: Callable[[StepRecord], None] | None = None,
    ) -> Engine:
        """Load an mlx-lm model folder and start an engine on it."""
        from mlx_lm import load

        model, tokenizer = load(str(path))
        name = model_name or Path(path).name
        try:
            dtype = parameters_dtype(v for _, v in tree_flatten(model.parameters()))
            fingerprint: str | None = fingerprint_model_dir(path, dtype)
        except (OSError, ValueError) as exc:  # not a local folder of safetensors
            log.info("prefix cache: no fingerprint for %s (%s); RAM only", path, exc)
            fingerprint = None
        config = config or EngineConfig()
        head = None
        if config.mtp and config.mtp_depth is None and config.mtp_tuned and fingerprint:
            tuned = read_model_settings(fingerprint)
            if tuned is not None:  # `rag tune` measured this model here
                log.info("%s: MTP depth %d from rag tune", name, tuned.mtp_depth)
                config = replace(config, mtp=tuned.mtp_depth > 0, mtp_depth=tuned.mtp_depth or None)
        if config.mtp:
            try:
                head = load_head(Path(path), model)
            except (OSError, ValueError) as exc:  # a broken sidecar must not stop serving
                log.warning("MTP head of %s not loaded: %s", path, exc)
        return cls(
            model,
            tokenizer,
            config=config,
            model_name=name,
            on_step=on_step,
            model_fingerprint=fingerprint,
            mtp_head=head,
        )

    def _make_mtp_lane(self, model: nn.Module, head: MTPHead | None) -> MTPLane | None:
        config = self.config
        if not config.mtp:
            self._mtp_off = "turned off (mtp=False)"
        elif head is None:
            self._mtp_off = "the model has no draft head (rag mtp fit makes one)"
        elif not self._runner.has_hiddens:
            self._mtp_off = "the model's logits are not a projection of its final hidden states"
        else:
            try:
                lane = MTPLane(
                    model,
                    head,
                    max_requests=config.mtp_max_requests,
                    fixed_depth=config.mtp_depth,
                )
            except ValueError as exc:
                self._mtp_off = str(exc)
            else:
                lane.head_prefixes.ssd = self._make_head_prefix_ssd(head)
                return lane
        log.info("MTP lane off for %s: %s", self._model_name, self._mtp_off)
        return None

    def _make_head_prefix_ssd(self, head: MTPHead) -> HeadPrefixSSD | None:
        """The head's context over prompts on SSD, beside the trunk's blocks (under their lock),
        when the prefix cache has an SSD tier."""
        prefix_cache = self._prefix_cache
        if prefix_cache is None or not prefix_cache.has_ssd:
            return None
        ssd_dir = prefix_cache.config.ssd_dir
        assert ssd_dir is not None
        head_fingerprint = fingerprint_head(head)
        return HeadPrefixSSD(
            ssd_dir / "mtp-head" / head_fingerprint,
            head_fingerprint,
            min(DEFAULT_HEAD_PREFIX_SSD_BYTES, self.config.prefix_cache_ssd_bytes // 4),
        )

    @property
    def mtp_lane(self) -> MTPLane | None:
        """The speculative lane, or None (`mtp_off_reason` says why)."""
        return self._mtp

    @property
    def mtp_off_reason(self) -> str:
        return self._mtp_off

    def mtp_stats(self) -> LaneTotals | None:
        """The lane's counters since start (None without a lane); any thread may call it."""
        return None if self._mtp is None else self._mtp.totals()

    def _make_prefix_cache(self, model: nn.Module, fingerprint: str | None) -> PrefixCache | None:
        config = self.config
        if config.prefix_cache_ram_bytes == 0:
            self._prefix_cache_off = "prefix_cache_ram_bytes is 0"
            return None
        reason = unsupported_reason(model)
        if reason is not None:
            log.info("prefix cache off for %s: %s", self._model_name, reason)
            self._prefix_cache_off = reason
            return None
        ssd_dir = None
        if fingerprint is None:
            fingerprint = f"in-memory-{uuid.uuid4().hex}"  # keys valid for this engine only
        elif config.prefix_cache_ssd_bytes > 0:
            ssd_dir = (config.prefix_cache_dir or data_dir() / "kv-cache") / fingerprint
        return PrefixCache(
            config.prefix_cache_config(ssd_dir), fingerprint, on_read=self._wake_for_reads
        )

    def _wake_for_reads(self) -> None:
        """The SSD reader finished blocks (on its thread): an idle engine thread takes them in."""
        with self._lock:
            self._wakeup.notify()

    # -- GenerationBackend ---------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    def encode(self, text: str) -> list[int]:
        return self._chat.encode(text)

    def count_tokens(self, text: str) -> int:
        return self._chat.count_tokens(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._chat.decode(token_ids)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        return self._chat.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        """Queue a request; its chunks arrive on the returned stream."""
        num_prompt = len(request.prompt_ids)
        if num_prompt >= self._max_model_len:
            raise ContextLengthError(
                f"prompt has {num_prompt} tokens; {self._model_name} holds {self._max_model_len} "
                "in all, which leaves no room to generate"
            )
        if self._vocab_size is not None and max(request.prompt_ids) >= self._vocab_size:
            raise ValueError(
                f"prompt token id {max(request.prompt_ids)} is outside the vocabulary "
                f"(size {self._vocab_size})"
            )
        handle = GenerationHandle(request.request_id, self.cancel)
        with self._lock:
            if self._failure is not None:
                raise self._failure
            if self._closing:
                raise EngineClosedError(f"engine {self._model_name} is closed")
            if request.request_id in self._active_ids:
                raise ValueError(f"request id {request.request_id!r} is already in flight")
            self._active_ids.add(request.request_id)
            self._inbox.append((request, handle))
            self._wakeup.notify()
        return handle

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Hits, misses and each tier's contents (a snapshot; any thread may call it)."""
        if self._prefix_cache is None:
            return disabled_stats(self._prefix_cache_off, self.config.prefix_cache_block_size)
        return self._prefix_cache.stats()

    def load(self) -> EngineLoad:
        """Requests waiting for a place in the batch and requests in it, as of the last step."""
        with self._lock:
            num_running = min(self._num_running, len(self._active_ids))
            return EngineLoad(len(self._active_ids) - num_running, num_running)

    def cancel(self, request_id: str) -> None:
        """Drop the request at the next step (a no-op once it finished)."""
        with self._lock:
            if request_id in self._active_ids:
                self._cancelled.add(request_id)
                self._wakeup.notify()

    def close(self) -> None:
        """Stop the engine thread; unfinished streams end with EngineClosedError."""
        with self._lock:
            self._closing = True
            self._wakeup.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()
            wait_os_thread_exit(self._thread)  # its MLX thread-locals, before any exit

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the engine thread ---------------------------------------------------------------------

    def _observe_plain_streak(self, previous_done: float, now: float) -> None:
        """Price a plain step as a streak's elapsed time over its steps, PLAIN_SAMPLE_STEPS at a
        time: pipelined steps complete unevenly (one often right behind the one before, its
        compute overlapped with delivery work), so single periods are 1/5 or 6/5 of a step."""
        since, steps = self._plain_streak or (previous_done, 0)
        steps += 1
        if steps < PLAIN_SAMPLE_STEPS:
            self._plain_streak = (since, steps)
            return
        assert self._mtp is not None
        self._mtp.observe_step(1, (now - since) / steps)
        self._plain_streak = (now, 0)

    def _fuse_activations(self) -> None:
        """On a CPU device, SwiGLU activations and attention softmax in fused loops (~10% of a
        16-row decode step, half of a long prompt's attention), RMSNorm and RoPE as a few fused
        operations instead of MLX's CPU fallback graphs (~20% of a one-row decode step).

        Here, on the engine thread, before any step: the swap's probe evaluates arrays, and an
        MLX 0.32 process aborts at exit when a thread's first evaluation follows the main
        thread's (ml-explore/mlx#3126)."""
        head = self._mtp.head if self._mtp is not None else None
        modules = [self._runner.model] + ([head] if head is not None else [])
        num_mlps = sum(fuse_swiglu_mlps(module) for module in modules)
        num_attention = sum(fuse_attention_layers(module) for module in modules)
        num_norms = sum(fuse_rms_norms(module) for module in modules)
        num_ropes = sum(fuse_rope(module) for module in modules)
        if num_mlps or num_attention or num_norms or num_ropes:
            log.info("%s: fused CPU activations in %d MLPs, softmax in %d attention layers, "
                     "%d RMSNorms and %d RoPEs", self._model_name, num_mlps, num_attention,
                     num_norms, num_ropes)  # fmt: skip

    def _run(self) -> None:
        error: GenerationError = EngineClosedError(f"engine {self._model_name} was closed")
        in_flight: _InFlight | None = None
        try:
            self._fuse_activations()
            while self._take_inbox(wait=in_flight is None):
                if in_flight is not None and (
                    in_flight.has_first_token or self._lane_needs_tokens(in_flight)
                ):
                    # Time to first token (module docstring); a lane step's tokens pick the
                    # next drafts.
                    self._complete(in_flight)
                    in_flight = None
                # 2-3. Schedule and launch the next step; it computes while ...
                launched = self._launch()
                if launched is not None:
                    launched.ran_ahead = in_flight is not None
                # 5-6. ... the step before is stopped, detokenized and delivered.
                if in_flight is not None:
                    self._complete(in_flight)
                # 4. Sample the new step, with every history up to date.
                in_flight = self._sample(launched) if launched is not None else None
        except Exception as exc:  # a bug or an MLX failure: every stream learns of it
            error = GenerationError(f"engine {self._model_name} failed: {exc!r}")
            error.__cause__ = exc
        finally:
            with self._lock:
                self._failure = error
                pending = [handle for _, handle in self._inbox]
                self._inbox.clear()
            for handle in pending + [state.handle for state in self._states.values()]:
                handle.fail(error)
            self._states.clear()
            if self._prefix is not None and isinstance(error, EngineClosedError):
                self._prefix.spill_finished()  # a clean close: the last answers' blocks too
            if self._prefix_cache is not None:
                self._prefix_cache.close()  # finishes the queued SSD writes
            if self._mtp is not None:
                self._mtp.head_prefixes.close()  # and the head's

    def _take_inbox(self, *, wait: bool) -> bool:
        """Step 1: admit new requests and drop cancelled ones; False once closing."""
        prefix = self._prefix
        if wait and not self._has_work():
            if prefix is not None:
                prefix.spill_finished()
            if not self._states:
                mx.clear_cache()  # going idle: hand freed buffers back
        with self._lock:
            while wait and not (
                self._closing
                or self._inbox
                or self._cancelled
                or self._has_work()
                or (prefix is not None and prefix.has_ready())
            ):
                self._wakeup.wait()
            if self._closing:
                return False
            new, self._inbox = self._inbox, []
            cancelled, self._cancelled = self._cancelled, set()
        for request, handle in new:
            state = RequestState.make(
                request,
                handle,
                decoder=self._decoder,
                eos_token_ids=self._eos_token_ids,
                max_model_len=self._max_model_len,
            )
            self._states[request.request_id] = state
            self._admit(state)
        if prefix is not None:
            for state in prefix.take_ready():  # their blocks were read, stored or abandoned
                if state.request_id in self._states:
                    self._admit(state)
        for request_id in cancelled:
            self._abort(request_id)
        return True

    def _has_work(self) -> bool:
        """Requests in the scheduler (parked ones wait for blocks, not for a step)."""
        return bool(self._scheduler.running_ids or self._scheduler.waiting_ids)

    def _admit(self, state: RequestState) -> None:
        """Into the scheduler, with the prompt tokens the prefix cache holds; or parked."""
        num_cached = 0 if self._prefix is None else self._prefix.admit(state)
        if num_cached is None:
            return  # it waits for blocks being read or computed; take_ready brings it back
        self._scheduler.add_request(
            state.request_id, len(state.request.prompt_ids), num_cached_tokens=num_cached
        )

    def _abort(self, request_id: str) -> None:
        state = self._states.pop(request_id, None)
        if state is None:
            return  # finished in the meantime
        self._scheduler.abort(request_id)
        if self._prefix is not None:
            self._prefix.finish(state)
        self._runner.release(request_id)
        self._forget([request_id])
        chunk = state.cancelled_chunk()
        if self._mtp is not None:
            chunk = replace(chunk, speculation=self._mtp.stats(state))
            self._mtp.forget(request_id)
        state.handle.put(chunk)

    def _forget(self, request_ids: Sequence[str]) -> None:
        if not request_ids:
            return
        with self._lock:
            self._active_ids.difference_update(request_ids)

    def _launch(self) -> _InFlight | None:
        """Steps 2-3: schedule, build the forward passes and start computing them."""
        if not self._states:
            return None
        lane = self._mtp
        lane_open = lane is not None and lane.is_open(len(self._states))
        started = time.perf_counter()  # a cycle's cost includes its drafting ...
        drafted = self._draft() if lane_open else {}
        if lane_open:
            assert lane is not None
            started += lane.take_catch_up_s()  # ... not the plain steps' share of the head
        step = self._scheduler.schedule()
        verified = {
            item.request_id: item.num_lookahead_tokens
            for item in step.items
            if item.request_id in drafted and item.num_lookahead_tokens
        }
        for request_id in drafted.keys() - verified.keys():  # preempted or cut short
            assert lane is not None
            lane.abandon_drafts(request_id)
            if request_id not in step.preempted_ids:
                self._scheduler.set_lookahead(request_id, 0)
        if not step.items:
            return None
        states = [self._states[rid] for rid in step.request_ids]
        for request_id in step.preempted_ids:
            # Its KV goes with its slot; a prefix still cached spares part of the recompute.
            self._runner.release(request_id)
            if self._prefix is not None:
                num_tokens = self._scheduler.num_tokens(request_id)
                num_cached = self._prefix.readmit(self._states[request_id], num_tokens - 1)
                self._scheduler.set_num_cached_tokens(request_id, num_cached)
        prefix = self._prefix
        for state in states:
            if state.restore is not None:
                assert prefix is not None
                prefix.restore(state)
        capture: frozenset[str] = frozenset()
        if lane_open:
            assert lane is not None
            capture = frozenset(s.request_id for s in states if not s.output_ids and lane.allows(s))
        pending = {s.request_id: s.pending for s in states if s.pending is not None}
        for request_id in verified:
            assert lane is not None and request_id not in pending
            pending[request_id] = lane.pending_drafts(request_id)
        out = self._runner.execute(
            step, {state.request_id: state.token_ids for state in states}, pending, capture=capture
        )
        num_rows = len(out.request_ids) - sum(verified.values())
        assert len(set(out.request_ids)) == num_rows, "one token per request per step"
        if lane is not None:
            for item in step.items:
                if item.request_id in out.captured:
                    lane.add_hiddens(
                        item.request_id, out.captured[item.request_id], item.start_position
                    )
        outputs = [] if out.logits is None else [out.logits]
        stored_keys: list[str] = []
        stored_arrays: list[mx.array] = []
        if prefix is not None:
            stored_keys, stored_arrays = prefix.store(step, states)
        mx.async_eval(*outputs, *self._runner.cache.arrays(), *stored_arrays)
        return _InFlight(
            step, out, started, stored_keys=stored_keys, lane_open=lane_open, verified=verified
        )

    def _lane_needs_tokens(self, in_flight: _InFlight) -> bool:
        """Whether the next launch must wait for this step's tokens: its verdicts, or tokens the
        next drafts start from. Plain steps the lane will not draft after run ahead (pipelined),
        as in the batch, so plain decoding in the lane costs what it costs outside."""
        lane = self._mtp
        if lane is None or not in_flight.lane_open:
            return False
        if in_flight.verified:
            return True
        if not any(lane.allows(state) for state in in_flight.states or ()):
            return False  # e.g. generation_mode "ar": never drafts
        return not lane.plain_ahead()

    def _draft(self) -> dict[str, int]:
        """Before scheduling: lane requests that are decoding draft, and ask for a verify chunk."""
        lane = self._mtp
        assert lane is not None
        drafted: dict[str, int] = {}
        running = set(self._scheduler.running_ids)
        for request_id, state in self._states.items():
            if not (
                request_id in running
                and state.output_ids
                and state.pending is None
                and lane.allows(state)
                and lane.can_draft(state)
                and self._scheduler.num_computed_tokens(request_id) == len(state.token_ids) - 1
            ):
                continue
            depth = lane.choose_depth(state)
            if depth:
                lane.draft(state, depth)
                self._scheduler.set_lookahead(request_id, depth)
                drafted[request_id] = depth
        return drafted

    def _sample(self, launched: _InFlight) -> _InFlight:
        """Step 4: draw one token per request that reached its last token; start computing it."""
        out = launched.out
        lane = self._mtp
        for request_id, num_drafts in launched.verified.items():
            assert lane is not None and out.logits is not None
            self._verify(launched, lane, request_id, num_drafts)
        # A request may have stopped or been cancelled since its step was scheduled.
        rows = [
            i
            for i, rid in enumerate(out.request_ids)
            if rid in self._states and rid not in launched.verified
        ]
        if out.logits is None or not rows:
            launched.states = []
            return launched
        logits = out.logits if len(rows) == len(out.request_ids) else out.logits[mx.array(rows)]
        states = [self._states[out.request_ids[i]] for i in rows]
        probs = compute_probs(
            logits,
            [state.sampling for state in states],
            [state.request.prompt_ids for state in states],
            [state.output_ids for state in states],
        )
        tokens = sample(probs, [state.seed for state in states], [out.positions[i] for i in rows])
        mx.async_eval(tokens)
        for row, state in enumerate(states):
            state.pending = tokens[row]  # the next step's input, before its value is known
            self._scheduler.record_output(state.request_id, 1)
        if lane is not None:
            for row, state in zip(rows, states, strict=True):
                if state.request_id in out.captured:
                    lane.count_plain(state.request_id, 1)  # the head read its chunk already
                elif launched.lane_open and out.hiddens is not None and lane.allows(state):
                    lane.add_hiddens(state.request_id, out.hiddens[row], out.positions[row] - 1)
                    lane.count_plain(state.request_id, 1)
                else:
                    lane.left_lane(state.request_id, 1)
        launched.states, launched.tokens, launched.logits = states, tokens, logits
        launched.has_first_token = any(not state.output_ids for state in states)
        return launched

    def _verify(self, launched: _InFlight, lane: MTPLane, request_id: str, num_drafts: int) -> None:
        """A verify chunk's rows: accept or reject its drafts (this waits for the step)."""
        state = self._states.get(request_id)
        if state is None:
            return  # cancelled since
        out = launched.out
        assert out.logits is not None
        rows = verify_rows(out.request_ids, request_id)
        assert len(rows) == num_drafts + 1, f"{request_id}: {len(rows)} verify rows"
        window = slice(rows[0], rows[-1] + 1)
        hiddens = None if out.hiddens is None else out.hiddens[window]
        outcome = lane.verify(state, out.logits[window], hiddens, num_drafts)
        self._runner.cache.trim(request_id, outcome.num_rejected)
        self._scheduler.record_output(
            request_id, len(outcome.token_ids), num_rejected_tokens=outcome.num_rejected
        )
        launched.committed[request_id] = outcome.token_ids

    def _complete(self, done: _InFlight) -> None:
        """Steps 5-6: wait for the step's tokens; stop, detokenize and deliver them."""
        states = done.states or []
        if done.tokens is None:
            mx.eval(self._runner.cache.arrays())  # a prefill-only step: don't run ahead of it
            token_ids: list[int] = []
        else:
            token_ids = done.tokens.tolist()
        if self._prefix is not None:
            # The step (and the finishes before it) computed: their blocks' host copies are
            # cheap now. Spilled before this step's finishes store theirs, which wait a step.
            self._prefix.spill(done.stored_keys)
        logprobs: list[Any] = [None] * len(states)
        if done.logits is not None and any(state.sampling.logprobs for state in states):
            params = [state.sampling for state in states]
            logprobs = compute_logprobs(done.logits, token_ids, params)

        chunks: list[tuple[GenerationHandle, GenerationChunk]] = []
        sampled: dict[str, int] = {}
        finished: list[str] = []
        deliveries = [
            (state, (token_id,), token_logprobs)
            for state, token_id, token_logprobs in zip(states, token_ids, logprobs, strict=True)
        ]
        deliveries += [
            (self._states[rid], tokens, None)
            for rid, tokens in done.committed.items()
            if rid in self._states
        ]
        for state, tokens, token_logprobs in deliveries:
            if state.request_id not in self._states:
                continue  # cancelled while its token was computed
            for token_id in tokens:
                sampled[state.request_id] = token_id
                chunk = state.accept(token_id, token_logprobs)
                if chunk.finish_reason is not None:
                    chunk = self._finish(state, chunk)
                    finished.append(state.request_id)
                chunks.append((state.handle, chunk))
                if chunk.finish_reason is not None:
                    break  # tokens past a stop are dropped
        self._forget(finished)  # before delivery: a caller may reuse the id at once
        with self._lock:
            self._num_running = len(self._scheduler.running_ids)
        for handle, chunk in chunks:
            handle.put(chunk)

        now = time.perf_counter()
        if self._mtp is not None and done.lane_open and len(done.step.items) == 1:
            # A lone request's period by width prices the drafts: a cycle's from its launch
            # (drafting included) to its verdict; plain steps' only when they ran ahead, as
            # plain decoding does, averaged over a streak (_observe_plain_streak).
            width = done.step.items[0].num_tokens
            if width > 1:
                since = (
                    done.started if self._last_done is None else max(self._last_done, done.started)
                )
                self._mtp.observe_step(width, now - since)
            elif done.ran_ahead and self._last_done is not None:
                self._observe_plain_streak(self._last_done, now)
            else:
                self._plain_streak = None
        else:
            self._plain_streak = None
        self._last_done = now
        self._num_steps += 1
        if self._num_steps % CLEAR_CACHE_EVERY == 0:
            mx.clear_cache()
        if self._on_step is not None:
            self._on_step(
                StepRecord(
                    index=self._num_steps - 1,
                    items=done.step.items,
                    preempted_ids=done.step.preempted_ids,
                    sampled=sampled,
                    finished_ids=tuple(finished),
                    num_passes=done.out.num_passes,
                    duration_s=time.perf_counter() - done.started,
                    committed=dict(done.committed),
                )
            )

    def _finish(self, state: RequestState, chunk: GenerationChunk) -> GenerationChunk:
        """The request's last chunk: it leaves the scheduler, the prefix cache keeps its blocks."""
        self._scheduler.finish(state.request_id)
        if self._prefix is not None:
            self._prefix.finish(state)  # before its slot goes: it caches the answer
        self._runner.release(state.request_id)
        del self._states[state.request_id]
        if self._mtp is not None:
            chunk = replace(chunk, speculation=self._mtp.stats(state))
            self._mtp.forget(state.request_id)
        return chunk
