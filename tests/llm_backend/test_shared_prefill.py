"""Prefill-only requests, pinned prefixes, and requests sent together sharing one prefill."""

from __future__ import annotations

import pytest

from covey.errors import InvalidRequestError
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.sequence import Sequence

from .test_engine import run

SYSTEM = "You are a careful assistant who answers questions about the geography of Europe. " * 4
QUESTIONS = ["Where is Lima?", "Where is Oslo?", "Where is Rome?"]
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


def prefill(engine, prompt, **kw):
    """Prefill `prompt` (pinned if asked) and step until done: its final output, or None
    when there was nothing to compute."""
    rid = engine.add_prefill(prompt, **kw)
    return None if rid is None else engine.run_to_completion([rid])[0]


def test_prefill_only_caches_whole_blocks_and_generates_nothing(make_engine):
    engine = make_engine(block_size=16)
    out = prefill(engine, SYSTEM)
    assert out.finished and out.finish_reason == "prefilled" and out.token_ids == []
    n = len(engine.tokenize(SYSTEM)[0]) // 16 * 16
    assert out.metrics.num_prompt_tokens == n
    assert engine.add_prefill(SYSTEM) is None  # already cached: nothing to compute
    cold = run(make_engine(enable_prefix_caching=False), [SYSTEM + QUESTIONS[0]], GREEDY)[0]
    warm = run(engine, [SYSTEM + QUESTIONS[0]], GREEDY)[0]
    assert warm.token_ids == cold.token_ids
    assert warm.metrics.num_cached_tokens == n


def test_pinned_prefix_survives_eviction_until_unpinned(make_engine):
    engine = make_engine(kv_cache_tokens=256, block_size=16)
    prefill(engine, SYSTEM, pin="system")
    held = engine.pinned["system"]
    assert held > 0
    # Each filler takes ~7 of the 16 blocks (a long prompt, a few tokens: prefill is cheap,
    # decode steps are not): four of them evict the idle cached blocks.
    filler = SamplingParams(max_tokens=8, ignore_eos=True)
    for i in range(4):
        run(engine, [f"Count slowly from {i} to one hundred, " * 11], filler)
    hit = run(engine, [SYSTEM + QUESTIONS[1]], GREEDY)[0]
    assert hit.metrics.num_cached_tokens == held
    assert engine.unpin("system") and not engine.unpin("system")
    assert engine.pinned == {}
    for i in range(4):  # the same pressure without the pin: the prefix is evicted
        run(engine, [f"Count slowly from {i + 10} to one hundred, " * 11], filler)
    assert run(engine, [SYSTEM + QUESTIONS[2]], GREEDY)[0].metrics.num_cached_tokens == 0


def test_pins_never_take_more_than_their_share_of_the_pool(make_engine):
    engine = make_engine(kv_cache_tokens=512, block_size=16)  # 32 blocks: pins get 8
    texts = [
        f"Rule set {i}: " + "always answer briefly and cite the source. " * 6 for i in range(3)
    ]
    for i, text in enumerate(texts):
        prefill(engine, text, pin=f"p{i}")
    assert sum(engine.pinned.values()) <= 8 * 16
    assert len(engine.pinned) < 3  # the pin past the share was refused; its KV stays cached


def test_pins_yield_to_a_request_that_needs_their_room(make_engine):
    engine = make_engine(kv_cache_tokens=256, block_size=16)  # 16 blocks: pins get 4
    prefill(engine, SYSTEM, pin="system")
    assert engine.block_manager.num_pinned_blocks == 3
    # Most of the pool in the prompt (prefill is cheap, decode steps are not), the rest
    # generated: the request needs the whole pool, so the pin must go.
    prompt = "Tell me a story about a lighthouse keeper and the sea. " * 16
    n = 256 - len(engine.tokenize(prompt)[0])
    assert 16 <= n <= 64
    story = SamplingParams(max_tokens=n, ignore_eos=True)
    (out,) = run(engine, [prompt], story)
    assert out.finish_reason == "length" and len(out.token_ids) == n
    assert engine.pinned == {} and engine.block_manager.num_pinned_blocks == 0
    fresh = run(make_engine(kv_cache_tokens=256, block_size=16), [prompt], story)
    assert out.token_ids == fresh[0].token_ids


def test_prefill_errors_are_clear(make_engine):
    engine = make_engine(kv_cache_tokens=64, block_size=16)
    with pytest.raises(InvalidRequestError, match="needs KV for"):
        engine.add_prefill(SYSTEM * 3)  # ~200 tokens, a 64-token pool
    roomy = make_engine(block_size=16)
    roomy.add_prefill(SYSTEM, request_id="x")
    with pytest.raises(InvalidRequestError, match="already in use"):
        roomy.add_prefill(SYSTEM + " More.", request_id="x")


