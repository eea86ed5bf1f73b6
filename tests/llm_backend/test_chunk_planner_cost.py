"""What a blend step is charged against the token budget: its own tokens, the reused ones it
recomputes, and the check layers' share of the reused ones only when blend_forward runs the
check (it chooses some rows, not none and not all). No model: a plan made by hand."""

from __future__ import annotations

import math

import pytest

from covey.llm_backend.chunk_planner import ChunkPlan, ChunkPlanner, KVImport, Piece
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.sequence import Sequence

LAYERS, CHECK = 30, (1,)


def _blend_cost(ratio: float, sinks: int) -> int:
    planner = ChunkPlanner(None, "blend", ratio, CHECK, LAYERS, sink_tokens=sinks)
    seq = Sequence("r", list(range(48)), SamplingParams(max_tokens=1))
    # Tokens 0-8 own, 8-40 one reused chunk (from its head), 40-48 own.
    chunk = KVImport(8, 40, None, offset=0, delta=3)
    seq.chunk_plan = ChunkPlan([Piece(0, 48, "blend", (chunk,))], [], 0)
    step = planner.take(seq, budget=1000, alone=True)
    assert step is not None and step.blend is not None
    return step.cost


@pytest.mark.parametrize(
    ("ratio", "sinks", "recomputed", "checked"),
    [
        (0.25, 0, 8, True),  # chooses 8 of 32: the check runs
        (1.0, 0, 32, False),  # every row: nothing to choose, no check
        (0.0, 4, 4, False),  # sinks only (ratio 0): no check
        (0.5, 32, 32, False),  # the sinks cover every reused row
        (0.25, 4, 4 + 7, True),  # 7 chosen of the 28 beyond the sinks
    ],
)
def test_blend_charges_the_check_layers_only_when_they_run(ratio, sinks, recomputed, checked):
    check = math.ceil((max(CHECK) + 1) / LAYERS * 32) if checked else 0
    assert _blend_cost(ratio, sinks) == 16 + recomputed + check
