"""Paused requests' KV in the scheduler (no model): what each policy does under pressure, the
per-step re-decision, the swap budget, and that an idle engine never waits on paused KV."""

from __future__ import annotations

import time

import pytest

from covey.errors import ConfigError
from covey.llm_backend.block_manager import BlockManager
from covey.llm_backend.config import EngineConfig
from covey.llm_backend.pause_policy import PauseCosts, PausePolicy
from covey.llm_backend.paused_kv import PausedKV
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.scheduler import Scheduler, SchedulerConfig
from covey.llm_backend.sequence import FinishReason, Sequence

from .test_scheduler import complete, run_caching, seq

MB = 1 << 20
COSTS = PauseCosts(1e-3, 1e-3, 1e-3 / MB, 1e-3, 1e-3 / MB)


def make(mode: str, num_blocks: int = 8, swap_blocks: int = 64, host_blocks=None) -> Scheduler:
    bm = BlockManager(num_blocks, 4)
    paused = PausedKV(PausePolicy(mode, COSTS), bm, MB, swap_blocks, host_blocks)
    return Scheduler(SchedulerConfig(8, 64), bm, None, paused)


def paused_beside_a_runner(mode: str, tool_s: float | None = None, host_blocks=None):
    """`c` runs (1 block), `a` pauses holding 3 of 8 blocks, having used `tool` before."""
    sched = make(mode, host_blocks=host_blocks)
    c, a = seq(3, name="c"), seq(11, name="a")
    sched.add(c)
    sched.add(a)
    complete(sched)
    if tool_s is not None:
        sched.paused_kv.policy.times.record("tool", tool_s)
    sched.pause(a)
    a.pause_tool, a.paused_at = "tool", time.perf_counter()
    return sched, c, a


def test_no_pressure_leaves_paused_kv_alone():
    sched, c, a = paused_beside_a_runner("adaptive", tool_s=30.0)
    out = sched.schedule()
    assert len(a.block_table) == 3 and not out.swaps.out
    assert [i.seq for i in out.scheduled] == [c]


def test_under_pressure_a_short_tool_keeps_its_kv_and_a_long_one_swaps():
    sched, c, a = paused_beside_a_runner("adaptive", tool_s=0.001)
    b = seq(20, name="b")  # 5 blocks: more than the 4 free
    sched.add(b)
    out = sched.schedule()
    assert len(a.block_table) == 3 and b in sched.waiting  # preserved: b waits
    assert sched.paused_kv.last_waste["a"].best == "preserve"
    assert [i.seq for i in out.scheduled] == [c]

    sched, c, a = paused_beside_a_runner("adaptive", tool_s=30.0)
    b = seq(20, name="b")
    sched.add(b)
    out = sched.schedule()
    (moved,) = out.swaps.out
    assert moved.seq is a and len(moved.block_ids) == 3 and moved.num_tokens == 11
    assert a.block_table == [] and a.swapped_tokens == 11
    assert b in sched.running and sched.paused_kv.counters.decisions["swap"] == 1


def test_every_step_under_pressure_re_decides_as_the_wait_grows():
    sched, c, a = paused_beside_a_runner("adaptive", tool_s=0.005)
    sched.add(seq(20, name="b"))
    assert not sched.schedule().swaps.out  # expected back in 5 ms: kept
    a.paused_at = time.perf_counter() - 5.0  # it has outlived its history by far
    out = sched.schedule()
    assert [m.seq for m in out.swaps.out] == [a]
    assert sched.paused_kv.last_waste["a"].remaining_s >= 5.0


def test_a_swapped_request_comes_back_with_its_context():
    sched, c, a = paused_beside_a_runner("swap")
    out = sched.schedule()
    assert [m.seq for m in out.swaps.out] == [a] and a.swapped_tokens == 11
    a.token_ids.extend([7, 8])  # the tool's result
    sched.resume(a)
    out = sched.schedule()
    (back,) = out.swaps.into
    assert back.seq is a and len(back.block_ids) == 3 and back.block_ids == a.block_table[:3]
    assert a.num_computed_tokens == 11 and a.swapped_tokens == 0
    item = next(i for i in out.scheduled if i.seq is a)
    assert item.num_new_tokens == 3  # the last sampled token and the two new ones
    counters = sched.paused_kv.counters
    assert counters.swapped_out_blocks == counters.swapped_in_blocks == 3


def test_fixed_discard_frees_at_once_and_counts_the_recompute():
    sched, c, a = paused_beside_a_runner("discard")
    assert a.block_table == [] and a.num_computed_tokens == 0 and a.discarded_tokens == 11
    sched.resume(a)
    complete(sched)
    assert sched.paused_kv.counters.recompute_tokens == 11


def test_fixed_preserve_keeps_kv_while_anything_runs_but_never_idles_the_engine():
    sched, c, a = paused_beside_a_runner("preserve")
    b = seq(24, name="b")  # 6 blocks: more than the 5 free once c is done
    sched.add(b)
    complete(sched)
    assert len(a.block_table) == 3 and b in sched.waiting
    sched.finish(c, FinishReason.STOP)
    complete(sched)  # nothing runs now: the paused KV yields
    assert a.block_table == [] and b in sched.running


