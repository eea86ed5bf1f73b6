"""The thread governor: its decisions on scripted measurements (no timing), the user's
thread count respected, and a real engine stepping with it on."""

from __future__ import annotations

import os
import time

import pytest
import torch

from covey.llm_backend.cpu_threads import user_chose_threads
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.thread_governor import (
    CpuSample,
    ThreadGovernor,
    ThreadPolicy,
    others_cores,
    process_governor,
    read_cpu_sample,
)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_proc_stat_is_read_over_our_cpus_only(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  900 0 900 900 0 0 0 0 0 0\n"
        "cpu0 100 10 50 1000 7 1 2 3 0 0\n"
        "cpu1 400 0 100 2000 0 0 0 0 0 0\n"
        "intr 12345\n"
    )
    ticks = os.sysconf("SC_CLK_TCK")
    only0 = read_cpu_sample(frozenset({0}), str(stat))
    assert only0 is not None and only0.busy_s == pytest.approx(166 / ticks)  # idle, iowait out
    both = read_cpu_sample(frozenset({0, 1}), str(stat))
    assert both is not None and both.busy_s == pytest.approx(666 / ticks)
    assert read_cpu_sample(frozenset({5}), str(stat)) is None
    assert read_cpu_sample(frozenset({0}), str(tmp_path / "missing")) is None
    real = read_cpu_sample(frozenset(os.sched_getaffinity(0)))
    assert real is not None and real.busy_s > 0 and real.own_s > 0


def test_others_cores_is_machine_busy_minus_our_own_cpu():
    a = CpuSample(wall_s=10.0, busy_s=100.0, own_s=5.0)
    assert others_cores(a, CpuSample(10.5, 100.9, 5.4)) == pytest.approx(1.0)  # 0.5 of 0.9
    assert others_cores(a, CpuSample(10.5, 100.8, 5.8)) == 0.0  # tick skew: never negative
    assert others_cores(a, a) == 0.0


def test_policy_drops_at_once_and_climbs_back_after_three_clear_samples():
    p = ThreadPolicy(max_threads=2)
    assert p.threads == 2
    assert [p.decide(x) for x in (0.0, 0.3, 0.45)] == [2, 2, 2]  # light background: keep 2
    assert p.decide(0.7) == 1  # a competitor: fewer at once
    assert [p.decide(x) for x in (1.3, 1.0, 0.6)] == [1, 1, 1]
    assert [p.decide(x) for x in (0.1, 0.2, 0.0)] == [1, 1, 2]  # clear three times: back up
    p.decide(0.9)
    # a competitor that comes and goes never brings the second thread back
    assert [p.decide(x) for x in (0.1, 0.1, 0.4, 0.1, 0.1, 0.6, 0.0)] == [1] * 7
    assert p.decide(1.9) == 1  # never below one


def test_policy_on_many_cores_fits_the_free_ones():
    p = ThreadPolicy(max_threads=16)
    assert p.decide(3.2) == 13  # 12.8 free, rounded at half a core
    assert p.decide(3.4) == 13  # 12.6 free: still fits 13
    assert p.decide(0.0) == 13 and p.decide(0.0) == 13 and p.decide(0.0) == 16
    assert p.decide(15.0) == 1
    assert ThreadPolicy(max_threads=4, threads=9).threads == 4


def scripted(samples):
    it = iter(samples)
    return lambda: next(it)


def test_governor_sets_torch_threads_from_samples(restore_threads):
    # cores used by others between samples: 0.9, 0.9, then idle three times
    samples = [CpuSample(0.0, 0.0, 0.0)]
    for i, others in enumerate((0.9, 0.9, 0.0, 0.0, 0.0), start=1):
        prev = samples[-1]
        samples.append(CpuSample(i * 0.3, prev.busy_s + 0.3 * (1 + others), prev.own_s + 0.3))
    gov = ThreadGovernor(ThreadPolicy(max_threads=2), scripted(samples), interval_s=0.0)
    torch.set_num_threads(2)
    assert gov.between_steps() == 2  # the first sample is only a baseline
    assert gov.between_steps() == 1 and torch.get_num_threads() == 1
    assert gov.last_others == pytest.approx(0.9)
    assert [gov.between_steps() for _ in range(4)] == [1, 1, 1, 2]
    assert torch.get_num_threads() == 2
    assert dict(gov.decisions) == {"fewer": 1, "more": 1}


def test_governor_rebases_after_idle_gap_and_waits_its_interval(restore_threads):
    samples = [CpuSample(0.0, 0.0, 0.0), CpuSample(30.0, 60.0, 0.0)]  # 2 cores busy, 30 s
    gov = ThreadGovernor(ThreadPolicy(max_threads=2), scripted(samples), interval_s=0.0)
    gov.between_steps()
    assert gov.between_steps() == 2 and not gov.decisions  # stale: a new baseline only
    soon = ThreadGovernor(ThreadPolicy(max_threads=2), scripted(samples), interval_s=3600.0)
    soon.between_steps()  # a baseline: the first measurement is due in a tenth of a second
    assert soon._next_s <= time.monotonic() + soon.first_interval_s
    waiting = ThreadGovernor(ThreadPolicy(max_threads=2), scripted([]), interval_s=3600.0)
    waiting._next_s = float("inf")
    assert waiting.between_steps() == 2  # not due: the sampler is not even called
    unreadable = ThreadGovernor(ThreadPolicy(max_threads=2), lambda: None, interval_s=0.0)
    assert unreadable.between_steps() == 2 and unreadable._next_s == float("inf")


def test_users_thread_count_is_respected(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert not user_chose_threads(None)
    assert user_chose_threads(1) and user_chose_threads(2)
    for value, chosen in (("2", True), ("1", True), ("0", False), ("", False), ("x", False)):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert user_chose_threads(None) is chosen


def run(engine, prompt, params) -> list[int]:
    (out,) = engine.run_to_completion([engine.add_request(prompt, params)])
    return list(out.token_ids)


def test_engine_steps_with_the_governor_changing_threads(
    make_engine, restore_threads, monkeypatch
):
    """A real engine whose governor sees a competitor after the first steps: it drops to
    one thread mid-generation, says so in its stats, and the greedy tokens are the same
    as on a fixed thread count."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompt = "The quick brown fox"
    fixed = make_engine(num_threads=2)
    assert fixed.thread_governor is None  # the user's count: no governor
    want = run(fixed, prompt, params)
    engine = make_engine()
    assert engine.thread_governor is process_governor()
    samples = [CpuSample(i * 0.3, max(0, i - 2) * 0.3, 0.0) for i in range(50)]  # others: 0, 1
    engine.thread_governor = ThreadGovernor(
        ThreadPolicy(max_threads=2), scripted(samples), interval_s=0.0
    )
    assert run(engine, prompt, params) == want
    stats = engine.stats()
    assert stats.num_threads == 1 == torch.get_num_threads()
    assert stats.thread_decisions == {"fewer": 1}
    assert fixed.stats().num_threads == 2 and fixed.stats().thread_decisions == {}
