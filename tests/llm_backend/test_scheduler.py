from __future__ import annotations

import itertools

import pytest

from covey.errors import InvalidRequestError
from covey.llm_backend.block_manager import BlockManager
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.scheduler import Scheduler, SchedulerConfig
from covey.llm_backend.sequence import FinishReason, Sequence, SequenceStatus


def make(num_blocks=64, block_size=4, max_seqs=8, budget=64) -> Scheduler:
    return Scheduler(SchedulerConfig(max_seqs, budget), BlockManager(num_blocks, block_size))


_starts = itertools.count(10_000, 10_000)  # clear of the literal prefixes below


def seq(n: int, priority: int = 0, name: str = "r") -> Sequence:
    """Tokens unlike any other sequence's, so no two share a prefix."""
    start = next(_starts)
    return Sequence(name, list(range(start, start + n)), SamplingParams(), priority)


def complete(sched: Scheduler) -> list[Sequence]:
    """Pretend the model ran: advance cursors and append a token where a sample is due."""
    out = sched.schedule()
    for item in out.scheduled:
        item.seq.num_computed_tokens += item.num_new_tokens
        if item.seq.num_computed_tokens == len(item.seq):
            item.seq.token_ids.append(0)
    return [item.seq for item in out.scheduled]


def test_chunked_prefill_spends_the_token_budget():
    sched = make(budget=16)
    a, b = seq(10, name="a"), seq(30, name="b")
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 10), ("b", 6)]


def test_decodes_go_before_a_higher_priority_prefill_chunk():
    sched = make(budget=15)
    a = seq(10, priority=0, name="a")
    sched.add(a)
    complete(sched)
    b = seq(30, priority=-1, name="b")
    sched.add(b)
    complete(sched)  # a decodes 1, b is admitted with 14
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 14)]


def test_waiting_requests_queue_when_the_pool_is_full():
    sched = make(num_blocks=4, block_size=4)
    a, b = seq(12, name="a"), seq(12, name="b")
    sched.add(a)
    sched.add(b)
    assert complete(sched) == [a]
    assert b.status is SequenceStatus.WAITING and b.block_table == []


def test_running_sequence_that_outgrows_the_pool_preempts_the_lowest_priority():
    sched = make(num_blocks=6, block_size=4)
    hi, lo = seq(12, priority=0, name="hi"), seq(11, priority=1, name="lo")
    sched.add(hi)
    sched.add(lo)
    complete(sched)  # hi: 3 blocks (full), lo: 3 blocks
    out = sched.schedule()  # hi needs a 4th block: lo must go
    assert out.preempted == [lo] and [s.seq for s in out.scheduled] == [hi]
    assert lo.status is SequenceStatus.WAITING and lo.num_computed_tokens == 0
    assert lo.num_preemptions == 1


def test_higher_priority_arrival_preempts_a_lower_priority_runner():
    sched = make(num_blocks=4, block_size=4)
    lo = seq(12, priority=5, name="lo")
    sched.add(lo)
    complete(sched)
    hi = seq(12, priority=0, name="hi")
    sched.add(hi)
    out = sched.schedule()
    assert lo in out.preempted and hi in [s.seq for s in out.scheduled]


