"""benchmarks/scale.py's open loop (`--arrival poisson`), without Ray: the arrival schedule
is seeded, the same for every system, Poisson-like and at exactly the rate it claims; the
open-loop driver keeps its schedule against a real covey server (the embedded model on
127.0.0.1), bounds the requests in flight and flags a system that falls behind."""

from __future__ import annotations

import asyncio
import importlib.util
import statistics
from pathlib import Path

import pytest

from covey.llm_backend.async_llm import AsyncLLM
from covey.server.background_server import BackgroundServer
from covey.server.server_builder import build_state
from covey.server.state import ServerSettings
from tests.runtime.conftest import make_cpu_engine

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"
spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
scale = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scale)


def test_the_schedule_is_a_function_of_count_rate_and_seed():
    first = scale.poisson_arrivals(32, 1.3)
    assert scale.poisson_arrivals(32, 1.3) == first  # every system gets these times
    assert scale.poisson_arrivals(32, 1.3, seed=scale.ARRIVAL_SEED) == first
    assert scale.poisson_arrivals(32, 1.3, seed=1) != first
    # Another rate stretches the same draws: the same pattern, in proportion.
    other = scale.poisson_arrivals(32, 2.6)
    assert other == pytest.approx([t / 2 for t in first])


@pytest.mark.parametrize("n,rate", [(1, 0.5), (32, 1.3), (160, 0.9), (20000, 7.0)])
def test_the_schedule_offers_exactly_the_rate_it_claims(n, rate):
    times = scale.poisson_arrivals(n, rate)
    assert len(times) == n
    assert times[0] > 0
    assert all(b > a for a, b in zip(times, times[1:]))
    assert n / times[-1] == pytest.approx(rate, rel=1e-12)


def test_the_gaps_are_exponential_not_regular():
    """Poisson arrivals: exponential gaps, whose spread equals their mean and whose median
    is ln 2 of the mean; an evenly spaced or uniform-gap schedule fails both."""
    times = scale.poisson_arrivals(20000, 3.0)
    gaps = [b - a for a, b in zip([0.0, *times], times)]
    mean = statistics.fmean(gaps)
    assert statistics.pstdev(gaps) / mean == pytest.approx(1.0, abs=0.04)
    below = sum(g < 0.6931 * mean for g in gaps) / len(gaps)
    assert below == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("n,rate", [(0, 1.0), (4, 0.0), (4, -1.0), (4, float("inf"))])
def test_a_schedule_that_cannot_be_raises(n, rate):
    with pytest.raises(ValueError, match="poisson_arrivals needs"):
        scale.poisson_arrivals(n, rate)


def test_the_open_loop_is_the_default_and_the_rate_needs_it(capsys):
    pytest.importorskip("matplotlib")  # the benchmark's parser requires it (the bench extra)
    args = scale.arguments(["--quick"])
    assert (args.arrival, args.rate, args.load) == ("poisson", None, scale.LOAD)
    assert scale.arguments(["--arrival", "closed"]).arrival == "closed"
    args = scale.arguments(["--quick", "--rate", "1.5"])
    assert (args.arrival, args.rate) == ("poisson", 1.5)
    assert scale.arguments(["--arrival", "poisson", "--load", "0.5"]).load == 0.5
    for wrong, says in [
        (["--arrival", "closed", "--rate", "1.5"], "drop --arrival closed"),
        (["--arrival", "closed", "--load", "0.5"], "drop --arrival closed"),
        (["--arrival", "poisson", "--rate", "0"], "--rate must be a number"),
        (["--arrival", "poisson", "--rate", "1", "--load", "0.5"], "not both"),
        (["--arrival", "open"], "invalid choice"),
    ]:
        with pytest.raises(SystemExit) as stop:
            scale.arguments(wrong)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err


def test_the_open_loop_keeps_its_schedule_and_sees_a_system_fall_behind():
    """Six requests arriving within 6 ms, one in flight at a time, on the real model: the
    driver holds five at the bound, counts their TTFT from their arrival (so the held ones
    wait on the clock), and a server that cannot complete 1000 requests/s is flagged."""
    engine = AsyncLLM(engine=make_cpu_engine())
    front = BackgroundServer(build_state(engine, None, ServerSettings(), apps={}))
    try:
        prompts = [f"Question {i}: what is a list in Python?" for i in range(6)]
        arrivals = scale.poisson_arrivals(len(prompts), 1000.0)
        ttfts, prompt_tokens, cached, wall, by_id, schedule = asyncio.run(
            scale.drive_open(front.url, engine.model_name, prompts, arrivals, 2, bound=1)
        )
    finally:
        front.stop()
    assert len(ttfts) == len(by_id) == 6 and all(t > 0 for t in ttfts)
    assert prompt_tokens > 6 * 8 and 0 <= cached <= prompt_tokens
    assert schedule["max_in_flight"] == 1
    assert schedule["held"] >= 1
    # TTFTs are in completion order. The last to finish arrived within 6 ms of the first
    # but waited, on the clock, for the five before it: timed from its send instead, its
    # TTFT would be one prefill, about a sixth of the run.
    assert ttfts[-1] > 0.5 * wall
    assert wall >= max(ttfts)
    assert schedule["drain_s"] == pytest.approx(wall - arrivals[-1], abs=1e-3)
    pooled = scale.open_loop([schedule], len(ttfts) / wall)
    assert pooled["behind"] is True
    assert pooled["completed_of_offered"] < scale.BEHIND
