"""Engine behaviour on the real embedded model: batching, prefix cache, pool limits, abort."""

from __future__ import annotations

import pytest

from covey.errors import InvalidRequestError
from covey.llm_backend.llm_engine import LLMEngine
from covey.llm_backend.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
PROMPTS = [
    "The three primary colors are",
    "Python is a programming language that",
    "The quick brown fox",
    "To make a cup of tea, first",
]


def run(engine: LLMEngine, prompts, params=GREEDY, **kw) -> list:
    rids = [engine.add_request(p, params, **kw) for p in prompts]
    return engine.run_to_completion(rids)


def test_batched_generation_equals_one_at_a_time(make_engine):
    engine = make_engine()
    batched = [o.token_ids for o in run(engine, PROMPTS)]
    single = [run(make_engine(enable_prefix_caching=False), [p])[0].token_ids for p in PROMPTS]
    assert batched == single


def test_prefix_cache_hits_give_identical_output(make_engine):
    system = "You are a careful assistant who answers questions about geography. " * 6
    prompts = [system + q for q in ("Where is Lima?", "Where is Oslo?")]
    cold = [o.token_ids for o in run(make_engine(enable_prefix_caching=False), prompts)]
    engine = make_engine()
    first = run(engine, prompts[:1])[0]
    warm = run(engine, prompts)
    assert [o.token_ids for o in warm] == cold
    assert first.metrics.num_cached_tokens == 0
    assert all(o.metrics.num_cached_tokens >= 48 for o in warm)
    assert engine.block_manager.stats.hit_tokens > 0


def test_chunked_prefill_equals_one_shot_prefill(make_engine):
    prompt = "Once upon a time, in a small village by the sea, there lived an old fisherman. " * 4
    whole = run(make_engine(), [prompt])[0].token_ids
    chunked = run(make_engine(max_num_batched_tokens=16), [prompt])[0].token_ids
    assert chunked == whole


def test_pool_exhaustion_queues_and_preempts_instead_of_crashing(make_engine):
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    roomy = [o.token_ids for o in run(make_engine(), PROMPTS, params)]
    engine = make_engine(kv_cache_tokens=32, block_size=8)  # 4 blocks; each request needs 3
    tight = run(engine, PROMPTS, params)
    assert [o.token_ids for o in tight] == roomy
    assert any(o.metrics.num_preemptions > 0 for o in tight)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_abort_frees_blocks_at_once(make_engine):
    engine = make_engine(enable_prefix_caching=False)
    baseline = engine.block_manager.num_free_blocks
    rids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < baseline
    for rid in rids:
        out = engine.abort_request(rid)
        assert out is not None and out.finished and out.finish_reason == "abort"
    assert engine.block_manager.num_free_blocks == baseline
    assert not engine.has_unfinished_requests()
    assert engine.abort_request(rids[0]) is None


def test_stop_strings_stop_token_ids_and_max_tokens(make_engine):
    engine = make_engine()
    free = run(engine, ["1, 2, 3, 4, 5,"], SamplingParams(max_tokens=16))[0]
    assert " 8" in free.text
    cut = run(engine, ["1, 2, 3, 4, 5,"], SamplingParams(max_tokens=16, stop=(" 8",)))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index(" 8")]
    stop_id = free.token_ids[2]
    by_id = run(
        engine, ["1, 2, 3, 4, 5,"], SamplingParams(max_tokens=16, stop_token_ids=(stop_id,))
    )[0]
    assert by_id.token_ids == free.token_ids[:3] and by_id.finish_reason == "stop"
    short = run(engine, ["1, 2, 3, 4, 5,"], SamplingParams(max_tokens=3))[0]
    assert len(short.token_ids) == 3 and short.finish_reason == "length"


@pytest.mark.parametrize("include", [False, True])
def test_streamed_deltas_add_up_when_a_stop_string_spans_tokens(make_engine, include):
    engine = make_engine()
    free = run(engine, ["1, 2, 3, 4, 5,"], SamplingParams(max_tokens=16))[0].text
    stop = ", 8,"  # several tokens: it arrives across steps
    assert stop in free
    params = SamplingParams(max_tokens=16, stop=(stop,), include_stop_str_in_output=include)
    rid = engine.add_request("1, 2, 3, 4, 5,", params)
    deltas = []
    (last,) = engine.run_to_completion([rid], on_output=lambda out: deltas.append(out.delta_text))
    expected = free[: free.index(stop) + (len(stop) if include else 0)]
    assert last.request_id == rid and last.finish_reason == "stop"
    assert last.text == expected and "".join(deltas) == expected


