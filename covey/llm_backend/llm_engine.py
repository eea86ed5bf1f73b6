"""The engine: requests in, one scheduled step at a time, outputs out.

Not thread-safe by design; `LLM` drives it synchronously and `AsyncLLM` from one thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from covey.cache.chunk_store import ChunkStore
from covey.errors import (
    ConfigError,
    EngineError,
    InvalidRequestError,
    ModelLoadError,
    NotSupportedError,
    RequestNotFoundError,
)
from covey.llm_backend.blend_forward import BlendPolicy, default_check_layers
from covey.llm_backend.block_manager import BlockManager
from covey.llm_backend.choices import keep_only
from covey.llm_backend.chunk_planner import ChunkPlanner
from covey.llm_backend.chunk_transfer import ChunkTransfer
from covey.llm_backend.compiled_decode import compile_env_off, engine_decode_step
from covey.llm_backend.config import EngineConfig
from covey.llm_backend.cpu_threads import apply_num_threads, user_chose_threads
from covey.llm_backend.engine_client import CacheReport, EngineStats, Prompt
from covey.llm_backend.kv_pool import KVPool
from covey.llm_backend.kv_sizing import num_kv_blocks
from covey.llm_backend.kv_swap import KVSwap
from covey.llm_backend.model import LlamaModel
from covey.llm_backend.model_runner import ModelRunner
from covey.llm_backend.model_source import ModelSource, resolve_model
from covey.llm_backend.option_scoring import ScoringContext, option_logprobs
from covey.llm_backend.output_processor import OutputProcessor
from covey.llm_backend.outputs import RequestOutput
from covey.llm_backend.pause_policy import PauseCosts, PausePolicy
from covey.llm_backend.paused_kv import PausedKV, StepSwaps
from covey.llm_backend.prefill_profile import prefill_profile, swap_profile
from covey.llm_backend.quantization import (
    dense_copy_bytes,
    keep_dense_copies,
    quantization_of,
    quantize,
)
from covey.llm_backend.quantization_default import auto_quantization
from covey.llm_backend.request_validator import (
    CheckedRequest,
    RequestValidator,
    check_priority,
    check_request_id,
)
from covey.llm_backend.rope_rerotation import RopeRerotator
from covey.llm_backend.sampler import sample
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.scheduler import ScheduledSeq, Scheduler, SchedulerConfig
from covey.llm_backend.segments import Segment, SegmentSpan
from covey.llm_backend.sequence import FinishReason, Sequence, SequenceStatus
from covey.llm_backend.thread_governor import ThreadGovernor, process_governor
from covey.llm_backend.tokenizer import Tokenizer, load_tokenizer
from covey.llm_backend.weight_loader import load_model

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# The swap budget: the blocks whose copy (each direction) takes this long on this machine
# may move per step, about a tenth of a decode step of the embedded model on a CPU.
SWAP_STEP_S = 0.005

# What a chunk warmed on its own follows (see `add_warm_chunk`): any text keeps it off
# position 0, the attention sink.
WARM_PREAMBLE = "Passage:\n"


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, model: LlamaModel | None = None) -> None:
        """`model` reuses weights loaded from `config.model` (several engines, one model)."""
        self.config = config = config or EngineConfig()
        if config.compile is None:
            compile_env_off()  # a bad COVEY_COMPILE fails here, not after the model loads
        self.num_threads = apply_num_threads(config.num_threads)
        # Fits the thread count to the free cores between steps (thread_governor.py).
        self.thread_governor: ThreadGovernor | None = (
            None if user_chose_threads(config.num_threads) else process_governor()
        )
        self.device = config.torch_device()
        self.source = resolve_model(config.model)
        self.tokenizer: Tokenizer | None = self._load_tokenizer()
        if model is None:
            dtype = config.torch_dtype()
            self.quantization = config.quantization
            if self.quantization == "auto":
                self.quantization = auto_quantization(self.source, self.device, dtype)
            model = load_model(self.source, dtype, self.device)
            if self.quantization:
                quantize(model, self.quantization)
                keep_dense_copies(model, config.dense_prefill_weights)
        else:
            self.quantization = quantization_of(model)
            if config.quantization not in ("auto", self.quantization):
                raise ConfigError(
                    f"EngineConfig.quantization={config.quantization!r} does not match the "
                    f"given model's weights ({self.quantization or 'dense'})"
                )
        self.model = model
        self.dtype = model.norm.weight.dtype  # the pool stores what the model computes
        # Which files the weights came from, read once, now that they are loaded: reports
        # must not stat a file that may since be gone, and a file replaced in place must not
        # key a profile measured on the weights still in memory.
        self._weights_id = _weights_identity(self.source)
        # What identifies this engine's speed (model and its files, device, dtype,
        # quantization); the measured profiles are kept on disk under it.
        self._profile_key: tuple[object, ...] = (
            self.source.name,
            self._weights_id,
            str(self.device),
            self.dtype,
            self.quantization,
            dense_copy_bytes(model) > 0,  # prefill runs on the dense copies, faster
        )
        args = self.model.args
        if config.max_model_len and config.max_model_len > args.max_position:
            raise ConfigError(
                f"EngineConfig.max_model_len ({config.max_model_len}) exceeds the model's "
                f"context window ({args.max_position})"
            )
        self.max_model_len = config.max_model_len or args.max_position
        num_blocks = num_kv_blocks(config, args, self.dtype, self.device)
        self.pool = KVPool(args, num_blocks, config.block_size, self.dtype, self.device)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.runner = ModelRunner(self.model, self.pool, self.device)
        self.runner.compiled = engine_decode_step(self.model, config.compile, self.device)
        self.chunk_store: ChunkStore | None = None
        self.chunk_planner = self._chunk_cache(config) if config.chunk_cache != "off" else None
        self.kv_swap = KVSwap(self.pool)
        self.pause_policy = PausePolicy(config.pause_policy, self._pause_costs())
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens),
            self.block_manager,
            self.chunk_planner,
            PausedKV(
                self.pause_policy,
                self.block_manager,
                self._bytes_per_block,
                self._swap_blocks_per_step(),
                config.pause_swap_bytes // self._bytes_per_block,
            ),
        )
        self.validator = RequestValidator(
            self.tokenizer, args.vocab_size, self.max_model_len, self.block_manager
        )
        self.outputs = OutputProcessor(self.tokenizer, self.max_model_len)
        self.requests: dict[str, Sequence] = {}
        self._generators: dict[int, torch.Generator] = {}

    @property
    def _bytes_per_block(self) -> int:
        return self.pool.bytes_per_block(self.model.args, self.config.block_size, self.dtype)

    def _pause_costs(self) -> PauseCosts:
        """Recompute and swap costs for the pause policy, measured on this machine (cached
        per model and device: a few forward passes and copies, well under a second)."""
        prefill = prefill_profile(self.model, self._profile_key, self.num_threads)
        swap = swap_profile(
            self.model.args,
            self.config.block_size,
            self.dtype,
            self.device,
            (*self._profile_key, self.config.block_size),
            self.num_threads,
        )
        return PauseCosts(
            recompute_per_token_s=prefill.per_token_s,
            swap_out_fixed_s=swap.out_fixed_s,
            swap_out_per_byte_s=swap.out_per_byte_s,
            swap_in_fixed_s=swap.in_fixed_s,
            swap_in_per_byte_s=swap.in_per_byte_s,
            overlap=0.0,  # see kv_swap.py: the copies do not run beside the step's compute
        )

    def _swap_blocks_per_step(self) -> int:
        """The per-step swap budget: blocks one direction's copies move in SWAP_STEP_S."""
        costs = self.pause_policy.costs
        assert costs is not None
        per_block = costs.swap_out_per_byte_s * self._bytes_per_block
        return max(1, int(SWAP_STEP_S / per_block)) if per_block > 0 else 1 << 20

    def _chunk_cache(self, config: EngineConfig) -> ChunkPlanner:
        """The chunk KV store and what plans and moves chunk KV (chunk_cache != "off")."""
        layers = self.model.args.num_layers
        check = config.blend_check_layers or default_check_layers(layers)
        bad = [i for i in check if i >= layers]
        if bad:
            raise ConfigError(
                f"EngineConfig.blend_check_layers {bad} out of range: the model has "
                f"{layers} layers (0 to {layers - 1})"
            )
        profile = prefill_profile(self.model, self._profile_key, self.num_threads)
        args = self.model.args
        self.chunk_store = ChunkStore(
            config.chunk_store_bytes,
            profile.span_seconds,
            config.chunk_store_dir,
            config.chunk_store_disk_bytes,
            # What the KV depends on besides the tokens: another model never reads it.
            fingerprint=(
                f"model={self.source.name} weights={self._weights_id} "
                f"dtype={self.dtype} "
                f"quantization={self.quantization} layers={args.num_layers} "
                f"kv_heads={args.num_kv_heads} head_dim={args.dim_per_head} "
                f"rope_theta={args.rope_theta} rope_scaling={args.rope_scaling}"
            ),
            # What stored blend scores depend on: others' scores are not read back.
            scores_tag=f"check={sorted(set(check))} score={config.blend_score}",
        )
        self.runner.chunks = ChunkTransfer(
            self.pool, self.chunk_store, RopeRerotator(self.model.args)
        )
        self.runner.blend_ratio = config.blend_recompute_ratio
        self.runner.blend_check_layers = check
        self.runner.blend_sink_tokens = config.blend_sink_tokens
        self.runner.blend_policy = BlendPolicy(config.blend_score, config.blend_quota)
        self.runner.blend_stored_scores = config.blend_stored_scores
        return ChunkPlanner(
            self.chunk_store,
            config.chunk_cache,
            config.blend_recompute_ratio,
            check,
            layers,
            config.blend_sink_tokens,
            config.blend_stored_scores,
        )

    @property
    def model_name(self) -> str:
        return self.source.name

    def _load_tokenizer(self) -> Tokenizer | None:
        try:
            return load_tokenizer(self.source)
        except ModelLoadError:
            if self.source.format == "dummy":
                return None  # dummy weights without the embedded package: token ids only
            raise

    def tokenize(self, prompt: Prompt) -> tuple[list[int], list[SegmentSpan]]:
        """Token ids of a prompt (text, token ids or segments) and where each segment lies."""
        return self.validator.tokenize(prompt)

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> str:
        """Validate and queue a request; returns its id. Raises InvalidRequestError."""
        params = SamplingParams() if params is None else params
        checked = self.validator.check(prompt, params, request_id, priority, self.requests)
        seq = Sequence(
            checked.request_id,
            checked.token_ids,
            params,
            checked.priority,
            checked.spans,
        )
        self._set_sampling(seq, checked)
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq.request_id

    def _set_sampling(self, seq: Sequence, checked: CheckedRequest) -> None:
        """Per-request sampling state for `seq.params`: the seeded generator, the choice
        trie or option scorer, and token healing."""
        seq.choice_trie = checked.choice_trie
        seq.option_scorer = checked.option_scorer
        seq.choice_logprobs = None
        choices = checked.choice_trie is not None or checked.option_scorer is not None
        seq.healing = None if choices else checked.healing  # choices carry it in their tokens
        seq.healed_text = checked.healing.text if checked.healing is not None else ""
        self._generators.pop(seq.seq_id, None)
        if seq.params.seed is not None:
            self._generators[seq.seq_id] = torch.Generator(self.device).manual_seed(
                seq.params.seed
            )

    def add_prefill(
        self,
        prompt: Prompt,
        request_id: str | None = None,
        priority: int = 0,
        pin: str | None = None,
    ) -> str | None:
        """Compute a prompt's KV into the prefix cache without generating (early prefill).

        Only whole blocks are kept, so the prompt is cut to a multiple of the block size.
        `pin` names a pin that holds the blocks in the cache until `unpin(pin)`, unless
        pins would then pass MAX_PINNED_FRACTION of the pool (then the blocks stay cached,
        evictable). A pin is an optimisation and must never wedge the pool: when a request
        needs its room, the least recently asked-for pins are released first. A key already
        pinned is not prefilled again; asking for it makes it the most recently asked for.
        Returns the request id, or None when there is nothing to compute (everything
        cached, or shorter than a block).
        """
        checked = self.validator.check_prefill(prompt, request_id, priority, pin, self.requests)
        if checked is None:
            return None
        ids, bm = checked.token_ids, self.block_manager
        if bm.cached_prefix_blocks(ids) * bm.block_size == len(ids):
            self._pin(checked.pin, ids)
            return None
        seq = Sequence(
            checked.request_id,
            ids,
            SamplingParams(max_tokens=1),
            checked.priority,
            checked.spans,
            prefill_only=True,
        )
        seq.pin = checked.pin
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq.request_id

    def _pin(self, pin: str | None, token_ids: list[int]) -> None:
        """Hold the cached prefix of `token_ids` under `pin` if pins have room for it (else
        it stays cached, evictable). Accepted requests need no room kept for them here:
        the pin yields when one needs its blocks."""
        if pin is not None:
            self.block_manager.pin(pin, token_ids)

    def unpin(self, pin: str) -> bool:
        """Let a pinned prefix be evicted again; False if `pin` is not pinned."""
        return self.block_manager.unpin(pin)

    @property
    def pinned(self) -> dict[str, int]:
        """Pin key -> tokens it holds in the prefix cache (a pin that yielded its room to a
        request is gone)."""
        return self.block_manager.pinned

    def cache_report(self, prompts: list[list[int]], chunks: list[list[int]]) -> CacheReport:
        """What the caches hold of `prompts` and `chunks` (token ids), the prefill still
        queued, and this engine's prefill profile; read-only (`CacheReport`)."""
        bm, store = self.block_manager, self.chunk_store
        queued = 0
        for seq in self.scheduler.waiting:  # not matched to the cache yet: peek for it
            cached = seq.num_computed_tokens or bm.peek_prefix_blocks(seq.token_ids) * (
                bm.block_size
            )
            queued += max(len(seq.token_ids) - cached, 0)
        for seq in self.scheduler.running:
            queued += max(seq.num_prompt_tokens - seq.num_computed_tokens, 0)
        profile = prefill_profile(self.model, self._profile_key, self.num_threads)
        return CacheReport(
            cached_tokens=tuple(bm.peek_prefix_blocks(ids) * bm.block_size for ids in prompts),
            chunks_stored=None if store is None else tuple(store.contains_any(c) for c in chunks),
            queued_prefill_tokens=queued,
            prefill_fixed_s=profile.fixed_s,
            prefill_per_token_s=profile.per_token_s,
        )

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; None if it is unknown or done."""
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        self._finish(seq, FinishReason.ABORT)
        return self.outputs.output(seq, [])

    def pause_request(self, request_id: str, tool: str | None = None) -> None:
        """Hold a request aside while a tool runs, or, for one its own turn paused
        (pause_on_stop, pause_at_end), name the tool it waits for. The pause policy
        decides what happens to its KV; `tool`'s past pause-to-resume times tell it how
        long the wait will likely be."""
        if tool is not None and (not isinstance(tool, str) or not tool):
            raise InvalidRequestError(f"tool must be a non-empty str or None, got {tool!r}")
        seq = self._get(request_id)
        if seq.status is not SequenceStatus.PAUSED:
            self.scheduler.pause(seq)
            seq.paused_at = time.perf_counter()
        if tool is not None:
            seq.pause_tool = tool

    def resume_request(
        self, request_id: str, extra: Prompt, params: SamplingParams | None = None
    ) -> None:
        """Append `extra` (a tool's result) to a paused request and let it generate on.

        Everything so far becomes context: only the new tokens are prefilled on top of the
        KV kept in the pool, and the output (and `params.max_tokens`) count from here.
        """
        seq = self._get(request_id)
        if request_id not in self.scheduler.paused:
            raise InvalidRequestError(f"request {request_id!r} is not paused")
        params = seq.params if params is None else params
        checked = self.validator.check_resume(
            extra, params, request_id, seq.priority, context=len(seq)
        )
        if seq.paused_at is not None:
            self.pause_policy.times.record(seq.pause_tool, time.perf_counter() - seq.paused_at)
        seq.token_ids.extend(checked.token_ids)
        seq.pause_tool = seq.paused_at = None
        seq.start_new_turn(params)
        self._set_sampling(seq, checked)
        self.scheduler.resume(seq)

    def _get(self, request_id: str) -> Sequence:
        seq = self.requests.get(request_id)
        if seq is None:
            raise RequestNotFoundError(f"unknown or finished request {request_id!r}")
        return seq

    def stats(self) -> EngineStats:
        """Pool use, prefix-cache hits and queue lengths right now. A pinned block is never
        idle (its pin references it), so used, cached, pinned and free blocks partition the
        pool."""
        bm, sched = self.block_manager, self.scheduler
        free = len(bm.free_blocks)
        return EngineStats(
            model=self.model_name,
            block_size=bm.block_size,
            kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_blocks - free - bm.num_idle_cached - bm.num_pinned_blocks,
            kv_blocks_cached=bm.num_idle_cached,
            kv_blocks_pinned=bm.num_pinned_blocks,
            prefix_cache_queried_tokens=bm.stats.queried_tokens,
            prefix_cache_hit_tokens=bm.stats.hit_tokens,
            num_waiting=len(sched.waiting),
            num_running=len(sched.running),
            num_paused=len(sched.paused),
            chunk_cache=self._chunk_stats(),
            num_threads=self.num_threads,
            thread_decisions=dict(self.thread_governor.decisions) if self.thread_governor else {},
            **self._pause_stats(),
        )

    def _pause_stats(self) -> dict[str, object]:
        """EngineStats' fields on requests paused for tool calls."""
        sched, paused_kv = self.scheduler, self.scheduler.paused_kv
        held = {b for s in sched.paused.values() for b in s.block_table}
        return {
            "paused_bytes_preserved": len(held) * self._bytes_per_block,
            "paused_bytes_swapped": self.kv_swap.bytes_held,
            "swap_out_bytes": self.kv_swap.bytes_out,
            "swap_in_bytes": self.kv_swap.bytes_in,
            "pause_recompute_tokens": paused_kv.counters.recompute_tokens,
            "pause_decisions": dict(paused_kv.counters.decisions),
            "tool_seconds": self.pause_policy.times.estimates(),
        }

    def _chunk_stats(self) -> dict[str, dict[str, int]]:
        """Per tier: "pool" (the prefix cache, on chunk spans), "host" and "disk" (the
        chunk store). Tokens imported from the store count under "host" (a disk hit is
        promoted to host first)."""
        if self.chunk_planner is None or self.chunk_store is None:
            return {}
        c, bm = self.chunk_planner.counters, self.block_manager
        cached_blocks = len(bm.cached_nodes)
        tiers = self.chunk_store.stats()
        pool = {
            "hits": c.pool_hits,
            "misses": c.pool_misses,
            "evictions": bm.stats.evicted_blocks,
            "bytes": cached_blocks * self.pool.bytes_per_block(
                self.model.args, bm.block_size, self.dtype
            ),
            "entries": cached_blocks,
            "reused_tokens": c.pool_reused_tokens,
            "recomputed_tokens": 0,
        }
        host = {**tiers["host"], "reused_tokens": c.reused_tokens}
        host["recomputed_tokens"] = c.recomputed_tokens
        disk = {**tiers["disk"], "reused_tokens": 0, "recomputed_tokens": 0}
        return {"pool": pool, "host": host, "disk": disk}

    def load_chunk(self, chunk: Segment) -> str:
        """Whether the chunk store holds `chunk`'s KV in host memory now: "held" (it did),
        "loaded" (it was on disk only, and is now promoted) or "missing"."""
        store = self._store_for("warm_chunks")
        ids = self.validator.check_chunk(chunk)
        if not store.contains_any(ids):
            return "missing"
        disk_hits = store.stats()["disk"]["hits"]
        if store.get_any(chunk.chunk_id, ids) is None:
            return "missing"
        return "loaded" if store.stats()["disk"]["hits"] > disk_hits else "held"

    def add_warm_chunk(
        self, chunk: Segment, request_id: str | None = None, priority: int = 0
    ) -> str | None:
        """Queue a prefill of `chunk` on its own that stores its KV, blendable anywhere.
        None when the store holds it already.

        The chunk follows WARM_PREAMBLE, not position 0, so that its first token does not
        carry the sequence's attention sink. That does not make standalone KV blend well:
        benchmarks/rag_kv.py's standalone workload scores 0.167 against 0.583 for full
        prefill, the same at ratios 0 and 0.15, because KV computed without other passages
        before it is off on every token, and the model then answers from the last passage
        (a review's one-prompt probe needed ratio 0.9 to recover). KV stored from a
        request's own multi-passage prefill blends far better (ratio 0: 0.58 there).
        """
        store = self._store_for("warm_chunks")
        ids = self.validator.check_chunk(chunk)
        if store.contains_any(ids):
            return None
        request_id = check_request_id(request_id, self.requests)
        preamble = self._warm_preamble(len(ids))
        seq = Sequence(
            request_id,
            preamble + ids,
            SamplingParams(max_tokens=1),
            check_priority(priority),
            [
                *([SegmentSpan("static", 0, len(preamble))] if preamble else []),
                SegmentSpan("chunk", len(preamble), len(preamble) + len(ids), chunk.chunk_id),
            ],
            prefill_only=True,
        )
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def _warm_preamble(self, chunk_len: int) -> list[int]:
        """WARM_PREAMBLE's ids, or none where they would not fit with the chunk."""
        if self.tokenizer is None or not WARM_PREAMBLE:
            return []
        ids = self.tokenizer.encode(WARM_PREAMBLE)
        return ids if len(ids) + chunk_len < self.max_model_len else []

    def can_load_chunks(self) -> bool:
        """Whether warming without `compute` can do anything: only blending reads a chunk
        stored after another context (exact planning reads the disk tier itself), and only
        a disk tier holds what the host tier lacks."""
        store = self.chunk_store
        return store is not None and store.has_disk and self.config.chunk_cache == "blend"

    def warm_chunks(self, chunks: list[Segment], compute: bool = False) -> int:
        """Make the chunk store hold these chunks' KV now: loaded from disk, and with
        `compute` (see `AsyncLLM.warm_chunks` for why it is opt-in) the missing ones
        computed alone, batched together; returns how many were loaded or computed."""
        self._store_for("warm_chunks")
        if not compute and not self.can_load_chunks():
            return 0
        count, ids, seen = 0, [], set()
        for chunk in chunks:
            key = (chunk.text, chunk.token_ids)
            if key in seen:
                continue
            seen.add(key)
            state = self.load_chunk(chunk)
            if state == "loaded":
                count += 1
            elif state == "missing" and compute:
                rid = self.add_warm_chunk(chunk)
                if rid is not None:
                    ids.append(rid)
        if ids:
            self.run_to_completion(ids)
        return count + len(ids)

    def _store_for(self, what: str) -> ChunkStore:
        if self.chunk_store is None:
            raise NotSupportedError(
                f"{what} needs a chunk store: this engine has chunk_cache='off'"
            )
        return self.chunk_store

    def close(self) -> None:
        """Close the chunk store: host entries the disk tier lacks are written there, so a
        restarted engine on the same chunk_store_dir finds them. Requests using chunks
        afterwards are served without reuse."""
        if self.chunk_store is not None:
            self.scheduler.chunks = None
            for seq in self.requests.values():
                seq.chunk_plan = None
            self.chunk_store.close()

    def run_to_completion(
        self,
        request_ids: list[str],
        on_output: Callable[[RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Step until nothing is left to do; return the final outputs of `request_ids` in
        that order (for a request whose turn paused, its "paused" output). `on_output`
        sees every output as it comes (to stream deltas). If the
        loop is interrupted (an error, Ctrl-C), `request_ids` are aborted so their KV is
        freed, then the exception propagates. The synchronous drivers (`LLM`, the CLI,
        benchmarks) all step through here."""
        final: dict[str, RequestOutput] = {}
        try:
            while self.has_unfinished_requests():
                for out in self.step():
                    if on_output is not None:
                        on_output(out)
                    if out.finished or out.finish_reason == FinishReason.PAUSED:
                        final[out.request_id] = out
        except BaseException:
            for rid in request_ids:
                self.abort_request(rid)
            raise
        return [final[rid] for rid in request_ids]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and report every request that moved.

        A failure that belongs to one request (its forward pass, its sampling, its output)
        finishes that request with reason "error" and the error; the others go on. Sampling
        comes before any cursor moves, so a failed forward can be rerun one at a time.
        """
        plan = self.scheduler.schedule()
        # Requests the pool can never hold, already out of the queues, and those whose KV
        # did not come back from host memory: they fail alone. Each output is made only
        # after every copy, so nothing raised there can lose one (its stream would hang).
        lost = self._move_kv(plan.swaps)
        if lost:
            plan.scheduled = [item for item in plan.scheduled if item.seq not in lost]
            plan.chunk_items = [item for item in plan.chunk_items if item.seq not in lost]
        rejected = [self._fail(seq, exc) for seq, exc in [*plan.failed, *lost.items()]]
        if not plan.scheduled:
            if self.scheduler.waiting and not (plan.swaps.out or plan.swaps.into or rejected):
                # A last resort: admission checks and yielding pins should leave room for
                # every accepted request, but if the pool still cannot take the first one
                # (a bookkeeping fault), it fails alone instead of the step spinning.
                return [self._fail_unschedulable()]
            return rejected
        now = time.perf_counter()
        for item in plan.scheduled:
            if item.seq.metrics.first_scheduled_time is None:
                item.seq.metrics.first_scheduled_time = now
        if self.thread_governor is not None:
            self.num_threads = self.thread_governor.between_steps()
        ran = self.runner.execute_isolated(plan.scheduled, plan.block_copies, plan.chunk_items)
        failed = ran.failed
        tokens = self._sample(ran.seqs, ran.logits, failed)
        outputs = rejected
        for item in plan.scheduled:
            seq = item.seq
            if seq.seq_id in failed:
                outputs.append(self._fail(seq, failed[seq.seq_id]))
                continue
            if item.chunk is not None:
                self._advance_chunk_step(item)
            else:
                seq.num_computed_tokens += item.num_new_tokens
                self.block_manager.cache_full_blocks(seq)
            if seq.prefill_only and seq.num_computed_tokens == len(seq):
                outputs.append(self._guarded(seq, self._finish_prefill))
        for row, (seq, token) in enumerate(zip(ran.seqs, tokens)):
            if seq.seq_id in failed:
                continue
            if seq.option_scorer is not None:
                assert ran.logits is not None
                chosen = self._guarded(seq, self._choose_option, ran.logits[row])
                if chosen is not None:  # None: preempted to make room for scoring
                    outputs.append(chosen)
            elif token is not None:
                outputs.append(self._guarded(seq, self._append_token, token))
        return outputs

    def _move_kv(self, swaps: StepSwaps) -> dict[Sequence, Exception]:
        """This step's paused-KV copies, before anything writes the pool: out, then in.
        A swap-out that fails (host memory short) costs only a recompute on resume. A
        swap-in that fails leaves its request without its context's KV: returned with its
        error, for it to fail alone."""
        for item in swaps.out:
            try:
                self.kv_swap.swap_out(item.seq.seq_id, item.block_ids, item.num_tokens)
            except Exception:
                log.warning("swapping out %s failed; it recomputes on resume",
                            item.seq.request_id, exc_info=True)
                self.scheduler.paused_kv.release_host(item.seq)
                item.seq.discarded_tokens = item.num_tokens
        lost: dict[Sequence, Exception] = {}
        for item in swaps.into:
            try:
                self.kv_swap.swap_in(item.seq.seq_id, item.block_ids)
            except Exception as exc:
                lost[item.seq] = exc
        return lost

    def _advance_chunk_step(self, item: ScheduledSeq) -> None:
        """Move a chunk step's cursor; publish only exact KV in the prefix cache; store the
        spans it completed in the chunk store."""
        seq, step, bm = item.seq, item.chunk, self.block_manager
        assert step is not None and self.chunk_store is not None
        if step.blend_start is not None:
            # Blocks up to the blend's first token hold exact KV; none from there on do.
            if seq.inexact_from is None or step.blend_start < seq.inexact_from:
                seq.inexact_from = step.blend_start
            seq.num_computed_tokens = step.blend_start
            bm.cache_full_blocks(seq)
            bm.stop_caching(seq)
        seq.num_computed_tokens = step.next_position
        bm.cache_full_blocks(seq)
        plan = seq.chunk_plan
        if plan is None:
            return
        ready = [s for s in plan.to_store if s.end <= seq.num_computed_tokens]
        if ready:
            plan.to_store = [s for s in plan.to_store if s.end > seq.num_computed_tokens]
            self._store_spans(seq, ready)
        if plan.done:
            seq.chunk_plan = None

    def _store_spans(self, seq: Sequence, spans: list) -> None:
        """Keep the KV `seq` computed for `spans` in the chunk store (a full store evicts;
        one that cannot take an entry refuses it, which costs only a later recompute)."""
        assert self.runner.chunks is not None and self.chunk_planner is not None
        counters = self.chunk_planner.counters
        for span in spans:
            if self.runner.chunks.store.put(self.runner.chunks.export(seq, span)):
                counters.stored_spans += 1
            else:
                counters.store_refused += 1

    def _sample(
        self, seqs: list[Sequence], logits: torch.Tensor | None, failed: dict[int, Exception]
    ) -> list[int | None]:
        """One token per row of `logits` (None where it failed: its seq is in `failed`)."""
        if logits is None:
            return []
        with torch.inference_mode():  # logits are inference tensors: mask them in place
            for row, seq in enumerate(seqs):
                try:
                    if seq.choice_trie is not None:
                        seq.choice_trie.mask(logits[row], seq.output_token_ids)
                    elif seq.healing is not None and not seq.num_output_tokens:
                        keep_only(logits[row], seq.healing.allowed)
                except Exception as exc:
                    failed[seq.seq_id] = exc
        # A row scored as whole options is picked from later (`_choose_option`): it samples
        # greedily here, so its seeded generator is kept for the options.
        scored = [s.option_scorer is not None for s in seqs]
        params = [_GREEDY if o else s.params for s, o in zip(seqs, scored)]
        gens = [None if o else self._generators.get(s.seq_id) for s, o in zip(seqs, scored)]
        samples = sample(logits, params, gens)
        for row, exc in samples.errors.items():
            failed[seqs[row].seq_id] = exc
        return samples.tokens

    def _choose_option(self, seq: Sequence, last_logits: torch.Tensor) -> RequestOutput | None:
        """`seq`'s prompt is computed: score its options (option_scoring.py), pick one and
        end the turn with it as the output (finished, or paused with `pause_at_end`).

        The scheduler held the forks' blocks back with the step that completed the prompt
        (Scheduler._fork_reserve). Should they still be short (a failed fork's cleanup),
        `Scheduler.free_blocks_for` is the fallback: the lowest-priority requests are
        preempted, newest first, as for a decode that cannot grow. None (no output this
        step) when that is `seq` itself, or when another request's scoring in this step
        preempted it: it recomputes its prompt and is scored then."""
        scorer = seq.option_scorer
        assert scorer is not None
        if seq.status is not SequenceStatus.RUNNING:
            return None
        # The scheduler reserved the forks' blocks with this step (Scheduler._fork_reserve);
        # other scorers of the step or a failed fork's cleanup can still leave them short.
        need = self.block_manager.fork_blocks_needed(seq, seq.fork_tokens) if seq.fork_tokens else 0
        running, swaps = self.scheduler.free_blocks_for(seq, need)
        self._move_kv(swaps)
        if not running:
            return None
        ctx = ScoringContext(
            self.model, self.pool, self.block_manager, self.config.max_num_batched_tokens
        )
        token_logprobs = option_logprobs(ctx, seq, scorer, last_logits)
        index = scorer.pick(token_logprobs, seq.params, self._generators.get(seq.seq_id))
        by_option = {o: sum(lps) for o, lps in zip(scorer.options, token_logprobs)}
        seq.choice_logprobs = {option: by_option[option] for option in scorer.order}
        ids = list(scorer.token_ids[index])
        seq.token_ids.extend(ids)
        seq.output_text = scorer.options[index]
        seq.metrics.first_token_time = time.perf_counter()
        if seq.params.pause_at_end and len(seq) < self.max_model_len:
            # As on the trie path: the turn pauses for a tool. The option's tokens were
            # computed only in the freed forks, so they prefill again with the resumed text.
            self._pause_turn(seq)
        else:
            self._finish(seq, FinishReason.STOP)
        return self.outputs.output(seq, ids)

    def _guarded(self, seq: Sequence, fn: Callable[..., _T], *args) -> _T | RequestOutput:
        """`fn(seq, *args)`, or `seq` failed with its error when that raises."""
        try:
            return fn(seq, *args)
        except Exception as exc:
            return self._fail(seq, exc)

    def _fail(self, seq: Sequence, exc: Exception) -> RequestOutput:
        """Finish `seq` with reason "error", freeing its KV; the other requests go on."""
        log.warning("request %s failed in the engine", seq.request_id, exc_info=exc)
        self._finish(seq, FinishReason.ERROR)
        return self.outputs.output(seq, [], error=f"{type(exc).__name__}: {exc}")

    def _fail_unschedulable(self) -> RequestOutput:
        """Nothing runs and the first queued request cannot be admitted: fail it alone."""
        seq = self.scheduler.waiting[0]
        bm = self.block_manager
        forks = ""
        if seq.fork_tokens:
            blocks = bm.fork_blocks_needed(seq, seq.fork_tokens, len(seq))
            forks = f" and {blocks} blocks for its option forks"
        return self._fail(
            seq,
            EngineError(
                f"it needs KV for {len(seq)} tokens{forks} and cannot be scheduled: the KV pool "
                f"({bm.num_blocks} blocks, {bm.num_pinned_blocks} pinned) has no room for it"
            ),
        )

    def _finish_prefill(self, seq: Sequence) -> RequestOutput:
        """A prefill-only request is done: its blocks are in the cache (and pinned if asked)."""
        seq.metrics.first_token_time = time.perf_counter()
        self._finish(seq, FinishReason.PREFILLED)
        self._pin(seq.pin, seq.token_ids)
        return self.outputs.output(seq, [])

    def _append_token(self, seq: Sequence, token: int) -> RequestOutput:
        reason = self.outputs.append_token(seq, token)
        if reason is not None and self.outputs.pauses(seq, token, reason):
            self._pause_turn(seq)
        elif reason is not None:
            self._finish(seq, reason)
        return self.outputs.output(seq, [token])

    def _pause_turn(self, seq: Sequence) -> None:
        """The turn ended and the request waits for a tool: it pauses, its tokens (a stop
        string's included) stay its context, and its output says "paused"."""
        now = time.perf_counter()
        seq.metrics.finished_time = now  # the turn's latency and TPOT
        self.scheduler.pause(seq)
        seq.finish_reason = FinishReason.PAUSED
        seq.paused_at = now

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(seq, reason)
        seq.metrics.finished_time = time.perf_counter()
        self.requests.pop(seq.request_id, None)
        self._generators.pop(seq.seq_id, None)
        self.kv_swap.drop(seq.seq_id)


_GREEDY = SamplingParams(max_tokens=1)


def _weights_identity(source: ModelSource) -> str:
    """Where the weights are and which version of the files: two checkpoints that share a
    name (a fine-tune of the same base, weights replaced in place) must never share a disk
    chunk store, or exact reuse would import the other model's KV."""
    if source.path is None:
        return f"preset:{source.preset}"
    path = source.path.resolve()
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) or [path]
    return ";".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
