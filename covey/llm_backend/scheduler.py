"""Iteration-level scheduling (Orca) with chunked prefill mixed into decodes (Sarathi-Serve).

Each step spends a token budget: running sequences first (their decode token or next
prefill chunk), then waiting ones by priority. When the KV pool is full the lowest-priority
running sequence is preempted by recompute: its blocks are freed and it re-queues.
Plain Python with no torch, so it is tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from covey.llm_backend.block_manager import BlockManager
from covey.llm_backend.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be > 0, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(
                f"max_num_batched_tokens must be > 0, got {self.max_num_batched_tokens}"
            )


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
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

        Mutates queue membership, block tables and sequence status.
        """
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self.running.sort(key=Sequence.sort_key)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            if n == 0:
                i += 1
                continue
            if not self._make_room(seq, n, out):
                continue  # seq itself was preempted; self.running shrank
            out.block_copies += self.block_manager.allocate_slots(seq, n)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                self.block_manager.match_prefix(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            if not self._admit(seq, n, out):
                self.block_manager.free(seq)
                seq.num_computed_tokens = seq.num_cached_tokens = 0
                break
            self.waiting.pop(0)
            self.block_manager.record_admission(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.block_copies += self.block_manager.allocate_slots(seq, n)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return out

    def _make_room(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Preempt the lowest-priority running sequences until `seq` fits; False if `seq` went."""
        need = self.block_manager.blocks_needed(seq, n)
        while not self.block_manager.can_allocate(need):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _admit(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Room for a waiting `seq`, preempting only running sequences it outranks."""
        need = self.block_manager.blocks_needed(seq, n)
        while not self.block_manager.can_allocate(need):
            if not self.running or self.running[-1].sort_key() <= seq.sort_key():
                return False
            self._preempt(self.running[-1], out)
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        for k, item in enumerate(out.scheduled):
            if item.seq is seq:
                del out.scheduled[k]
                break
        self.block_manager.free(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        seq.num_preemptions += 1
        out.preempted.append(seq)
        self.add(seq)

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
        """Hold a running sequence aside with its KV (a tool call is in flight)."""
        if seq.status is not SequenceStatus.RUNNING:
            raise ValueError(f"only a running sequence can pause, this one is {seq.status.value}")
        self.running.remove(seq)
        seq.status = SequenceStatus.PAUSED
        self.paused[seq.request_id] = seq

    def resume(self, seq: Sequence) -> None:
        """Put a paused sequence back to work; its new tokens prefill on top of its KV."""
        self.paused.pop(seq.request_id)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
