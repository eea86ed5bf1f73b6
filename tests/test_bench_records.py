"""The benchmarks' run records: what a reader needs to tell a slower run from a busier
machine (the thread counts steps ran on, the load around them) reaches the JSON."""

from __future__ import annotations

import argparse
import json
import runpy
from pathlib import Path

import pytest

BENCH_COMMON = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_common.py"


@pytest.fixture(scope="module")
def common() -> dict:
    return runpy.run_path(str(BENCH_COMMON), run_name="bench_common_under_test")


class GovernedEngine:
    """Moves its thread count before each step's work, as the thread governor does."""

    def __init__(self, counts: list[int]) -> None:
        self.counts = counts
        self.num_threads = 2

    def step(self) -> list[int]:
        self.num_threads = self.counts.pop(0)
        return [self.num_threads]


def test_step_threads_counts_each_step_under_the_count_it_ran_on(common):
    engine = GovernedEngine([2, 1, 1, 2, 1])
    threads = common["StepThreads"](engine)
    assert engine.step() == [2]  # the wrapped step returns what the engine's did
    engine.step()
    snap = threads.snapshot()
    for _ in range(3):
        engine.step()
    assert threads.since(snap)["steps"] == {"1": 2, "2": 1}
    total = threads.since()
    assert total["steps"] == {"1": 3, "2": 2}
    assert set(total["step_seconds"]) == {"1", "2"}
    assert all(s >= 0 for s in total["step_seconds"].values())


def test_step_threads_counts_every_step_of_a_real_engine(common):
    """On the engine itself: the governor sets `num_threads` before the model call, and
    every step (a prefill, decodes) is counted once under a count the engine used."""
    from covey.llm_backend.config import EngineConfig
    from covey.llm_backend.llm_engine import LLMEngine
    from covey.llm_backend.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model="dummy:tiny", device="cpu", kv_cache_tokens=256))
    threads = common["StepThreads"](engine)
    engine.add_request([1, 2, 3, 4], SamplingParams(max_tokens=5, ignore_eos=True))
    seen, calls = set(), 0
    while engine.has_unfinished_requests():
        engine.step()
        calls += 1
        seen.add(str(engine.num_threads))
    total = threads.since()
    assert calls >= 5 and sum(total["steps"].values()) == calls
    assert set(total["steps"]) <= seen


def test_machine_load_reports_the_load_average_and_others_cores(common):
    load = common["machine_load"](0.05)
    assert set(load) == {"load_average_1m", "others_cores"}
    if Path("/proc/stat").exists():  # Linux: both are measured
        assert isinstance(load["others_cores"], float) and load["others_cores"] >= 0
        assert isinstance(load["load_average_1m"], float)
    else:
        assert load["others_cores"] is None


def test_write_results_adds_extra_fields_but_never_replaces_shared_ones(common, tmp_path):
    args = argparse.Namespace(quick=True, json=tmp_path / "out.json")
    extra = {"systems": {"covey": {"load_before": {"others_cores": 0.5}}}}
    data = common["write_results"](args, "x", [], "cpu", "m", extra)
    stored = json.loads((tmp_path / "out.json").read_text())
    assert stored == data and stored["systems"] == extra["systems"]
    assert {"benchmark", "environment", "results"} <= set(stored)
    assert set(stored["environment"]["openmp_env"]) == set(common["OPENMP_VARS"])
    with pytest.raises(ValueError, match=r"\['results'\] would replace the shared ones"):
        common["write_results"](args, "x", [], "cpu", "m", {"results": []})
