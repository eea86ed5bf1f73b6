"""Iteration-level scheduling (Orca) with chunked prefill mixed into decodes (Sarathi-Serve).

Each step spends a token budget: running sequences first (their decode token or next
prefill chunk), then waiting ones by priority. When the KV pool is full the lowest-priority
running sequence is preempted by recompute: its blocks are freed and it re-queues.
Plain Python with no torch, so it is tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from covey.errors import ConfigError, InvalidRequestError
from covey.llm_backend.block_manager import BlockManager
from covey.llm_backend.sequence import FinishReason, Sequence, SequenceStatus

if TYPE_CHECKING:  # the planner's types only: the scheduler itself stays torch-free
    from covey.llm_backend.chunk_planner import ChunkPlanner, ChunkStep


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    pause_policy: str = "adaptive"  # EngineConfig.pause_policy

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ConfigError(f"max_num_seqs must be > 0, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ConfigError(
                f"max_num_batched_tokens must be > 0, got {self.max_num_batched_tokens}"
            )


@dataclass
class ScheduledSeq:
    """`num_new_tokens`: how far the cursor moves. With a `chunk` step (a prompt with chunk
    segments) some of those tokens are imported from the chunk store, not computed."""

    seq: Sequence
    num_new_tokens: int
    chunk: ChunkStep | None = None


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    chunk_items: list[ScheduledSeq] = field(default_factory=list)  # those with a chunk step

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        chunks: ChunkPlanner | None = None,
    ) -> None:
        """`chunks`: plans prompts with chunk segments (None: they prefill like any other)."""
        self.config = config
        self.block_manager = block_manager
        self.chunks = chunks
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.paused: dict[str, Sequence] = {}

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.waiting.sort(key=Sequence.sort_key)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's sequences and token counts; allocate their slots.

        Decodes go first (one token each, so inter-token latency stays flat), then prefill
        chunks, each group by priority. Mutates queues, block tables and statuses.
        """
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self.running.sort(key=lambda s: (s.num_uncomputed_tokens > 1, *s.sort_key()))
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            step = None
            if seq.chunk_plan is not None:
                step = self._chunk_step(seq, budget, out)
                if step is None:
                    i += 1
                    continue
                n = step.advance
            if not self._make_room(seq, n, out):
                continue  # seq itself was preempted; self.running shrank
            out.block_copies += self.block_manager.allocate_slots(seq, n)
            if step is not None:
                budget -= self._keep_chunk_step(seq, step, out)
            else:
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
            i += 1
        k = 0
        while k < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[k]
            if not seq.block_table:
                self.block_manager.match_prefix(seq)
            if self._prefix_in_flight(seq):
                self._unmatch(seq)
                k += 1  # it waits a step and then hits the cache instead
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            step = None
            if seq.has_chunks and self.chunks is not None:
                step = self._chunk_step(seq, budget, out)
                if step is None:  # a blend run waits for a step of its own
                    self._unmatch(seq)
                    break
                n = step.advance
            admitted, refund = self._admit(seq, n, out)
            budget += refund
            if not admitted:
                self._unmatch(seq)
                break
            self.waiting.pop(k)
            self.block_manager.record_admission(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.block_copies += self.block_manager.allocate_slots(seq, n)
            if step is not None:
                budget -= self._keep_chunk_step(seq, step, out)
            else:
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
        return out

    def _chunk_step(self, seq: Sequence, budget: int, out: SchedulerOutput) -> ChunkStep | None:
        """`seq`'s next share of its chunk plan. A blend run (never split) may pass the
        budget when no other prefill runs in this step, so it cannot starve."""
        assert self.chunks is not None
        alone = not any(item.num_new_tokens > 1 for item in out.scheduled)
        return self.chunks.take(seq, budget, alone)

    def _keep_chunk_step(self, seq: Sequence, step: ChunkStep, out: SchedulerOutput) -> int:
        """Schedule `seq`'s chunk step, its slots allocated; returns the budget it costs."""
        assert self.chunks is not None
        self.chunks.commit(seq, step)
        item = ScheduledSeq(seq, step.advance, step)
        out.scheduled.append(item)
        out.chunk_items.append(item)
        return step.cost

    def _prefix_in_flight(self, seq: Sequence) -> bool:
        """Whether a running sequence is computing `seq`'s next uncached block right now.

        Then `seq` waits: once that block is cached it is reused, so requests sent together
        with a common prefix (siblings, fan-out elements, users with one system prompt)
        prefill it once (SGLang's in-batch prefix caching; Parrot's fork).
        """
        if self.block_manager.trie is None:
            return False
        bs = self.block_manager.block_size
        end = (seq.num_computed_tokens // bs + 1) * bs
        if end > len(seq) - 1:
            return False  # no whole block left to gain
        last = seq.token_ids[end - 1]
        computing = [
            r
            for r in self.running
            if r.num_computed_tokens < end <= len(r) and r.token_ids[end - 1] == last
        ]
        if not computing:  # the common case: no prefix slicing at all
            return False
        head = seq.token_ids[:end]
        return any(r.token_ids[:end] == head for r in computing)

    def _unmatch(self, seq: Sequence) -> None:
        """Give back the prefix-cache references a waiting sequence took this step."""
        self.block_manager.discard(seq)

    def _make_room(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Free blocks until `seq` fits: paused KV first, then the lowest-priority runners.

        Returns False when `seq` itself had to be preempted.
        """
        need = self.block_manager.blocks_needed(seq, n)
        while not self.block_manager.can_allocate(need):
            if self._drop_paused_kv():
                continue
            victim = max(self.running, key=Sequence.sort_key)
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _admit(self, seq: Sequence, n: int, out: SchedulerOutput) -> tuple[bool, int]:
        """Room for a waiting `seq`, preempting only runners it outranks, and only if that
        is enough. Returns (admitted, budget tokens handed back by preempted runners)."""
        bm = self.block_manager
        need = bm.blocks_needed(seq, n)
        if bm.can_allocate(need):
            return True, 0  # the common case: no victims to weigh
        outranked = [s for s in self.running if s.sort_key() > seq.sort_key()]
        paused = [s for s in self.paused.values() if s.block_table]
        # A block only pins share with a victim is room too once the victim goes: pins yield.
        if self.config.pause_policy == "preserve":
            paused = []
        reclaimable = sum(
            1 for s in outranked + paused for b in s.block_table if bm.held_by_one_sequence(b)
        )
        if not bm.can_allocate(need - reclaimable):
            return False, 0
        refund = 0
        while not bm.can_allocate(need):
            if self._drop_paused_kv():
                continue
            outranked = [s for s in self.running if s.sort_key() > seq.sort_key()]
            if not outranked:
                return False, refund
            refund += self._preempt(max(outranked, key=Sequence.sort_key), out)
        return True, refund

    def _drop_paused_kv(self) -> bool:
        """Discard the KV of the longest-paused sequence holding any; it recomputes on resume
        (INFERCEPT's discard). Returns False when no paused sequence holds blocks, or
        when the policy preserves paused KV whatever the pressure."""
        if self.config.pause_policy == "preserve":
            return False
        for seq in self.paused.values():  # in pause order
            if seq.block_table:
                self.block_manager.discard(seq)
                return True
        return False

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> int:
        """Recompute `seq` later; return the budget it had been given this step."""
        self.running.remove(seq)
        refund = 0
        for k, item in enumerate(out.scheduled):
            if item.seq is seq:
                refund = item.num_new_tokens if item.chunk is None else item.chunk.cost
                del out.scheduled[k]
                if item.chunk is not None:
                    out.chunk_items.remove(item)
                break
        self.block_manager.discard(seq)
        seq.num_preemptions += 1
        out.preempted.append(seq)
        self.add(seq)
        return refund

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Retire `seq` from whichever queue holds it and free its blocks at once."""
        for queue in (self.running, self.waiting):
            if seq in queue:
                queue.remove(seq)
        self.paused.pop(seq.request_id, None)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def pause(self, seq: Sequence) -> None:
        """Hold a sequence aside (a tool call is in flight); a running one keeps its KV."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)  # e.g. preempted: it holds no blocks
        else:
            raise InvalidRequestError(
                f"request {seq.request_id!r}: a {seq.status.value} sequence cannot pause"
            )
        seq.status = SequenceStatus.PAUSED
        self.paused[seq.request_id] = seq
        if self.config.pause_policy == "discard":
            self.block_manager.discard(seq)

    def resume(self, seq: Sequence) -> None:
        """Put a paused sequence back to work; new tokens prefill on top of any kept KV."""
        self.paused.pop(seq.request_id)
        if seq.block_table:
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        else:
            self.add(seq)  # its KV was discarded (or never made): queue for a recompute