def test_the_swap_budget_moves_one_request_per_step_when_two_do_not_fit():
    sched = make("swap", num_blocks=16, swap_blocks=3)
    a, b = seq(11, name="a"), seq(11, name="b")
    for s in (a, b):
        sched.add(s)
    complete(sched)
    sched.pause(a)
    sched.pause(b)
    assert sched.has_work()  # KV still to move out
    first = sched.schedule().swaps.out
    second = sched.schedule().swaps.out
    assert len(first) == len(second) == 1 and {first[0].seq, second[0].seq} == {a, b}
    assert not sched.has_work()


def test_finishing_a_swapped_request_forgets_its_host_kv():
    sched, c, a = paused_beside_a_runner("swap")
    sched.schedule()
    sched.finish(a, FinishReason.ABORT)
    assert a.swapped_tokens == 0 and "a" not in sched.paused


def test_host_space_bounds_swapping_and_is_given_back():
    sched, c, a = paused_beside_a_runner("swap", host_blocks=2)
    assert not sched.schedule().swaps.out  # 3 blocks do not fit in 2: discarded instead
    assert a.block_table == [] and a.discarded_tokens == 11
    sched, c, a = paused_beside_a_runner("swap", host_blocks=3)
    sched.schedule()
    assert sched.paused_kv.host_blocks_used == 3
    sched.resume(a)
    sched.schedule()
    assert sched.paused_kv.host_blocks_used == 0


def test_pause_config_is_checked():
    with pytest.raises(ConfigError, match="pause_policy must be one of"):
        EngineConfig(pause_policy="keep")
    with pytest.raises(ConfigError, match="pause_swap_bytes"):
        EngineConfig(pause_swap_bytes=-1)


def test_room_needed_now_swaps_past_the_budget_instead_of_discarding():
    """The budget paces swaps ahead of need; when a request needs the room this step, a
    paused request the policy would swap is swapped even past the budget, never thrown away
    for a recompute that costs far more than the copy."""
    sched = make("swap", num_blocks=8, swap_blocks=1)
    a, b = seq(11, name="a"), seq(11, name="b")  # 3 blocks each
    for s in (a, b):
        sched.add(s)
    complete(sched)
    sched.pause(a)
    sched.pause(b)
    c = seq(24, name="c")  # 6 blocks: both paused requests must leave the pool
    sched.add(c)
    out = sched.schedule()
    assert {item.seq for item in out.swaps.out} == {a, b} and out.swaps.out_blocks == 6
    assert a.swapped_tokens == b.swapped_tokens == 11
    assert a.discarded_tokens == b.discarded_tokens == 0
    assert sched.paused_kv.counters.decisions["discard"] == 0 and c in sched.running



@pytest.mark.parametrize("mode", ["adaptive", "swap"])
def test_forced_swaps_never_go_past_the_host_cap(mode):
    """Swaps past the per-step budget still respect the host space: each sequence was judged
    swappable against the host room free before any went out, so the room is checked again
    as each one goes, and one that no longer fits is discarded instead."""
    sched = make(mode, num_blocks=10, swap_blocks=1, host_blocks=6)
    held = [seq(11, name=n) for n in "abc"]  # 3 blocks each: host room for two
    for s in held:
        sched.add(s)
    complete(sched)
    if mode == "adaptive":
        sched.paused_kv.policy.times.record("tool", 0.001)
    for s in held:
        sched.pause(s)
        s.pause_tool, s.paused_at = "tool", time.perf_counter()
    d = seq(32, name="d")  # 8 blocks: all three paused requests must leave the pool
    sched.add(d)
    out = sched.schedule()
    kv = sched.paused_kv
    assert kv.host_blocks_used == 6 and out.swaps.out_blocks == 6
    assert kv.counters.decisions["swap"] == 2 and kv.counters.decisions["discard"] == 1
    assert sorted(s.swapped_tokens for s in held) == [0, 11, 11]
    assert sorted(s.discarded_tokens for s in held) == [0, 0, 11]
    assert d in sched.running


def test_paused_requests_sharing_all_their_blocks_give_them_up_together():
    """One prompt sent twice: the prefix cache makes the second share every block of the
    first, so freeing either alone makes no room. Relief used to skip both, and a prompt
    that needed their room was preempted by its own next chunk and then never admitted
    (the engine fails the request it cannot schedule). Freeing both makes the room."""
    bm = BlockManager(8, 4)
    paused_kv = PausedKV(PausePolicy("adaptive", COSTS), bm, MB, 64)
    sched = Scheduler(SchedulerConfig(8, 16), bm, None, paused_kv)
    twins = [Sequence(name, list(range(100, 112)), SamplingParams()) for name in "ab"]
    for twin in twins:
        sched.add(twin)
        run_caching(sched)
        sched.pause(twin)  # a tool call right after the prefill
        twin.pause_tool, twin.paused_at = "tool", time.perf_counter()
    a, b = twins
    assert a.block_table == b.block_table and len(a.block_table) == 3
    assert paused_kv.freeable_blocks(a) == 0 and paused_kv.freeable_blocks(a, twins) == 3
    c = seq(24, name="c")  # 6 blocks: 5 are free, the first chunk's 4 fit
    sched.add(c)
    preempted = []
    for _ in range(2):  # its two chunks
        preempted += run_caching(sched).preempted
    assert preempted == [] and c.num_computed_tokens == 24
    assert not a.block_table and not b.block_table


