"""The engine: requests in, one scheduled step at a time, outputs out.

Not thread-safe by design; `LLM` drives it synchronously and `AsyncLLM` from one thread.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC

import torch

from covey.errors import EngineError, InvalidRequestError, ModelLoadError
from covey.llm_backend.block_manager import BlockManager
from covey.llm_backend.choices import ChoiceTrie
from covey.llm_backend.config import DEFAULT_CPU_KV_BYTES, DEFAULT_GPU_KV_FRACTION, EngineConfig
from covey.llm_backend.detokenizer import detokenize_step
from covey.llm_backend.engine_client import EngineStats
from covey.llm_backend.kv_pool import KVPool
from covey.llm_backend.model import LlamaModel
from covey.llm_backend.model_runner import ModelRunner
from covey.llm_backend.model_source import resolve_model
from covey.llm_backend.outputs import RequestMetrics, RequestOutput
from covey.llm_backend.quantization import Int8Linear, quantize_int8
from covey.llm_backend.sampler import sample
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.scheduler import Scheduler, SchedulerConfig
from covey.llm_backend.segments import Segment, SegmentSpan
from covey.llm_backend.sequence import FinishReason, Sequence
from covey.llm_backend.tokenizer import Tokenizer, load_tokenizer
from covey.llm_backend.weight_loader import load_model

Prompt = str | list[int] | list[Segment]
# Pinned prefixes never take more of the KV pool than this, so requests always fit.
MAX_PINNED_FRACTION = 0.25


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, model: LlamaModel | None = None) -> None:
        """`model` reuses weights loaded from `config.model` (several engines, one model)."""
        self.config = config = config or EngineConfig()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = config.torch_device()
        self.source = resolve_model(config.model)
        self.tokenizer: Tokenizer | None = self._load_tokenizer()
        if model is None:
            model = load_model(self.source, config.torch_dtype(), self.device)
            if config.quantization == "int8":
                quantize_int8(model)
        elif isinstance(model.lm_head, Int8Linear) != (config.quantization == "int8"):
            raise ValueError("EngineConfig.quantization does not match the given model's weights")
        self.model = model
        self.dtype = model.embed_tokens.weight.dtype  # the pool stores what the model computes
        args = self.model.args
        if config.max_model_len and config.max_model_len > args.max_position:
            raise ValueError(
                f"EngineConfig.max_model_len ({config.max_model_len}) exceeds the model's "
                f"context window ({args.max_position})"
            )
        self.max_model_len = config.max_model_len or args.max_position
        num_blocks = self._num_kv_blocks()
        self.pool = KVPool(args, num_blocks, config.block_size, self.dtype, self.device)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), self.block_manager
        )
        self.runner = ModelRunner(self.model, self.pool, self.device)
        self.requests: dict[str, Sequence] = {}
        self._generators: dict[int, torch.Generator] = {}
        self._pins: dict[str, list[int]] = {}  # pin key -> prefix-cache blocks held for it

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

    def _num_kv_blocks(self) -> int:
        c, args = self.config, self.model.args
        block_bytes = KVPool.bytes_per_block(args, c.block_size, self.dtype)
        if c.kv_cache_tokens is not None:
            blocks = -(-c.kv_cache_tokens // c.block_size)
        elif c.kv_cache_bytes is not None:
            blocks = c.kv_cache_bytes // block_bytes
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            blocks = int(free * DEFAULT_GPU_KV_FRACTION) // block_bytes
        else:
            blocks = DEFAULT_CPU_KV_BYTES // block_bytes
        if blocks < 1:
            raise ValueError(f"the KV pool must hold at least one block of {c.block_size} tokens")
        return blocks

    @property
    def kv_capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.pool.block_size

    def tokenize(self, prompt: Prompt) -> tuple[list[int], list[SegmentSpan]]:
        """Token ids of a prompt (text, token ids or segments) and where each segment lies."""
        if isinstance(prompt, str):
            return self._encode(prompt), []
        if not isinstance(prompt, SequenceABC) or isinstance(prompt, bytes):
            raise InvalidRequestError(
                f"a prompt is a str, a list of token ids or of Segments, "
                f"got {type(prompt).__name__}"
            )
        if all(isinstance(p, Segment) for p in prompt) and prompt:
            ids: list[int] = []
            spans: list[SegmentSpan] = []
            for seg in prompt:
                piece = (
                    list(seg.token_ids)
                    if seg.token_ids is not None
                    else self._encode(seg.text or "")
                )
                spans.append(SegmentSpan(seg.kind, len(ids), len(ids) + len(piece), seg.chunk_id))
                ids.extend(piece)
            return ids, spans
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise InvalidRequestError("a token-id prompt must hold only ints")
        vocab = self.model.args.vocab_size
        if any(t < 0 or t >= vocab for t in prompt):
            raise InvalidRequestError(f"token ids must be in [0, {vocab})")
        return list(prompt), []

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer; send token ids")
        return self.tokenizer.encode(text)

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> str:
        """Validate and queue a request; returns its id. Raises InvalidRequestError."""
        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        ids, spans = self.tokenize(prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; the context window is {self.max_model_len} "
                "tokens and at least one must be left to generate"
            )
        trie = self._choice_trie(params)
        self._check_room(len(ids), params, trie, "the request")
        seq = Sequence(request_id, ids, params, priority, spans)
        self._set_params(seq, params, trie)
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def _check_room(
        self, context: int, params: SamplingParams, trie: ChoiceTrie | None, what: str
    ) -> None:
        """Refuse what could never fit: the context window, or the pool less pinned blocks."""
        if trie is not None and context + trie.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"{what} has {context} tokens and its choices need up to {trie.max_tokens} "
                f"more; the context window is {self.max_model_len} tokens"
            )
        most = trie.max_tokens if trie is not None else params.max_tokens
        self._check_pool(min(context + most, self.max_model_len), what)

    def _check_pool(self, needed: int, what: str) -> None:
        usable = self.kv_capacity_tokens - self._pinned_blocks() * self.block_manager.block_size
        if needed > usable:
            raise InvalidRequestError(
                f"{what} needs KV for {needed} tokens but the pool holds {usable} "
                f"(of {self.kv_capacity_tokens}, the rest pinned); lower max_tokens or raise "
                "kv_cache_tokens"
            )

    def _set_params(self, seq: Sequence, params: SamplingParams, trie: ChoiceTrie | None) -> None:
        """Per-request sampling state: the seeded generator and the choice trie (built by
        the caller before anything changed, since bad choices raise)."""
        seq.params, seq.choice_trie = params, trie
        self._generators.pop(seq.seq_id, None)
        if params.seed is not None:
            self._generators[seq.seq_id] = torch.Generator(self.device).manual_seed(params.seed)

    def _choice_trie(self, params: SamplingParams) -> ChoiceTrie | None:
        if not params.choices:
            return None
        eos = self.tokenizer.eos_token_id if self.tokenizer else None
        return ChoiceTrie(params.choices, self._encode, eos)

    def add_prefill(
        self,
        prompt: Prompt,
        request_id: str | None = None,
        priority: int = 0,
        pin: str | None = None,
    ) -> str | None:
        """Compute a prompt's KV into the prefix cache without generating (early prefill).

        Only whole blocks are kept, so the prompt is cut to a multiple of the block size.
        `pin` names a pin that holds the blocks in the cache until `unpin(pin)` (unless
        pins would pass MAX_PINNED_FRACTION of the pool); a key already pinned is not
        prefilled again. Returns the request id, or None when there
        is nothing to compute (everything cached, or shorter than a block).
        """
        if pin is not None and pin in self._pins:
            return None
        if not self.config.enable_prefix_caching:
            raise InvalidRequestError("early prefill needs enable_prefix_caching=True")
        ids, spans = self.tokenize(prompt)
        bs = self.block_manager.block_size
        ids = ids[: min(len(ids), self.max_model_len - 1) // bs * bs]
        if not ids:
            return None
        if self.block_manager.cached_prefix_blocks(ids) * bs == len(ids):
            self._pin(pin, ids)
            return None
        self._check_pool(len(ids), "the prefill")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        spans = [sp for sp in spans if sp.start < len(ids)]
        seq = Sequence(request_id, ids, SamplingParams(max_tokens=1), priority, spans, True)
        seq.pin = pin
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def _pinned_blocks(self) -> int:
        return len({b for blocks in self._pins.values() for b in blocks})

    def _pin(self, pin: str | None, token_ids: list[int]) -> None:
        """Hold the cached prefix of `token_ids` under `pin`, unless pins would then take
        more than MAX_PINNED_FRACTION of the pool (then it stays cached, evictable)."""
        if pin is None or pin in self._pins:
            return
        cap = int(self.pool.num_blocks * MAX_PINNED_FRACTION)
        if self._pinned_blocks() + len(token_ids) // self.block_manager.block_size > cap:
            return
        self._pins[pin] = self.block_manager.pin_prefix(token_ids)

    def unpin(self, pin: str) -> bool:
        """Let a pinned prefix be evicted again; False if `pin` is not pinned."""
        blocks = self._pins.pop(pin, None)
        if blocks is None:
            return False
        self.block_manager.unpin(blocks)
        return True

    @property
    def pinned(self) -> dict[str, int]:
        """Pin key -> tokens it holds in the prefix cache."""
        return {k: len(v) * self.block_manager.block_size for k, v in self._pins.items()}

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; None if it is unknown or done."""
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        self._finish(seq, FinishReason.ABORT)
        return self._output(seq, self._release_text(seq), [])

    def pause_request(self, request_id: str) -> None:
        """Hold a request aside while a tool runs; a running one keeps its KV in the pool
        until memory is needed (then it is discarded and recomputed on resume)."""
        try:
            self.scheduler.pause(self._get(request_id))
        except ValueError as exc:
            raise InvalidRequestError(f"request {request_id!r}: {exc}") from exc

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
        ids, _ = self.tokenize(extra)
        params = params or seq.params
        total = len(seq) + len(ids)
        if total >= self.max_model_len:
            raise InvalidRequestError(
                f"the resumed request would hold {total} tokens; the context window is "
                f"{self.max_model_len} and at least one must be left to generate"
            )
        trie = self._choice_trie(params)
        self._check_room(total, params, trie, "the resumed request")
        self._set_params(seq, params, trie)
        seq.token_ids.extend(ids)
        seq.start_new_turn(params)
        self.scheduler.resume(seq)

    def _get(self, request_id: str) -> Sequence:
        seq = self.requests.get(request_id)
        if seq is None:
            raise InvalidRequestError(f"unknown or finished request {request_id!r}")
        return seq

    def stats(self) -> EngineStats:
        """Pool use, prefix-cache hits and queue lengths right now."""
        bm, sched = self.block_manager, self.scheduler
        free = len(bm.free_blocks)
        return EngineStats(
            model=self.model_name,
            block_size=bm.block_size,
            kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_blocks - free - bm.num_idle_cached,
            kv_blocks_cached=bm.num_idle_cached,
            kv_blocks_pinned=self._pinned_blocks(),
            prefix_cache_queried_tokens=bm.stats.queried_tokens,
            prefix_cache_hit_tokens=bm.stats.hit_tokens,
            num_waiting=len(sched.waiting),
            num_running=len(sched.running),
            num_paused=len(sched.paused),
        )

    def run_to_completion(
        self,
        request_ids: list[str],
        on_output: Callable[[RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Step until nothing is left to do; return the final outputs of `request_ids` in
        that order. `on_output` sees every output as it comes (to stream deltas). If the
        loop is interrupted (an error, Ctrl-C), `request_ids` are aborted so their KV is
        freed, then the exception propagates. The synchronous drivers (`LLM`, the CLI,
        benchmarks) all step through here."""
        final: dict[str, RequestOutput] = {}
        try:
            while self.has_unfinished_requests():
                for out in self.step():
                    if on_output is not None:
                        on_output(out)
                    if out.finished:
                        final[out.request_id] = out
        except BaseException:
            for rid in request_ids:
                self.abort_request(rid)
            raise
        return [final[rid] for rid in request_ids]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and report every request that moved."""
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            if self.scheduler.has_work():  # admission checks make this unreachable
                raise EngineError("no queued request can be scheduled: the KV pool is stuck")
            return []
        now = time.perf_counter()
        for item in plan.scheduled:
            if item.seq.metrics.first_scheduled_time is None:
                item.seq.metrics.first_scheduled_time = now
        seqs, logits = self.runner.execute(plan.scheduled, plan.block_copies)
        prefilled = []
        for item in plan.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_full_blocks(seq)
            if seq.prefill_only and seq.num_computed_tokens == len(seq):
                prefilled.append(self._finish_prefill(seq))
        if logits is None:
            return prefilled
        with torch.inference_mode():  # logits are inference tensors: mask them in place
            for row, seq in enumerate(seqs):
                if seq.choice_trie is not None:
                    seq.choice_trie.mask(logits[row], seq.output_token_ids)
        tokens = sample(
            logits, [s.params for s in seqs], [self._generators.get(s.seq_id) for s in seqs]
        )
        return prefilled + [self._append_token(seq, token) for seq, token in zip(seqs, tokens)]

    def _finish_prefill(self, seq: Sequence) -> RequestOutput:
        """A prefill-only request is done: its blocks are in the cache (and pinned if asked)."""
        self._pin(seq.pin, seq.token_ids)
        now = time.perf_counter()
        seq.metrics.first_token_time = now
        self._finish(seq, FinishReason.PREFILLED)
        return self._output(seq, "", [])

    def _append_token(self, seq: Sequence, token: int) -> RequestOutput:
        now = time.perf_counter()
        seq.token_ids.append(token)
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = now
        if self.tokenizer is not None:
            detokenize_step(self.tokenizer, seq)
        reason = self._stop_reason(seq, token)
        if reason is not None:
            self._finish(seq, reason)
        return self._output(seq, self._release_text(seq), [token])

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        if seq.choice_trie is not None:
            choice = seq.choice_trie.finished_choice(seq.output_token_ids)
            if choice is None:
                return None
            seq.output_text = choice  # exactly the choice, whatever the detokenizer made
            return FinishReason.STOP
        eos = self.tokenizer.eos_token_id if self.tokenizer else None
        if not p.ignore_eos and token == eos or token in p.stop_token_ids:
            return FinishReason.STOP
        if p.stop and self._cut_at_stop_string(seq):
            return FinishReason.STOP
        if seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _cut_at_stop_string(self, seq: Sequence) -> bool:
        """Truncate the output at the earliest stop string, searching only the new tail."""
        longest = max(len(s) for s in seq.params.stop)
        start = max(0, seq.num_emitted_chars - longest + 1)
        hits = [(at, s) for s in seq.params.stop if (at := seq.output_text.find(s, start)) >= 0]
        if not hits:
            return False
        at, stop = min(hits)
        keep = at + len(stop) if seq.params.include_stop_str_in_output else at
        seq.output_text = seq.output_text[:keep]
        return True

    def _release_text(self, seq: Sequence) -> str:
        """The next text delta. While stop strings are set, the last len(stop) - 1 characters
        wait: a stop string may begin there, and streamed text must never be taken back. A
        choice streams whole when it is complete: its text is the choice string itself."""
        if seq.choice_trie is not None and not seq.is_finished:
            return ""
        end = len(seq.output_text)
        if seq.params.stop and not seq.is_finished:
            end = max(seq.num_emitted_chars, end - max(len(s) for s in seq.params.stop) + 1)
        delta = seq.output_text[seq.num_emitted_chars : end]
        seq.num_emitted_chars = end
        return delta

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(seq, reason)
        seq.metrics.finished_time = time.perf_counter()
        self.requests.pop(seq.request_id, None)
        self._generators.pop(seq.seq_id, None)

    def _output(self, seq: Sequence, delta: str, delta_ids: list[int]) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            text=seq.output_text,
            token_ids=seq.output_token_ids,
            delta_text=delta,
            delta_token_ids=delta_ids,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            metrics=RequestMetrics.of(seq),
        )