def test_max_num_seqs_caps_the_running_set():
    sched = make(max_seqs=2)
    seqs = [seq(4, name=str(i)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    assert complete(sched) == seqs[:2]


def test_finish_frees_blocks_and_pause_keeps_them():
    sched = make()
    a = seq(9)
    sched.add(a)
    complete(sched)
    sched.pause(a)
    assert a.status is SequenceStatus.PAUSED and a.block_table and not sched.has_work()
    sched.resume(a)
    assert a in sched.running
    sched.finish(a, FinishReason.ABORT)
    assert sched.block_manager.num_free_blocks == 64 and a.finish_reason is FinishReason.ABORT
    with pytest.raises(ValueError, match="a finished sequence cannot pause"):
        sched.pause(a)


def test_paused_kv_is_discarded_when_a_new_request_needs_the_pool():
    sched = make(num_blocks=4, block_size=4)
    a = seq(12, name="a")
    sched.add(a)
    complete(sched)
    sched.pause(a)  # holds 4 blocks: the whole pool
    b = seq(12, name="b")
    sched.add(b)
    assert complete(sched) == [b]
    assert a.block_table == [] and a.num_computed_tokens == 0  # recomputes on resume
    sched.finish(b, FinishReason.STOP)
    sched.resume(a)
    assert a in sched.waiting and complete(sched) == [a]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=0)


def shared(n: int, prefix: list[int], name: str, priority: int = 0) -> Sequence:
    tail = list(range(900_000 + 100 * len(name), 900_000 + 100 * len(name) + n))
    ids = prefix + tail
    return Sequence(name, ids, SamplingParams(), priority)


def run_caching(sched: Scheduler):
    """`complete`, publishing full blocks in the prefix cache as the engine does."""
    out = sched.schedule()
    for item in out.scheduled:
        item.seq.num_computed_tokens += item.num_new_tokens
        sched.block_manager.cache_full_blocks(item.seq)
        if item.seq.num_computed_tokens == len(item.seq):
            item.seq.token_ids.append(0)
    return out


def run_step(sched: Scheduler) -> list[str]:
    """`run_caching`, naming the requests it scheduled."""
    return [item.seq.request_id for item in run_caching(sched).scheduled]


def test_a_request_sharing_a_prefix_being_computed_waits_a_step_then_reuses_it():
    sched = make(budget=64)
    prefix = list(range(1, 17))  # four blocks of 4
    a, b, c = shared(3, prefix, "a"), shared(3, prefix, "bb"), seq(5, name="c")
    for s in (a, b, c):
        sched.add(s)
    assert run_step(sched) == ["a", "c"]  # b waits; c, unrelated, is not held up behind it
    assert b.block_table == [] and b.num_computed_tokens == 0  # no references kept
    assert run_step(sched)[-1] == "bb"
    assert b.num_cached_tokens == 16


def test_deferral_leaves_reference_counts_as_they_were():
    sched = make(budget=64)
    prefix = list(range(1, 17))
    warm = shared(1, prefix[:8], "w")  # caches the first two blocks, then finishes
    sched.add(warm)
    run_step(sched)
    sched.finish(warm, FinishReason.STOP)
    baseline = list(sched.block_manager.ref_counts)
    a, b = shared(3, prefix, "a"), shared(3, prefix, "bb")
    sched.add(a)
    sched.add(b)
    assert run_step(sched) == ["a"]  # b matched two cached blocks, then gave them back
    for block in a.block_table:
        baseline[block] += 1
    assert sched.block_manager.ref_counts == baseline


def test_without_the_prefix_cache_nothing_waits():
    sched = Scheduler(SchedulerConfig(8, 64), BlockManager(64, 4, enable_prefix_caching=False))
    prefix = list(range(1, 17))
    a, b = shared(3, prefix, "a"), shared(3, prefix, "bb")
    sched.add(a)
    sched.add(b)
    assert run_step(sched) == ["a", "bb"]


def test_a_block_a_victim_shares_only_with_a_pin_is_room_to_admit():
    """Preempting the runner leaves its pinned prefix held by the pin alone, and pins
    yield, so those blocks count toward the room a higher-priority request can get."""
    sched = make(num_blocks=8, block_size=4)  # pins may hold 2 blocks
    bm = sched.block_manager
    prefix = list(range(1, 9))  # two blocks of 4
    warm = shared(1, prefix, "w")
    sched.add(warm)
    run_step(sched)
    sched.finish(warm, FinishReason.STOP)
    assert bm.pin("sys", prefix) and bm.num_pinned_blocks == 2
    low = shared(10, prefix, "low", priority=1)
    sched.add(low)
    run_step(sched)  # 5 blocks: the 2 pinned and 3 of its own; 3 are free
    high = seq(30, priority=0, name="high")  # 8 blocks: the whole pool
    sched.add(high)
    assert run_step(sched) == ["high"]
    assert low.status is SequenceStatus.WAITING and low.num_preemptions == 1
    assert bm.pinned == {}  # the pin yielded its blocks


def test_a_prefix_only_outranked_runners_share_is_room_to_admit():
    """REVIEW-reserve MEDIUM 2: two lower-priority runners read one 2-block prefix and
    hold a block each; 3 blocks are free. Preempting both frees the prefix as well, so a
    higher-priority request of 6 blocks gets in (3 + 2 + 2 >= 6); counting only blocks one
    sequence holds (3 + 2) refused it while they ran."""
    sched = make(num_blocks=7, block_size=4)
    prefix = list(range(1, 9))
    a, b = shared(3, prefix, "a", priority=1), shared(3, prefix, "bb", priority=1)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # b waits for the prefix a computes
    run_step(sched)  # b hits it: 2 shared blocks and one each, 3 free
    assert sched.block_manager.num_free_blocks == 3 and a.block_table[:2] == b.block_table[:2]
    high = Sequence("high", list(range(700_000, 700_024)), SamplingParams())  # no prefix hit
    sched.add(high)
    assert run_step(sched) == ["high"] and sched.waiting == [a, b]
    assert high.num_cached_tokens == 0 and a.num_preemptions == b.num_preemptions == 1


def test_a_prompt_larger_than_the_pool_fails_at_admission_and_the_others_run():
    """Admission takes a prompt one chunk at a time: one larger than the pool used to get
    in, preempt itself at the chunk that did not fit and come back, every step, forever."""
    sched = make(num_blocks=4, block_size=4, budget=8)
    big, small = seq(20, priority=0, name="big"), seq(6, priority=1, name="small")
    sched.add(big)
    sched.add(small)
    out = sched.schedule()
    assert [s.request_id for s, _ in out.failed] == ["big"]
    error = out.failed[0][1]
    assert isinstance(error, InvalidRequestError)
    assert "20 tokens (5 blocks)" in str(error) and "the pool has 4 blocks" in str(error)
    assert big.status is SequenceStatus.FINISHED and big.finish_reason is FinishReason.ERROR
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("small", 6)]
    assert big not in sched.waiting and big not in sched.running


