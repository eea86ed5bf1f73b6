"""Iteration-level scheduling (Orca) with chunked prefill mixed into decodes (Sarathi-Serve).

Each step spends a token budget: running sequences first (their decode token or next
prefill chunk), then waiting ones by priority. When the KV pool is full the lowest-priority
running sequence is preempted by recompute: its blocks are freed and it re-queues; a request
the pool could never hold fails alone (`SchedulerOutput.failed`). Requests paused for tool
calls keep, swap or drop their KV as `paused_kv.py` decides, each step; one whose KV went to
host memory is copied back when it is admitted again.
Plain Python with no torch, so it is tested on its own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from covey.errors import ConfigError, CoveyError, EngineError, InvalidRequestError
from covey.llm_backend.block_manager import BlockManager
from covey.llm_backend.paused_kv import PausedKV, StepSwaps, SwapIn
from covey.llm_backend.sequence import FinishReason, Sequence, SequenceStatus

if TYPE_CHECKING:  # the planner's types only: the scheduler itself stays torch-free
    from covey.llm_backend.chunk_planner import ChunkPlanner, ChunkStep


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048

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
    # Blocks held back for the step's end: the option forks of a prompt this step
    # completes (see `Scheduler._fork_reserve`); later admissions in the step leave them.
    reserved: int = 0


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    chunk_items: list[ScheduledSeq] = field(default_factory=list)  # those with a chunk step
    swaps: StepSwaps = field(default_factory=StepSwaps)  # paused KV to host and back
    # Requests that can never run in this pool (`Scheduler._too_large`, `_cannot_grow`),
    # already out of the queues with their blocks freed: the engine fails each one alone.
    failed: list[tuple[Sequence, CoveyError]] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        chunks: ChunkPlanner | None = None,
        paused_kv: PausedKV | None = None,
    ) -> None:
        """`chunks`: plans prompts with chunk segments (None: they prefill like any other).
        `paused_kv`: what paused requests' KV does (None: discarded when room is needed)."""
        self.config = config
        self.block_manager = block_manager
        self.chunks = chunks
        self.paused_kv = paused_kv or PausedKV(None, block_manager, 0, 1)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.paused: dict[str, Sequence] = {}

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.waiting.sort(key=Sequence.sort_key)

    def has_work(self) -> bool:
        """Requests to run, or (a fixed swap policy) paused KV still to move out."""
        if self.waiting or self.running:
            return True
        return self.paused_kv.mode == "swap" and any(s.block_table for s in self.paused.values())

    def schedule(self) -> SchedulerOutput:
        """Pick this step's sequences and token counts; allocate their slots.

        Decodes go first (one token each, so inter-token latency stays flat), then prefill
        chunks, each group by priority. Mutates queues, block tables and statuses.
        """
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        if self.paused:
            self.paused_kv.manage(
                list(self.paused.values()), self.running, self._under_pressure, out.swaps
            )
        self.running.sort(key=lambda s: (s.num_uncomputed_tokens > 1, *s.sort_key()))
        held: list[Sequence] = []  # runners sitting the step out for their forks' room
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            share = self._next_share(seq, budget, out)
            if share is None:
                i += 1
                continue
            n, step = share
            reserve = self._fork_reserve(seq, n)
            if reserve and self._waits_for_forks(seq, n, reserve, out):
                held.append(seq)
                i += 1
                continue
            cost = self._run_share(seq, n, step, reserve, out)
            if cost is None:
                continue  # seq itself was preempted; self.running shrank
            budget -= cost
            i = self.running.index(seq) + 1  # a victim before seq shifted it left
        # A held scorer that a runner later in the loop preempted is back in the queue
        # with no blocks: no longer held.
        held = [s for s in held if s.status is SequenceStatus.RUNNING]
        if held and not out.scheduled:
            self._fail_held(held, out)
            held = []
        gate = min((s.sort_key() for s in held), default=None)
        k = 0
        while k < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[k]
            if gate is not None and seq.sort_key() > gate:
                break  # it would take the room a higher-priority runner waits for
            too_large = self._too_large(seq)
            if too_large is not None:
                self._fail(seq, too_large, out)  # out of `self.waiting`: k is the next one
                continue
            if seq.swapped_tokens:
                refund = self._swap_in(seq, budget, out)
                if refund is None:
                    break
                self.waiting.pop(k)
                budget += refund - out.scheduled[-1].num_new_tokens
                continue
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
            if seq.discarded_tokens:
                recomputed = max(seq.discarded_tokens - seq.num_cached_tokens, 0)
                self.paused_kv.counters.recompute_tokens += recomputed
                seq.discarded_tokens = 0
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.block_copies += self.block_manager.allocate_slots(seq, n)
            if step is not None:
                budget -= self._keep_chunk_step(seq, step, out)
            else:
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
            out.scheduled[-1].reserved = self._fork_reserve(seq, n)
        return out

    def _next_share(
        self, seq: Sequence, budget: int, out: SchedulerOutput
    ) -> tuple[int, ChunkStep | None] | None:
        """The running `seq`'s tokens this step within `budget`, and its chunk step if it
        has a chunk plan; None when that plan has nothing to run in this step."""
        if seq.chunk_plan is None:
            return min(seq.num_uncomputed_tokens, budget), None
        step = self._chunk_step(seq, budget, out)
        return None if step is None else (step.advance, step)

    def _run_share(
        self, seq: Sequence, n: int, step: ChunkStep | None, reserve: int, out: SchedulerOutput
    ) -> int | None:
        """Schedule the running `seq`'s `n` tokens (and `reserve` blocks for its forks),
        preempting for room as `_free_blocks` does; the budget it costs, or None when `seq`
        itself was preempted."""
        if not self._make_room_for_tokens(seq, n, reserve, out):
            return None
        out.block_copies += self.block_manager.allocate_slots(seq, n)
        if step is not None:
            cost = self._keep_chunk_step(seq, step, out)
        else:
            out.scheduled.append(ScheduledSeq(seq, n))
            cost = n
        out.scheduled[-1].reserved = reserve
        return cost

    def _fail_held(self, held: list[Sequence], out: SchedulerOutput) -> None:
        """Fail `held` scorers in a step that ran nothing: a broken invariant, not a case.

        A scorer waits for its forks only while a runner that outranks it is running
        (`_waits_for_forks`). The highest-priority runner never waits, and it runs: its
        share is never empty in a step with nothing scheduled (a blend run goes alone past
        the budget), and it is preempted, or fails alone, only after every runner below it,
        the held ones first. So some runner is scheduled whenever one is held. Were that
        ever untrue, the held requests would sit out every step with nothing to wake them:
        they fail, with the invariant named, rather than hang the engine."""
        for seq in held:
            error = EngineError(
                f"request {seq.request_id!r} waited for its option forks' KV room while no "
                "runner that outranks it ran (a scheduler invariant is broken)"
            )
            self._fail(seq, error, out)

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

    def free_blocks_for(self, seq: Sequence, num_blocks: int) -> tuple[bool, StepSwaps]:
        """Outside `schedule`: free `num_blocks` blocks for the running `seq` as a step
        would (see `_free_blocks`), for KV it takes beyond its own slots (an option's fork,
        option_scoring.py). Returns whether `seq` is still running, and the paused-KV
        copies to make before anything writes the freed blocks. A lone `seq` short of room
        is preempted, not failed (there is no step output to fail it in): admission then
        weighs its prompt and forks against the pool (`_too_large`, `_admit`)."""
        out = SchedulerOutput()
        return self._free_blocks(seq, num_blocks, out, fail_alone=False), out.swaps

    def _make_room_for_tokens(
        self, seq: Sequence, n: int, reserve: int, out: SchedulerOutput
    ) -> bool:
        """Free blocks until `seq` fits `n` more tokens and `reserve` blocks for its option
        forks (see `_free_blocks`)."""
        return self._free_blocks(seq, self.block_manager.blocks_needed(seq, n), out, reserve)

    def _fork_reserve(self, seq: Sequence, n: int) -> int:
        """The blocks `seq`'s option forks take when this step's `n` tokens complete its
        prompt (0 otherwise). Asking for them with the prompt's last chunk makes a request
        whose forks do not fit wait, as a decode that cannot grow does, instead of being
        admitted, prefilled and preempted by its own scoring every step: in the queue when
        the room is short at admission (`_admit` asks for the whole prompt and its forks),
        or still running with its KV kept when it is short at the last chunk of a prompt
        prefilled over several steps or of a resumed turn (`_waits_for_forks`)."""
        if not seq.fork_tokens:
            return 0
        end = seq.num_computed_tokens + n
        if end < len(seq):
            return 0
        return self.block_manager.fork_blocks_needed(seq, seq.fork_tokens, end)

    def _waits_for_forks(
        self, seq: Sequence, n: int, reserve: int, out: SchedulerOutput
    ) -> bool:
        """Whether the running `seq`, whose `n` tokens this step complete a scored prompt,
        sits the step out keeping its KV because its forks' `reserve` blocks (its chunk's
        too) are short and a runner that outranks it will give them back.

        Then preempting the runners it outranks and giving up paused KV would not make the
        room, so `_free_blocks` would preempt `seq` itself and throw away every chunk it
        computed (a prompt prefilled over several steps, a turn resumed with `choices`,
        whose room decodes took since), only to compute them again. Waiting keeps them,
        touching no paused KV (freeing some would only hand it to lower-priority prefills),
        and later admissions it outranks wait too. It never waits on what nothing would
        give back: when no runner outranks it, or the room can be made, it goes on as
        before (`_free_blocks`: the room is made, or it is preempted, or, alone and still
        short, it fails: it cannot fit the pool)."""
        bm = self.block_manager
        need = bm.blocks_needed(seq, n)
        if bm.can_allocate(need + self._reserved(out, reserve)):
            return False
        key = seq.sort_key()
        if not any(s.sort_key() < key for s in self.running):
            return False
        victims = [s for s in self.running if s.sort_key() > key]
        given = self._paused_giving(outranked=True)
        return not self._room_without(victims + given, need, reserve, out)

    def _paused_giving(self, outranked: bool) -> list[Sequence]:
        """Paused requests whose KV `_free_blocks` would free for a request at its
        prompt's last chunk, `outranked` telling whether a runner outranks it: all
        `_paused_holding` names when none does (preempting the others leaves it alone, and
        a lone runner frees paused KV under any policy), else those a running request may
        force out (all but a fixed preserve policy's)."""
        if outranked and self.paused_kv.mode == "preserve":
            return []
        return self._paused_holding()

    def _paused_holding(self) -> list[Sequence]:
        """Paused requests whose KV relief can free. The adaptive and swap policies skip
        one that frees no room even with the other paused requests (every block it holds
        is read by a runner), so it is left out."""
        holding = [s for s in self.paused.values() if s.block_table]
        if self.paused_kv.mode in ("adaptive", "swap"):
            return self.paused_kv.giving_room(holding)
        return holding

    def _room_without(
        self, victims: list[Sequence], need: int, reserve: int, out: SchedulerOutput
    ) -> bool:
        """Whether `need` blocks and `reserve` for forks fit once `victims` (runners, or
        paused requests' KV) let go of their blocks and their fork reservations. A block is
        room when every holder but pins is a victim (pins yield): a prefix only victims
        share counts, one a survivor reads does not."""
        bm = self.block_manager
        kept = self._reserved(out, reserve, excluding=set(victims))
        if bm.can_allocate(need + kept):
            return True
        if not bm.can_allocate(need + kept - sum(len(s.block_table) for s in victims)):
            return False  # short even if every victim's block were room: nothing to count
        refs = Counter(b for s in victims for b in s.block_table)
        room = sum(1 for b, k in refs.items() if bm.sequence_refs(b) == k)
        return bm.can_allocate(need + kept - room)

    def _reserved(
        self, out: SchedulerOutput, also: int = 0, excluding: Collection[Sequence] = ()
    ) -> int:
        """Blocks this step holds back for option forks, `also` (the forks of the request
        being placed) included and those of `excluding` (requests to be preempted) not:
        the largest reservation, not the sum, because the engine scores one request at a
        time within the step and frees each one's forks before the next (option_scoring)."""
        return max(
            [also, *(item.reserved for item in out.scheduled if item.seq not in excluding)]
        )

    def _free_blocks(
        self,
        seq: Sequence,
        need: int,
        out: SchedulerOutput,
        reserve: int = 0,
        fail_alone: bool = True,
    ) -> bool:
        """Free blocks until `need` can be taken besides the step's fork reservations
        (`reserve` is `seq`'s own; see `_reserved`): paused KV first, then the
        lowest-priority runners, newest first. Returns False when `seq` itself had to be
        preempted, or failed. A lone runner may free preserved paused KV, as an idle
        engine does: nothing else would ever give the room back.

        A runner the pool could not hold even with every other request's KV gone (a decode
        grown past it, or a scored prompt's last chunk and its forks) can never go on. It
        fails at once, with its reason (`_cannot_grow`), as vLLM aborts a sequence that
        cannot grow alone: before any runner is preempted or paused KV freed, since all of
        that would be thrown away for nothing (each victim recomputes its KV). The check
        counts every block but `seq`'s own as room (pins yield, every other holder can go)
        and leaves out a copy-on-write block, which freeing the block's other holders may
        spare, so it never fails a request that could fit. Only that copy can leave a lone
        runner short past it; it fails then, alone, rather than preempt itself and come
        back short at the same token.
        """
        bm = self.block_manager
        if fail_alone and self._never_fits(seq, need, reserve):
            self._fail(seq, self._cannot_grow(seq, need, reserve), out)
            return False

        def short() -> bool:
            return not bm.can_allocate(need + self._reserved(out, reserve))

        while short():
            alone = self.running == [seq]
            if self._relieve(out, short, for_running=True, idle=alone):
                continue
            if alone and fail_alone:
                self._fail(seq, self._cannot_grow(seq, need, reserve), out)
                return False
            victim = max(self.running, key=Sequence.sort_key)
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _never_fits(self, seq: Sequence, need: int, reserve: int) -> bool:
        """Whether the running `seq` is short of `need` blocks and `reserve` for its forks
        even with every block it does not hold free (see `_free_blocks`)."""
        bm = self.block_manager
        copy = int(bm.needs_copy(seq))
        return need - copy + reserve > bm.num_blocks - len(seq.block_table)

    def _too_large(self, seq: Sequence) -> InvalidRequestError | None:
        """Why the queued `seq` can never be admitted, or None: its whole KV (all its
        tokens, a preempted request's generated ones too, and its option forks) needs more
        blocks than the pool has. Admission looks at one chunk at a time, so such a prompt
        would otherwise get in, preempt itself at a later chunk and come back, forever.
        The request validator refuses these up front (`check_pool`); this holds for any
        sequence that reaches the queue."""
        bm = self.block_manager
        blocks = -(-len(seq) // bm.block_size)
        forks = bm.fork_blocks_needed(seq, seq.fork_tokens, len(seq)) if seq.fork_tokens else 0
        if blocks + forks <= bm.num_blocks:
            return None
        also = f" and {forks} blocks for its option forks" if forks else ""
        return InvalidRequestError(
            f"request {seq.request_id!r} needs KV for {len(seq)} tokens ({blocks} blocks)"
            f"{also} but the pool has {bm.num_blocks} blocks; lower max_tokens or raise "
            "kv_cache_tokens"
        )

    def _cannot_grow(self, seq: Sequence, need: int, reserve: int) -> InvalidRequestError:
        """The error of a lone runner that the pool cannot give `need` more blocks (and
        `reserve` for its forks) with everything else freed (see `_free_blocks`)."""
        bm = self.block_manager
        return InvalidRequestError(
            f"request {seq.request_id!r} cannot go on: it holds {len(seq.block_table)} KV "
            f"blocks for {seq.num_computed_tokens} tokens and needs {need + reserve} more, "
            f"but the pool has {bm.num_blocks} blocks even with every other request "
            "preempted and paused KV freed; lower max_tokens or raise kv_cache_tokens"
        )

    def _fail(self, seq: Sequence, error: CoveyError, out: SchedulerOutput) -> None:
        """Take `seq` out of the queues, its blocks freed now (the step's later admissions
        may use them), for the engine to fail with `error`. Every caller fails it before
        it has an item in this step (a runner short of room, a held scorer, a queued
        request), so there is none to drop."""
        assert all(item.seq is not seq for item in out.scheduled)
        self.finish(seq, FinishReason.ERROR)
        out.failed.append((seq, error))

    def _admit(self, seq: Sequence, n: int, out: SchedulerOutput) -> tuple[bool, int]:
        """Room for a waiting `seq`, preempting only runners it outranks, and only if that
        is enough. Returns (admitted, budget tokens handed back by preempted runners).

        Whether the room can be had is decided once, before anything is given up (paused
        KV or runners), so a refusal wastes neither: from the runners `seq` outranks and
        the paused KV admission frees for it (`_paused_given`). Then paused KV goes first
        (where the policy gives it up, then the rest of what was counted, forced), and the
        runners it outranks after, lowest first.

        A scored prompt gets in only if room for all of it and its forks can be had, though
        only this step's `n` tokens are allocated, and runners and paused KV are given up
        only for those (their blocks for later chunks would go to requests admitted after
        it): one prefilled over several steps then waits in the queue before computing
        anything rather than find the forks' room gone at its last chunk, and room taken
        after that is `_waits_for_forks`'s case. Strict priority as for any request: while
        it waits, so does every request queued behind it, a long scored prompt until the
        pool has room for all of it and its forks."""
        bm = self.block_manager
        need, reserve = bm.blocks_needed(seq, n), self._fork_reserve(seq, n)

        def fits(blocks: int = need, forks: int = reserve) -> bool:
            return bm.can_allocate(blocks + self._reserved(out, forks))

        later = bool(seq.fork_tokens) and n < seq.num_uncomputed_tokens  # its last chunk
        whole, whole_reserve = need, reserve
        if later:
            rest = seq.num_uncomputed_tokens
            whole, whole_reserve = bm.blocks_needed(seq, rest), self._fork_reserve(seq, rest)
        if fits(whole, whole_reserve):
            return True, 0  # the common case: no victims to weigh
        key = seq.sort_key()
        outranked = [s for s in self.running if s.sort_key() > key]
        given = self._paused_given(key, later, out.swaps)
        if not self._room_without(outranked + given, whole, whole_reserve, out):
            return False, 0
        idle = not self.running
        if self.paused_kv.mode == "adaptive" or idle:
            # Paused KV goes where the policy gives it up (what it preserves stays), or
            # wherever it must when nothing runs: an idle engine must not wait on it.
            self._relieve(out, lambda: not fits(), idle=idle)
        refund = 0
        while not fits():
            # The paused KV counted on goes first, forced so the room check holds. Under
            # the adaptive policy that is only swaps within the step's budget
            # (`given_up`), so an admission never passes it; for a scored prompt taking
            # several steps, what its last chunk would force on the running path anyway.
            # What was counted because `seq` ends up a lone runner (a fixed preserve
            # policy's, for a scored prompt nothing outranks) goes once the runners it
            # outranks are gone.
            alone = not self.running
            if given and self._relieve(out, lambda: not fits(), True, alone, among=given):
                continue
            outranked = [s for s in self.running if s.sort_key() > key]
            if not outranked:
                return False, refund
            refund += self._preempt(max(outranked, key=Sequence.sort_key), out)
        return True, refund

    def _paused_given(self, key: tuple, later: bool, swaps: StepSwaps) -> list[Sequence]:
        """The paused requests whose KV admission frees for a waiting request (sort key
        `key`) if it needs the room. A scored prompt whose last chunk comes in a later
        step: what the running path frees it there (`_paused_giving`). Any other: all of
        it when nothing runs (an idle engine frees paused KV under any policy); else every
        request's under the legacy, discard and swap policies, none under preserve, and
        under the adaptive policy those it gives up now (`PausedKV.given_up`): what it
        preserves stays, as it would for any admission, and a swap the step's swap budget
        (`swaps` so far) would defer is not counted, so admissions keep to the budget that
        keeps decode latency flat."""
        if later:
            return self._paused_giving(any(s.sort_key() < key for s in self.running))
        holding = self._paused_holding()
        if not self.running or self.paused_kv.mode not in ("preserve", "adaptive"):
            return holding
        if self.paused_kv.mode == "preserve" or not holding:
            return []
        return self.paused_kv.given_up(holding, self.running, swaps)

    def _relieve(
        self,
        out: SchedulerOutput,
        still_short: Callable[[], bool],
        for_running: bool = False,
        idle: bool = False,
        among: list[Sequence] | None = None,
    ) -> bool:
        """Free paused KV (by the pause policy) while `still_short()`, from `among` (None:
        every paused request); whether any went."""
        paused = list(self.paused.values()) if among is None else among
        return self.paused_kv.relieve(
            paused, self.running, out.swaps, still_short, for_running, idle
        )

    def _under_pressure(self) -> bool:
        """Whether the pool lacks room for the next step's likely needs: a block for each
        running request that crosses into a new one, and the first waiting request's next
        chunk (its swapped-out context too), ignoring prefix-cache hits."""
        bm = self.block_manager
        want = sum(bm.blocks_needed(s, 1) for s in self.running)
        if self.waiting and len(self.running) < self.config.max_num_seqs:
            head = self.waiting[0]
            n = min(len(head) - head.swapped_tokens, self.config.max_num_batched_tokens)
            want += -(-(head.swapped_tokens + n) // bm.block_size)
        return not bm.can_allocate(want)

    def _swap_in(self, seq: Sequence, budget: int, out: SchedulerOutput) -> int | None:
        """Admit a resumed request whose KV is on host: blocks for its context and its
        next tokens, the context copied back before the forward (within the step's swap
        budget). Returns the budget preempted runners handed back, or None when it must
        wait (no room or no budget left)."""
        bm = self.block_manager
        context = seq.swapped_tokens
        blocks = self.paused_kv.blocks_of(context)
        if not self.paused_kv.swap_budget_allows(out.swaps, blocks, into=True):
            return None
        seq.num_computed_tokens = context
        n = min(len(seq) - context, budget)
        admitted, refund = self._admit(seq, n, out)
        if not admitted:
            bm.discard(seq)  # nothing was taken; it stays swapped out
            return None
        bm.allocate_slots(seq, n)
        if seq.inexact_from is not None:
            # Its blocks hold blended chunk KV, and the swap-out forgot the cache cursor:
            # publish none of them (those before the blend stay published). One whose KV
            # is all exact (exact chunk imports only) republishes from the root as any
            # sequence does, deduplicated against the blocks already in the trie.
            bm.stop_caching(seq)
        out.swaps.into.append(SwapIn(seq, list(seq.block_table[:blocks])))
        out.swaps.in_blocks += blocks
        self.paused_kv.counters.swapped_in_blocks += blocks
        self.paused_kv.release_host(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        out.scheduled.append(ScheduledSeq(seq, n, reserved=self._fork_reserve(seq, n)))
        return refund

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> int:
        """Recompute `seq` later; return the budget it had been given this step."""
        self.running.remove(seq)
        refund = self._unschedule(seq, out)
        self.block_manager.discard(seq)
        seq.num_preemptions += 1
        out.preempted.append(seq)
        self.add(seq)
        return refund

    def _unschedule(self, seq: Sequence, out: SchedulerOutput) -> int:
        """Drop `seq`'s item from this step, if it has one; the budget that item cost."""
        for k, item in enumerate(out.scheduled):
            if item.seq is seq:
                del out.scheduled[k]
                if item.chunk is None:
                    return item.num_new_tokens
                out.chunk_items.remove(item)
                return item.chunk.cost
        return 0

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Retire `seq` from whichever queue holds it and free its blocks at once."""
        for queue in (self.running, self.waiting):
            if seq in queue:
                queue.remove(seq)
        self.paused.pop(seq.request_id, None)
        self.block_manager.free(seq)
        self.paused_kv.release_host(seq)  # the engine drops the host copy
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
        self.paused_kv.on_pause(seq)

    def resume(self, seq: Sequence) -> None:
        """Put a paused sequence back to work; new tokens prefill on top of any kept KV."""
        self.paused.pop(seq.request_id)
        if seq.block_table:
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        else:
            self.add(seq)  # its KV was discarded (or never made): queue for a recompute
