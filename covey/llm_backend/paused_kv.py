"""The KV of requests paused for tool calls: kept, swapped to host or discarded, per step.

The scheduler asks this at the start of every step, and again whenever it needs room. A
fixed policy acts once per pause (discard at once; swap as the per-step budget allows;
preserve never frees). The adaptive policy does nothing while the pool has room: idle KV
wastes nothing when nobody needs the memory. Under pressure it re-decides every paused
request holding KV, each step, by `PausePolicy` (min-waste), and carries out the swaps and
discards that gain the most until the pressure is gone. Swaps are budgeted in blocks per
step (out and in apart); a swap over budget waits for the next step, re-decided then.

Plain Python over sequences and the block manager: the copies themselves are the engine's
(`kv_swap.py`), told by the `SwapOut` / `SwapIn` lists in the scheduler's output.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from covey.llm_backend.block_manager import BlockManager
from covey.llm_backend.pause_policy import PausePolicy, Waste
from covey.llm_backend.sequence import Sequence


@dataclass(frozen=True)
class SwapOut:
    """Copy `block_ids` (read before this step writes anything) to host for `seq`."""

    seq: Sequence
    block_ids: list[int]
    num_tokens: int


@dataclass(frozen=True)
class SwapIn:
    """Copy `seq`'s host KV into `block_ids` before this step's forward."""

    seq: Sequence
    block_ids: list[int]


@dataclass
class PauseCounters:
    """Since engine start: what happened to paused requests' KV."""

    swapped_out_blocks: int = 0
    swapped_in_blocks: int = 0
    recompute_tokens: int = 0  # tokens recomputed on resume after a discard
    # "swap" / "discard": paused requests' KV moved out or freed; "preserve": each step an
    # adaptive re-decision under pressure kept one in the pool.
    decisions: dict[str, int] = field(
        default_factory=lambda: {"preserve": 0, "swap": 0, "discard": 0}
    )


@dataclass
class StepSwaps:
    """This step's copies and how much of the swap budget they used."""

    out: list[SwapOut] = field(default_factory=list)
    into: list[SwapIn] = field(default_factory=list)
    out_blocks: int = 0
    in_blocks: int = 0


