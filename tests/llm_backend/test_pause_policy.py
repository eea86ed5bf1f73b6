"""The min-waste rule on scripted cases: the choice is the one the formula predicts, from the
tool's own history and the given costs."""

from __future__ import annotations

import pytest

from covey.llm_backend.pause_policy import (
    PRIOR_TOOL_SECONDS,
    PauseCosts,
    PausePolicy,
    ToolTimes,
)

MB = 1 << 20
# Round numbers: recompute 1 ms/token; copies 1 ms fixed + 1 ms/MB each way.
COSTS = PauseCosts(
    recompute_per_token_s=1e-3,
    swap_out_fixed_s=1e-3,
    swap_out_per_byte_s=1e-3 / MB,
    swap_in_fixed_s=1e-3,
    swap_in_per_byte_s=1e-3 / MB,
)


def test_remaining_time_is_the_mean_residual_of_the_tools_own_history():
    times = ToolTimes()
    for seconds in (1.0, 2.0, 6.0):
        times.record("search", seconds)
    times.record("calculator", 0.001)
    assert times.remaining("search", 0.0) == pytest.approx(3.0)
    assert times.remaining("search", 1.5) == pytest.approx(((2 - 1.5) + (6 - 1.5)) / 2)
    assert times.remaining("search", 10.0) == pytest.approx(10.0)  # outlived all: as long again
    assert times.remaining("calculator", 0.0) == pytest.approx(0.001)
    pooled = (1 + 2 + 6 + 0.001) / 4
    assert times.remaining("never-seen", 0.0) == pytest.approx(pooled)
    assert times.estimates()["search"] == pytest.approx(3.0)
    assert ToolTimes().remaining("x", 0.25) == pytest.approx(PRIOR_TOOL_SECONDS - 0.25)


def test_history_keeps_only_the_latest_pauses():
    times = ToolTimes(history=2)
    for seconds in (100.0, 1.0, 3.0):
        times.record("t", seconds)
    assert times.remaining("t", 0.0) == pytest.approx(2.0)


def test_waste_terms_follow_the_formula():
    policy = PausePolicy("adaptive", COSTS)
    policy.times.record("search", 2.0)
    w = policy.waste(4 * MB, 1000, 6 * MB, "search", 0.5)
    copy = 2e-3 + 2e-3 * 4  # fixed out + in, 4 MB each way
    assert w.remaining_s == pytest.approx(1.5)
    assert w.preserve == pytest.approx(4 * MB * 1.5)
    assert w.discard == pytest.approx(1.0 * (4 + 6) * MB)
    assert w.swap == pytest.approx(copy * 4 * MB + copy * 6 * MB)


@pytest.mark.parametrize(
    ("tool_s", "costs", "expected"),
    [
        (0.001, COSTS, "preserve"),  # a calculator: back before anything could move
        (30.0, COSTS, "swap"),  # an image model: copies are cheap next to 30 s
        # copies 10x dearer than a 1000-token recompute: recompute on resume instead
        (
            30.0,
            PauseCosts(1e-5, 0.1, 1e-1 / MB, 0.1, 1e-1 / MB),
            "discard",
        ),
    ],
)
def test_the_choice_is_the_least_waste(tool_s, costs, expected):
    policy = PausePolicy("adaptive", costs)
    policy.times.record("tool", tool_s)
    w = policy.waste(4 * MB, 1000, 6 * MB, "tool", 0.0)
    assert w.best == expected
    assert policy.decide(4 * MB, 1000, 6 * MB, "tool", 0.0) == expected
    terms = {"preserve": w.preserve, "swap": w.swap, "discard": w.discard}
    assert terms[expected] == min(terms.values())


def test_a_pause_that_outlives_its_history_is_moved_out():
    policy = PausePolicy("adaptive", COSTS)
    policy.times.record("search", 0.02)
    assert policy.decide(4 * MB, 1000, 6 * MB, "search", 0.0) == "preserve"
    assert policy.decide(4 * MB, 1000, 6 * MB, "search", 5.0) == "swap"


def test_without_swap_the_choice_is_between_preserve_and_discard():
    policy = PausePolicy("adaptive", COSTS)
    policy.times.record("tool", 30.0)
    assert policy.waste(4 * MB, 1000, 6 * MB, "tool", 0.0, can_swap=False).swap is None
    assert policy.decide(4 * MB, 1000, 6 * MB, "tool", 0.0, can_swap=False) == "discard"


def test_fixed_policies_answer_their_action():
    for mode in ("preserve", "swap", "discard"):
        assert PausePolicy(mode, None).decide(MB, 10, 0, "t", 0.0) == mode
    assert PausePolicy("swap", None).decide(MB, 10, 0, "t", 0.0, can_swap=False) == "discard"
    with pytest.raises(ValueError, match="needs measured costs"):
        PausePolicy("adaptive", None)
