"""What a blend step is charged against the token budget: its own tokens, the reused ones it
recomputes, and the check layers' share of the reused ones only when blend_forward runs the
check (it chooses some rows, not none and not all). No model: a plan made by hand."""

from __future__ import annotations

import math

import pytest
import torch

from covey.cache.chunk_kv import ROOT_HASH, ChunkKV
from covey.cache.chunk_store import ChunkStore
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


@pytest.mark.parametrize(
    ("scores", "sinks", "by_stored"),
    [
        (None, 0, False),  # never blended: the check runs
        ([1.0] * 32, 0, True),  # every row scored: no check
        ([float("nan")] * 4 + [1.0] * 28, 4, True),  # only the sink rows lack scores
        ([float("nan")] * 4 + [1.0] * 28, 0, False),  # a chosen-by-score row lacks one
    ],
)
def test_a_blend_by_stored_scores_is_not_charged_the_check_layers(scores, sinks, by_stored):
    store = ChunkStore(1 << 20, float)  # asked whether the scores are due a refresh
    planner = ChunkPlanner(store, "blend", 0.25, CHECK, LAYERS, sinks, stored_scores=True)
    kv = torch.zeros(1, 2, 1, 32, 2)
    tensor = None if scores is None else torch.tensor(scores, dtype=torch.float16)
    entry = ChunkKV("c", tuple(range(32)), kv, 0, ROOT_HASH, tensor)
    seq = Sequence("r", list(range(48)), SamplingParams(max_tokens=1))
    chunk = KVImport(8, 40, entry, offset=0, delta=3)
    seq.chunk_plan = ChunkPlan([Piece(0, 48, "blend", (chunk,))], [], 0)
    step = planner.take(seq, budget=1000, alone=True)
    assert step.by_stored == by_stored and step.checked == (not by_stored)
    check = 0 if by_stored else math.ceil((max(CHECK) + 1) / LAYERS * 32)
    assert step.cost == 16 + sinks + math.ceil(0.25 * (32 - sinks)) + check
