"""Constrained choice: the output is exactly one of the given strings."""

from __future__ import annotations

import pytest
import torch

from covey.errors import InvalidRequestError
from covey.llm_backend.choices import ChoiceTrie
from covey.llm_backend.sampling_params import SamplingParams

from .test_engine import run

WORDS = {"red": [1, 2], "redder": [1, 2, 3], "blue": [4]}


def trie(eos: int | None = 9) -> ChoiceTrie:
    return ChoiceTrie(list(WORDS), lambda s: WORDS[s], eos)


def test_trie_allows_only_continuations_and_eos_after_a_complete_prefix_choice():
    t = trie()
    assert sorted(t.allowed([])) == [1, 4]
    assert t.allowed([1, 2]) == [3, 9]
    assert t.allowed([7]) == []
    assert t.finished_choice([4]) == "blue"
    assert t.finished_choice([1, 2]) is None  # "redder" may still come
    assert t.finished_choice([1, 2, 9]) == "red"
    assert t.finished_choice([1, 2, 3]) == "redder"
    logits = torch.zeros(10)
    t.mask(logits, [1])
    assert torch.isfinite(logits).nonzero().flatten().tolist() == [2]


def test_trie_refuses_choices_it_cannot_tell_apart():
    with pytest.raises(InvalidRequestError, match="EOS"):
        trie(eos=None)
    with pytest.raises(InvalidRequestError, match="tokenize the same"):
        ChoiceTrie(["a", "b"], lambda s: [5], 9)


def test_sampling_params_validate_choices():
    with pytest.raises(InvalidRequestError, match="not one string"):
        SamplingParams(choices="yes")
    with pytest.raises(InvalidRequestError, match="differ"):
        SamplingParams(choices=["yes", "yes"])
    with pytest.raises(InvalidRequestError, match="non-empty"):
        SamplingParams(choices=["yes", ""])


def test_engine_output_is_exactly_one_choice(make_engine):
    engine = make_engine()
    choices = (" Paris", " London", " Berlin", " Madrid and Lisbon")
    prompts = [
        "Q: What is the capital of France?\nA:",
        "Q: What is the capital of the United Kingdom?\nA:",
        "Q: What is the capital of Germany?\nA:",
    ]
    outs = run(engine, prompts, SamplingParams(max_tokens=1, choices=choices))
    assert [o.text for o in outs] == [" Paris", " London", " Berlin"]
    assert all(o.finish_reason == "stop" for o in outs)
    sampled = run(
        engine, prompts, SamplingParams(max_tokens=1, temperature=1.5, seed=3, choices=choices)
    )
    assert all(o.text in choices for o in sampled)


def test_choices_past_the_context_window_or_without_a_tokenizer_are_refused(
    make_engine, monkeypatch
):
    engine = make_engine(max_model_len=32)
    prompt = list(range(100, 129))  # 29 tokens: a 3-token window is left
    with pytest.raises(InvalidRequestError, match="choices need up to"):
        engine.add_request(prompt, SamplingParams(choices=("a long answer of many words", "b")))
    from covey.errors import ModelLoadError
    from covey.llm_backend import llm_engine
    from covey.llm_backend.config import EngineConfig

    def no_tokenizer(source):  # dummy weights without the embedded package have none
        raise ModelLoadError("no embedded package")

    monkeypatch.setattr(llm_engine, "load_tokenizer", no_tokenizer)
    bare = llm_engine.LLMEngine(EngineConfig(model="dummy:tiny", device="cpu", kv_cache_tokens=256))
    assert bare.tokenizer is None
    with pytest.raises(InvalidRequestError, match="no tokenizer"):
        bare.add_request([1, 2, 3], SamplingParams(choices=("yes", "no")))


def test_a_choice_streams_whole_once_complete(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=1, choices=(" Paris", " Pariser Platz and more"))
    rid = engine.add_request("Q: What is the capital of France?\nA:", params)
    deltas = []
    (final,) = engine.run_to_completion([rid], on_output=lambda out: deltas.append(out.delta_text))
    assert "".join(deltas) == final.text in params.choices
    assert all(d == "" for d in deltas[:-1])
