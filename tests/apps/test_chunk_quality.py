"""What blended chunk reuse costs in answer quality, on the planted-facts set (real model).

Each of 10 questions reads 5 of 15 chunks (~100 tokens each) in a random order and asks for
a made-up fact planted in one of them. The blend engine first reads the chunks in three
prompts of five, in order, so every chunk it reuses was computed at other positions after
other chunks (KV taken from an earlier request's prefill); the full-prefill engine reuses
nothing. Blend must stay within one question (0.1) of full prefill here; kept small for
speed (each question prefills ~500 tokens twice; with 20 it was the slowest test of
tests/apps), so benchmarks/rag_kv.py measures the full figure (256-token chunks, Zipf
popularity, both KV sources) against the 0.02 target.
"""

from __future__ import annotations

import sys
from pathlib import Path

from covey.llm_backend.config import EngineConfig
from covey.llm_backend.sampling_params import SamplingParams
from tests.runtime.conftest import make_cpu_engine

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import planted_facts as pf  # noqa: E402

MARGIN = 0.1  # one question in 10
PARAMS = SamplingParams(max_tokens=6, temperature=0.0)


def answer(engine, questions):
    ids = [engine.add_request(pf.prompt(engine.tokenizer, q), PARAMS) for q in questions]
    return engine.run_to_completion(ids)


def test_blend_at_the_default_ratio_stays_close_to_full_prefill():
    chunks = pf.make_chunks(15, chars=400)
    questions = pf.make_questions(chunks, 10, seed=3)
    full = answer(make_cpu_engine(chunk_cache="off", enable_prefix_caching=False), questions)
    ratio = EngineConfig().blend_recompute_ratio
    blend = make_cpu_engine(chunk_cache="blend", blend_recompute_ratio=ratio)
    first_reads = [pf.Question(tuple(chunks[i : i + 5]), 0) for i in range(0, 15, 5)]
    answer(blend, first_reads)
    reused = answer(blend, questions)
    full_acc = pf.accuracy([o.text for o in full], questions)
    blend_acc = pf.accuracy([o.text for o in reused], questions)
    assert full_acc >= 0.5, [o.text for o in full]  # the set is answerable at all
    assert blend_acc >= full_acc - MARGIN, (full_acc, blend_acc)
    assert sum(o.metrics.num_reused_tokens for o in reused) > 0
    assert sum(o.metrics.num_recomputed_tokens for o in reused) > 0  # it did blend


def test_answer_score_is_the_right_codes_log_probability_among_the_prompts_codes():
    """The continuous quality figure of benchmarks/rag_kv.py --score: options are the
    prompt's codes (the asked-for one first, no repeats); the share is a log-softmax over
    them and `best` says whether the right code is the likeliest."""
    import math

    chunks = pf.make_chunks(5, chars=200)
    question = pf.make_questions(chunks, 1, seed=1)[0]
    options = pf.options(question)
    assert options[0] == " " + question.fact.code
    assert sorted(options) == sorted({" " + c.fact.code for c in question.chunks})
    logprobs = {o: -2.0 - i for i, o in enumerate(options)}
    score = pf.answer_score(logprobs, question)
    total = math.log(sum(math.exp(v) for v in logprobs.values()))
    assert score.logprob == -2.0
    assert math.isclose(score.share, -2.0 - total)
    assert score.best
    logprobs[options[-1]] = -1.0  # another code is now likelier
    worse = pf.answer_score(logprobs, question)
    assert not worse.best and worse.share < score.share
