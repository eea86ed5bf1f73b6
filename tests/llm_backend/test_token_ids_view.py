"""`RequestOutput.token_ids` is a window over the sequence's ids, not a copy per step."""

from __future__ import annotations

import pytest

from covey.llm_backend.outputs import TokenIds
from covey.llm_backend.sampling_params import SamplingParams


def test_window_reads_like_the_list_it_was_when_made():
    ids = [10, 11, 12, 13, 14]
    view = TokenIds(ids, 2)
    ids.append(15)  # a later step appends: this step's output must not change
    assert view == [12, 13, 14] and [12, 13, 14] == view and view == (12, 13, 14)
    assert view != [12, 13, 14, 15] and view != [12, 13]
    assert len(view) == 3 and list(view) == [12, 13, 14]
    assert view[0] == 12 and view[-1] == 14 and view[1:] == [13, 14]
    assert repr(view) == "[12, 13, 14]" and view == TokenIds(ids, 2, 5)
    with pytest.raises(IndexError):
        view[3]
    with pytest.raises(TypeError):
        hash(view)


def test_each_step_output_keeps_its_own_ids(make_engine):
    engine = make_engine()
    rid = engine.add_request("The capital of France is", SamplingParams(max_tokens=5))
    seen = []
    final = engine.run_to_completion([rid], on_output=seen.append)[0]
    assert all(isinstance(o.token_ids, TokenIds) for o in seen)
    deltas: list[int] = []
    for out in seen:  # read after the run: each still holds the ids of its own step
        deltas += out.delta_token_ids
        assert out.token_ids == deltas
    assert final.token_ids == deltas and len(deltas) >= 1


def test_a_window_pickles_as_its_own_ids_only():
    import pickle

    prompt_and_output = list(range(10_000))
    window = TokenIds(prompt_and_output, 9_990)
    copy = pickle.loads(pickle.dumps(window))
    assert copy == list(range(9_990, 10_000)) and len(copy) == 10
    assert len(pickle.dumps(window)) < 200