def test_seeded_sampling_is_reproducible(make_engine):
    engine = make_engine()
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    a, b = run(engine, ["My favourite animal is", "My favourite animal is"], p)
    assert a.token_ids == b.token_ids
    alone = run(make_engine(enable_prefix_caching=False), ["My favourite animal is"], p)[0]
    assert alone.token_ids == a.token_ids
    others = run(
        engine,
        ["My favourite animal is"] * 3,
        SamplingParams(max_tokens=12, temperature=1.0, seed=8),
    )
    assert any(o.token_ids != a.token_ids for o in others)


def test_pause_and_resume_keep_the_context(make_engine):
    engine = make_engine()
    rid = engine.add_request(
        "The weather tool says:", SamplingParams(max_tokens=8, ignore_eos=True)
    )
    engine.step()
    engine.pause_request(rid)
    assert not engine.has_unfinished_requests()
    seq = engine.requests[rid]
    held = list(seq.block_table)
    assert held
    tool = SamplingParams(max_tokens=6, ignore_eos=True)
    engine.resume_request(rid, " sunny, 24 degrees. So today", tool)
    (resumed,) = engine.run_to_completion([rid])
    assert resumed.finished
    full_prompt = seq.token_ids[: seq.num_prompt_tokens]
    assert engine.tokenizer.decode(full_prompt).endswith(" sunny, 24 degrees. So today")
    fresh = run(make_engine(enable_prefix_caching=False), [full_prompt], tool)[0]
    assert resumed.token_ids == fresh.token_ids and len(fresh.token_ids) == 6
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_resume_is_checked_like_a_new_request(make_engine):
    engine = make_engine(kv_cache_tokens=64)
    rid = engine.add_request("A tool call follows:", SamplingParams(max_tokens=4))
    engine.step()
    engine.pause_request(rid)
    with pytest.raises(InvalidRequestError, match="pool holds 64"):
        engine.resume_request(rid, " result", SamplingParams(max_tokens=60))
    with pytest.raises(InvalidRequestError, match="unknown or finished request 'nope'"):
        engine.resume_request("nope", " result")
    engine.resume_request(rid, " result", SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match="is not paused"):
        engine.resume_request(rid, " again")
    engine.pause_request(rid)  # paused again before it ran: fine
    engine.abort_request(rid)
    with pytest.raises(InvalidRequestError, match="unknown or finished request"):
        engine.pause_request(rid)


def test_kv_blocks_export_and_import_round_trip(make_engine):
    engine = make_engine()
    rid = engine.add_request("Paging keeps memory tidy. " * 4, GREEDY)
    engine.step()
    blocks = list(engine.requests[rid].block_table)
    saved = engine.pool.export_blocks(blocks)
    engine.pool.kv.zero_()
    engine.pool.import_blocks(blocks, saved)
    assert (engine.pool.export_blocks(blocks) == saved).all()
    with pytest.raises(ValueError, match="KV data has shape"):
        engine.pool.import_blocks(blocks[:1], saved)
    engine.abort_request(rid)


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ("", GREEDY, "the prompt is empty"),
        ("word " * 9000, GREEDY, "context window"),
        ([10**9], GREEDY, "token ids must be in"),
        ([1.5], GREEDY, "the prompt: each token id must be an integer, got 1.5"),
        (b"bytes", GREEDY, "a prompt is a str"),
    ],
)
def test_bad_requests_raise_clear_errors(make_engine, prompt, params, message):
    engine = make_engine()
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request(prompt, params)
    assert not engine.has_unfinished_requests()


def test_request_larger_than_the_pool_is_rejected(make_engine):
    engine = make_engine(kv_cache_tokens=256)
    with pytest.raises(InvalidRequestError, match="pool holds 256"):
        engine.add_request("hi " * 100, SamplingParams(max_tokens=200))


def test_duplicate_request_id_is_rejected(make_engine):
    engine = make_engine()
    engine.add_request("hi", GREEDY, request_id="same")
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("hi", GREEDY, request_id="same")
    engine.abort_request("same")