class PausedKV:
    def __init__(
        self,
        policy: PausePolicy | None,
        block_manager: BlockManager,
        bytes_per_block: int,
        swap_blocks_per_step: int,
        host_blocks: int | None = None,
    ) -> None:
        """`policy` None: the engine's old rule (discard the longest-paused request's KV
        when room is needed), for schedulers built without a measured profile.
        `host_blocks`: how many blocks host memory may hold (EngineConfig.pause_swap_bytes;
        None: no limit); a swap that would pass it is a discard instead."""
        self.policy = policy
        self.bm = block_manager
        self.bytes_per_block = bytes_per_block
        self.swap_blocks_per_step = max(1, swap_blocks_per_step)
        self.host_blocks = host_blocks
        self.host_blocks_used = 0
        self.counters = PauseCounters()
        self.last_waste: dict[str, Waste] = {}  # request id -> its terms at the last re-decision

    @property
    def mode(self) -> str:
        return self.policy.mode if self.policy is not None else "legacy"

    # -- what a sequence can give -----------------------------------------------------------

    def freeable_blocks(
        self,
        seq: Sequence,
        holding: list[Sequence] | None = None,
        refs: Counter[int] | None = None,
    ) -> int:
        """Blocks that freeing `seq` would make room (shared ones stay held by others).

        When every block of `seq` is shared, the blocks it shares only with others of
        `holding` (the paused requests relief may free) count instead: freeing it alone
        makes no room, but freeing those others too does. Two paused requests that hold the
        same blocks (one prompt sent twice, deduplicated by the prefix cache) would each
        count 0 otherwise, and relief, skipping both, would keep their blocks out of reach
        for as long as they stayed paused: an admission that needed that room would wait on
        them, or fail with the pool full of nothing but their KV. Counted only then, so a
        request with blocks of its own is weighed, as before, by what it alone frees.
        That room is made only if those others go in the same pass. Forced relief frees
        every one it ranks while room is short, so it does; unforced relief (pressure ahead
        of need) may free one and keep another (the policy preserves it, or its swap waits
        for the budget), and the first then went for no room this step: its recompute or
        copy is the price, and the other follows in a later pass or a forced one.
        `refs`: `holding`'s block counts (`_refs`) when the caller has them, so a pass over
        many paused requests does not rebuild them for each."""
        alone = sum(1 for b in seq.block_table if self.bm.held_by_one_sequence(b))
        if alone or not holding:
            return alone
        refs = self._refs(holding) if refs is None else refs
        return sum(1 for b in seq.block_table if self.bm.sequence_refs(b) == refs[b])

    def giving_room(self, holding: list[Sequence]) -> list[Sequence]:
        """Those of `holding` (paused requests with blocks) whose KV is room once all of
        `holding` lets go: each holds a block no runner reads (see `freeable_blocks`)."""
        refs = self._refs(holding)
        return [
            s for s in holding if any(self.bm.sequence_refs(b) == refs[b] for b in s.block_table)
        ]

    def given_up(
        self, holding: list[Sequence], running: list[Sequence], swaps: StepSwaps
    ) -> list[Sequence]:
        """Those of `holding` (paused requests with blocks) that the adaptive policy would
        give up now unforced, if room were short: each whose KV frees room and costs less
        swapped or discarded than kept, and, for a swap, that fits this step's swap budget
        (`swaps` so far) and the host room, taken greatest gain first as `_relieve` takes
        them. Forced relief over these (`relieve(..., for_running=True)` given just them)
        frees them all, so a caller can count on their room, and stays within the budget:
        an admission paces its swaps as unforced relief does. Decides nothing and records
        nothing."""
        assert self.mode == "adaptive"
        now = time.perf_counter()
        running_bytes = sum(len(s.block_table) for s in running) * self.bytes_per_block
        refs = self._refs(holding)
        ranked = []
        for seq in holding:
            blocks = self.freeable_blocks(seq, holding, refs)
            if not blocks:
                continue
            waste = self._waste(seq, blocks, running_bytes, now)
            if waste.best != "preserve":
                cost = waste.swap if waste.best == "swap" else waste.discard
                assert cost is not None
                ranked.append((waste.preserve - cost, seq, waste.best))
        used, host = swaps.out_blocks, self.host_blocks_used
        given = []
        for _, seq, action in sorted(ranked, key=lambda r: -r[0]):
            if action == "swap":
                n = self.blocks_of(seq.num_computed_tokens)
                over_host = self.host_blocks is not None and host + n > self.host_blocks
                if not (used == 0 or used + n <= self.swap_blocks_per_step) or over_host:
                    continue  # unforced relief would leave it for a later step
                used, host = used + n, host + n
            given.append(seq)
        return given

    @staticmethod
    def _refs(holding: list[Sequence]) -> Counter[int]:
        """Block -> how many of `holding` hold it."""
        return Counter(b for s in holding for b in s.block_table)

    def blocks_of(self, num_tokens: int) -> int:
        """Blocks holding a sequence's first `num_tokens` tokens."""
        return -(-num_tokens // self.bm.block_size)

    def can_swap(self, seq: Sequence) -> bool:
        """Whether `seq`'s KV can go to host and come back as it is. Not one mid-prefill
        (nothing worth keeping; a chunk plan's cursor would not survive), nor one the host
        space left cannot hold. A sequence with chunk segments swaps like any other: its
        KV comes back bit for bit, and after a swap-in the scheduler publishes none of a
        blended one's blocks (blended KV must never serve a prefix-cache hit)."""
        blocks = self.blocks_of(seq.num_computed_tokens)
        room = self.host_blocks is None or self.host_blocks_used + blocks <= self.host_blocks
        return (
            room
            and seq.chunk_plan is None
            and seq.num_computed_tokens > 0
            and len(seq.block_table) >= blocks
        )

    # -- acting ------------------------------------------------------------------------------

    def on_pause(self, seq: Sequence) -> None:
        """A fixed discard policy frees the KV the moment a request pauses."""
        if self.mode == "discard" and seq.block_table:
            self.discard(seq)

    def discard(self, seq: Sequence) -> None:
        """Free `seq`'s KV; it recomputes it on resume (chunked, by the scheduler's budget)."""
        seq.discarded_tokens = seq.num_computed_tokens
        self.bm.discard(seq)
        self.counters.decisions["discard"] += 1

    def swap_out(self, seq: Sequence, swaps: StepSwaps) -> None:
        """Hand `seq`'s computed blocks to the engine to copy out, then free them."""
        n = self.blocks_of(seq.num_computed_tokens)
        swaps.out.append(SwapOut(seq, list(seq.block_table[:n]), seq.num_computed_tokens))
        swaps.out_blocks += n
        seq.swapped_tokens = seq.num_computed_tokens
        self.host_blocks_used += n
        self.bm.discard(seq)
        self.counters.swapped_out_blocks += n
        self.counters.decisions["swap"] += 1

    def release_host(self, seq: Sequence) -> None:
        """`seq`'s host copy is gone (swapped back in, finished, or its copy failed)."""
        if seq.swapped_tokens:
            self.host_blocks_used -= self.blocks_of(seq.swapped_tokens)
            seq.swapped_tokens = 0

    def swap_budget_allows(self, swaps: StepSwaps, blocks: int, into: bool) -> bool:
        """Whether `blocks` more fit this step's budget; the first swap of a step always
        goes, so a request larger than the budget cannot starve."""
        used = swaps.in_blocks if into else swaps.out_blocks
        return used == 0 or used + blocks <= self.swap_blocks_per_step

    def manage(
        self,
        paused: list[Sequence],
        running: list[Sequence],
        pressure: Callable[[], bool],
        swaps: StepSwaps,
    ) -> None:
        """The start of a step: fixed swap moves paused KV out as the budget allows; the
        adaptive policy, under `pressure`, re-decides every paused request holding KV."""
        holding = [s for s in paused if s.block_table]
        if not holding or self.policy is None or self.mode in ("preserve", "discard"):
            return
        if self.mode == "swap":
            for seq in holding:
                if not self.can_swap(seq):
                    self.discard(seq)
                elif self.swap_budget_allows(swaps, self.blocks_of(seq.num_computed_tokens), False):
                    self.swap_out(seq, swaps)
            return
        if pressure():
            self._relieve(holding, running, swaps, pressure)

    def relieve(
        self,
        paused: list[Sequence],
        running: list[Sequence],
        swaps: StepSwaps,
        still_short: Callable[[], bool],
        for_running: bool = False,
        idle: bool = False,
    ) -> bool:
        """Free paused KV while `still_short()`; returns whether anything was freed.

        `for_running`: room a running request needs to go on: even KV the adaptive policy
        would preserve goes (the cheaper of swap and discard) before a running request is
        preempted; a fixed preserve policy still keeps it. `idle`: nothing runs, or the
        one request running is the one short of room, so the engine would sit idle (or
        spin) with work waiting: any policy, preserve too, gives up paused KV then
        (longest-paused first), or a pool full of paused KV would wedge it.
        """
        holding = [s for s in paused if s.block_table]
        if not holding or (self.mode == "preserve" and not idle):
            return False
        if self.policy is None or self.mode in ("preserve", "discard"):
            freed = False
            for seq in holding:  # longest-paused first
                if not still_short():
                    break
                self.discard(seq)
                freed = True
            return freed
        return self._relieve(holding, running, swaps, still_short, force=for_running or idle)

    def _relieve(
        self,
        holding: list[Sequence],
        running: list[Sequence],
        swaps: StepSwaps,
        still_short: Callable[[], bool],
        force: bool = False,
    ) -> bool:
        """Carry out the best non-preserve action for each of `holding`, greatest gain
        first, while `still_short()`. The per-step swap budget paces relief ahead of need;
        with `force` (room needed this step) a swap goes even past it. Returns whether
        anything was freed."""
        assert self.policy is not None
        now = time.perf_counter()
        self.last_waste = {}  # only the latest re-decision's: ids come and go
        running_bytes = sum(len(s.block_table) for s in running) * self.bytes_per_block
        refs = self._refs(holding)
        ranked = []
        for seq in holding:
            blocks = self.freeable_blocks(seq, holding, refs)
            if blocks == 0:
                continue  # no room even with the other paused requests (a runner reads it)
            action, gain = self._choose(seq, blocks, running_bytes, now, force)
            if action != "preserve":
                ranked.append((gain, seq, action))
            else:
                self.counters.decisions["preserve"] += 1
        freed = False
        for _, seq, action in sorted(ranked, key=lambda r: -r[0]):
            if not still_short():
                break
            if action == "swap" and not force:
                n = self.blocks_of(seq.num_computed_tokens)
                if not self.swap_budget_allows(swaps, n, False):
                    continue  # over budget: preserved this step, re-decided next
            # Room needed now (`force`) goes past the budget: the copy still costs less
            # than the recompute a discard would (the policy priced them), often by far.
            # Host room is checked again here: `_choose` judged every sequence against the
            # host space free before any of them went out, and the cap is a hard limit.
            if action == "swap" and not self.can_swap(seq):
                if not force:
                    continue  # re-decided next step, against the host room left then
                action = "discard"
            if action == "swap":
                self.swap_out(seq, swaps)
            else:
                self.discard(seq)
            freed = True
        return freed

    def _choose(
        self, seq: Sequence, blocks: int, running_bytes: int, now: float, force: bool
    ) -> tuple[str, float]:
        """The action for `seq` and what it saves over preserving (byte-seconds)."""
        assert self.policy is not None
        if self.mode == "swap":
            return ("swap" if self.can_swap(seq) else "discard"), 0.0
        waste = self._waste(seq, blocks, running_bytes, now)
        self.last_waste[seq.request_id] = waste
        action = waste.best
        if action == "preserve" and force:
            action = "swap" if waste.swap is not None and waste.swap < waste.discard else "discard"
        cost = waste.swap if action == "swap" else waste.discard
        assert cost is not None
        return action, waste.preserve - cost

    def _waste(self, seq: Sequence, blocks: int, running_bytes: int, now: float) -> Waste:
        """What keeping, swapping and discarding `seq`'s KV each waste (the adaptive
        policy's terms), its `blocks` freeable."""
        assert self.policy is not None
        tokens = min(seq.num_computed_tokens, blocks * self.bm.block_size)
        return self.policy.waste(
            blocks * self.bytes_per_block,
            tokens,
            running_bytes,
            seq.pause_tool,
            now - (seq.paused_at or now),
            self.can_swap(seq),
        )
