"""SamplingParams checks every field where the request is made, naming the field."""

from __future__ import annotations

import numpy as np
import pytest

from covey.errors import InvalidRequestError
from covey.llm_backend.sampling_params import GREEDY_TEMPERATURE, SamplingParams
from covey.llm_backend.segments import Segment


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be a positive integer, got 0"),
        ({"max_tokens": 2.0}, "max_tokens must be a positive integer, got 2.0"),
        ({"max_tokens": True}, "max_tokens must be a positive integer, got True"),
        ({"temperature": float("nan")}, "temperature must be a finite number, got nan"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"temperature": "0.5"}, "temperature must be a number, got '0.5'"),
        ({"temperature": False}, "temperature must be a number, got False"),
        ({"temperature": -1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": float("nan")}, "top_p must be a finite number"),
        ({"top_p": None}, "top_p must be a number, got None"),
        ({"top_k": 1.5}, "top_k must be an integer, got 1.5"),
        ({"top_k": -1}, r"top_k must be >= 0 \(0 disables it\)"),
        ({"seed": "abc"}, "seed must be an integer, got 'abc'"),
        ({"seed": 2**64}, "seed must be an integer in"),
        ({"stop": [1]}, "stop must hold only non-empty strings, got 1"),
        ({"stop": [""]}, "stop must hold only non-empty strings"),
        ({"stop": 5}, "stop must be a list of strings, got 5"),
        ({"stop_token_ids": [-1]}, "stop_token_ids: each token id must be >= 0, got -1"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids: each token id must be an integer, got 'a'"),
        ({"stop_token_ids": 3}, "stop_token_ids must be a list of token ids"),
        ({"ignore_eos": "yes"}, "ignore_eos must be True or False"),
        ({"include_stop_str_in_output": 1}, "include_stop_str_in_output must be True or False"),
        ({"choices": "yes"}, "not one string"),
        ({"choices": ["a", None]}, "choices must hold only non-empty strings, got None"),
        ({"choices": ["a", "a"]}, "choices must differ"),
    ],
)
def test_bad_fields_are_refused_by_name(fields, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**fields)


def test_numpy_numbers_and_lists_are_normalised():
    p = SamplingParams(
        max_tokens=np.int64(5),
        temperature=np.float32(0.5),
        top_k=np.int32(3),
        seed=np.int64(7),
        stop=["x", "y"],
        stop_token_ids=[np.int64(2)],
        choices=["a", "b"],
    )
    assert (p.max_tokens, p.top_k, p.seed, p.stop_token_ids) == (5, 3, 7, (2,))
    assert all(type(v) is int for v in (p.max_tokens, p.top_k, p.seed, *p.stop_token_ids))
    assert type(p.temperature) is float and p.temperature == 0.5
    assert p.stop == ("x", "y") and p.choices == ("a", "b")
    assert SamplingParams(stop="x").stop == ("x",)
    hash(p)


def test_temperatures_below_the_epsilon_are_greedy():
    assert SamplingParams(temperature=1e-45).greedy
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE).greedy


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"token_ids": [-1]}, "Segment.token_ids: each token id must be >= 0"),
        ({"token_ids": [1.5]}, "Segment.token_ids: each token id must be an integer"),
        ({"token_ids": "12"}, "Segment.token_ids must be a list of token ids"),
        ({"text": 5}, "Segment.text must be a str"),
        ({"text": "a", "chunk_id": 3}, "Segment.chunk_id must be a str"),
    ],
)
def test_bad_segments_are_refused_by_name(fields, message):
    with pytest.raises(InvalidRequestError, match=message):
        Segment(**fields)