def admitting_behind_a_head(h2_tokens: int, tool_s: float):
    """`r` runs (2 of 10 blocks), `a` is paused holding 2 (its tool took `tool_s` before),
    and `h1` then `h2` queue: `h1` fits the 6 free blocks and takes the room the step's
    pressure check saw, so what `h2` finds is admission's own doing."""
    bm = BlockManager(10, 4)
    paused_kv = PausedKV(PausePolicy("adaptive", COSTS), bm, MB, 64)
    sched = Scheduler(SchedulerConfig(8, 64), bm, None, paused_kv)
    r, a = seq(7, priority=-2, name="r"), seq(8, name="a")
    sched.add(r)
    sched.add(a)
    complete(sched)  # r: 2 blocks, a: 2 blocks
    paused_kv.policy.times.record("tool", tool_s)
    sched.pause(a)
    a.pause_tool, a.paused_at = "tool", time.perf_counter()
    h1, h2 = seq(8, priority=-1, name="h1"), seq(h2_tokens, name="h2")
    sched.add(h1)
    sched.add(h2)
    return sched, r, a, h1, h2


def test_an_admission_that_is_refused_gives_up_no_paused_kv():
    """The room is decided once, before any relief (REVIEW-stop13 M3). `h2` needs 7
    blocks of the 4 left: `a`'s 2, which the adaptive policy gives up for a long tool,
    would not make them, and no runner below `h2` can be preempted. It used to give up
    `a`'s KV anyway and then be refused; now `a` keeps its KV while `h2` waits."""
    sched, r, a, h1, h2 = admitting_behind_a_head(28, tool_s=30.0)
    out = sched.schedule()
    assert [i.seq for i in out.scheduled] == [r, h1] and sched.waiting == [h2]
    assert len(a.block_table) == 2 and not out.swaps.out
    decisions = sched.paused_kv.counters.decisions
    assert decisions["swap"] + decisions["discard"] == 0


@pytest.mark.parametrize("tool_s", [30.0, 0.001], ids=["long-tool", "short-tool"])
def test_an_admission_counts_the_paused_kv_the_policy_gives_up(tool_s):
    """`h2` needs 6 blocks of the 4 left, and `a`'s 2 make them only if the adaptive
    policy gives `a` up: for a long tool it does, and `h2` is admitted in the same step;
    for a short one `a` keeps its KV and `h2` waits."""
    sched, r, a, h1, h2 = admitting_behind_a_head(24, tool_s)
    out = sched.schedule()
    if tool_s > 1:
        assert [i.seq for i in out.scheduled] == [r, h1, h2] and not a.block_table
        assert [m.seq for m in out.swaps.out] == [a]
    else:
        assert [i.seq for i in out.scheduled] == [r, h1] and sched.waiting == [h2]
        assert len(a.block_table) == 2 and not out.swaps.out


def test_an_admission_keeps_to_the_swap_budget():
    """REVIEW-sched MEDIUM 2: a 2-block swap budget, 12 blocks of 4 tokens. `r` runs (2
    blocks); `a1` and `a2` are paused for a long tool holding 2 each, which the adaptive
    policy swaps out under pressure; `h1` takes 2 of the 6 free blocks, and `h2` needs 8.
    Only one swap fits the step's budget, so `h2` waits, and it is admitted once the
    second swap has gone in a later step: at most one 2-block copy a step. Admission
    used to force both out in the first step (4 blocks, twice the budget). (No step's
    tokens are computed here, so the runners do not grow.)"""
    bm = BlockManager(12, 4)
    paused_kv = PausedKV(PausePolicy("adaptive", COSTS), bm, MB, 2)
    sched = Scheduler(SchedulerConfig(8, 64), bm, None, paused_kv)
    r, a1, a2 = seq(7, priority=-2, name="r"), seq(8, name="a1"), seq(8, name="a2")
    for s in (r, a1, a2):
        sched.add(s)
    complete(sched)
    paused_kv.policy.times.record("tool", 30.0)
    for a in (a1, a2):
        sched.pause(a)
        a.pause_tool, a.paused_at = "tool", time.perf_counter()
    h1, h2 = seq(8, priority=-1, name="h1"), seq(32, name="h2")
    sched.add(h1)
    sched.add(h2)
    swapped, admitted_at = [], None
    for step in range(4):
        out = sched.schedule()
        swapped.append(out.swaps.out_blocks)
        if h2 in [i.seq for i in out.scheduled]:
            admitted_at = step
            break
    assert max(swapped) <= 2 and sum(swapped) == 4 and admitted_at is not None
    assert not a1.block_table and not a2.block_table