def test_requests_sent_together_prefill_their_common_prefix_once(make_engine):
    prompts = [SYSTEM + q for q in QUESTIONS]
    cold = [o.token_ids for o in run(make_engine(enable_prefix_caching=False), prompts, GREEDY)]
    engine = make_engine(block_size=16)
    outs = run(engine, prompts, GREEDY)
    assert [o.token_ids for o in outs] == cold
    shared = len(engine.tokenize(SYSTEM)[0]) // 16 * 16
    assert outs[0].metrics.num_cached_tokens == 0
    assert all(o.metrics.num_cached_tokens >= shared - 16 for o in outs[1:])


def test_asking_for_a_held_pin_again_makes_it_the_last_to_yield(make_engine):
    engine = make_engine(block_size=16)
    prefill(engine, SYSTEM, pin="system")
    prefill(engine, "Tools: search, calculator. " * 8, pin="tools")
    assert list(engine.pinned) == ["system", "tools"]
    assert engine.add_prefill(SYSTEM, pin="system") is None  # held: nothing to compute
    assert list(engine.pinned) == ["tools", "system"]


def test_prefill_needs_the_prefix_cache(make_engine):
    with pytest.raises(InvalidRequestError, match="enable_prefix_caching"):
        make_engine(enable_prefix_caching=False).add_prefill(SYSTEM)


def document(engine, n: int, seed: int) -> list[int]:
    text = f"Document {seed}: " + "the quick brown fox jumps over the lazy dog " * 200
    return engine.tokenizer.encode(text)[:n]


def test_a_pin_never_wedges_a_request_the_engine_accepted(make_engine):
    engine = make_engine(kv_cache_tokens=1024, block_size=16)  # 64 blocks, pins up to 16
    a = engine.add_request(document(engine, 750, 1), SamplingParams(max_tokens=30))
    b = engine.add_request(document(engine, 900, 2), GREEDY, priority=-1)
    p = engine.add_prefill(document(engine, 256, 3), pin="sys")
    finals = dict(zip([a, b, p], engine.run_to_completion([a, b, p])))
    # p is computed and pinned beside a (47 + 16 blocks), but a grows to 780 tokens (49
    # blocks): the pin must yield its 16 blocks, or a could never be scheduled again
    assert [finals[r].finish_reason for r in (a, b, p)] == ["length", "length", "prefilled"]
    assert engine.pinned == {}  # it yielded: its blocks became idle, evictable
    assert prefill(engine, document(engine, 256, 3), pin="sys")  # a's growth evicted some
    assert engine.pinned == {"sys": 256}  # nothing else needs the room now
    assert engine.block_manager.num_pinned_blocks == 16


def test_a_request_that_cannot_be_scheduled_fails_alone(make_engine):
    """The last resort, for a pool the scheduler's bookkeeping cannot explain."""
    engine = make_engine(kv_cache_tokens=1024, block_size=16)
    big = engine.add_request(document(engine, 800, 1), SamplingParams(max_tokens=4))
    leak = Sequence("leak", document(engine, 256, 3), GREEDY)
    engine.block_manager.allocate_slots(leak, 256)  # 16 blocks held outside the scheduler
    small = engine.add_request("A short one.", GREEDY)
    finals = dict(zip([big, small], engine.run_to_completion([big, small])))
    assert finals[big].finish_reason == "error"
    assert "cannot be scheduled: the KV pool (64 blocks, 0 pinned)" in finals[big].error
    assert finals[small].finish_reason == "length" and len(finals[small].token_ids) == 8


def test_stats_count_each_block_once(make_engine):
    engine = make_engine(kv_cache_tokens=512, block_size=16)
    prefill(engine, SYSTEM, pin="system")
    pinned = engine.block_manager.num_pinned_blocks
    rid = engine.add_request(SYSTEM + QUESTIONS[0], GREEDY)  # reads the pinned blocks
    engine.step()
    seq = engine.requests[rid]
    stats = engine.stats()
    assert stats.kv_blocks_pinned == pinned > 0
    assert stats.kv_blocks_used == len(seq.block_table) - pinned  # its own blocks only
    bm = engine.block_manager  # count each kind from reference counts and the trie
    refs, in_trie = bm.ref_counts, bm.cached_nodes
    assert sum(1 for b in range(bm.num_blocks) if refs[b] == 0 and b not in in_trie) == len(
        bm.free_blocks
    )
    assert sum(1 for b in in_trie if refs[b] == 0) == stats.kv_blocks_cached
    engine.abort_request(rid)
    assert engine.stats().kv_blocks_used == 0