def test_a_runner_that_can_never_fit_fails_before_preempting_or_freeing_anything():
    """REVIEW-sched MEDIUM 1: 6 blocks of 4 tokens, 16 tokens a step, paused KV under the
    old rule (discarded when room is needed). `grow` (12 tokens computed: 3 blocks) resumes
    with 16 new tokens: 7 blocks, more than the pool. `other` (lower priority) holds a
    block and a paused request 2. No victim could make that room, so `grow` fails at once
    and `other` runs with the paused KV kept. It used to discard the paused KV and preempt
    `other` (both recomputed later) before failing alone."""
    sched = make(num_blocks=6, block_size=4, budget=16)
    grow, other, paused = seq(12, name="grow"), seq(4, priority=1, name="other"), seq(8)
    for s, computed in ((grow, 12), (other, 3), (paused, 8)):
        sched.block_manager.allocate_slots(s, computed)
        s.num_computed_tokens = computed
        s.status = SequenceStatus.RUNNING
        sched.running.append(s)
    sched.pause(paused)
    grow.token_ids += list(range(500, 516))
    assert sched.block_manager.num_free_blocks == 0
    out = sched.schedule()
    assert [s for s, _ in out.failed] == [grow] and "cannot go on" in str(out.failed[0][1])
    assert out.preempted == [] and len(paused.block_table) == 2 and not paused.discarded_tokens
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == [("other", 1)]
    assert sched.block_manager.num_free_blocks == 3


def test_a_lone_decode_that_outgrows_the_pool_fails_instead_of_preempting_itself_forever():
    """`grow` outgrows the 16-token pool while decoding. `other`, lower in priority, is
    preempted for it first; then `grow` runs alone with nothing left to free, and fails
    with its reason (it used to preempt itself, recompute its prompt chunk by chunk and be
    short again at the same token, forever). `other` then runs to its end."""
    sched = make(num_blocks=4, block_size=4, budget=8)
    grow, other = seq(10, priority=0, name="grow"), seq(3, priority=1, name="other")
    sched.add(grow)
    sched.add(other)
    failed, preempted = [], []
    for _ in range(30):
        out = sched.schedule()
        failed += out.failed
        preempted += out.preempted
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            if item.seq.num_computed_tokens == len(item.seq):
                item.seq.token_ids.append(0)
        if failed and len(other) == 12:
            sched.finish(other, FinishReason.LENGTH)
            break
    assert [s.request_id for s, _ in failed] == ["grow"] and preempted == [other]
    assert "cannot go on" in str(failed[0][1]) and "the pool has 4 blocks" in str(failed[0][1])
    assert grow.num_preemptions == 0 and len(grow) == 17  # its 16 tokens' KV, and 1 more
    assert other.status is SequenceStatus.FINISHED and not sched.has_work()
    assert sched.block_manager.num_free_blocks == 4
