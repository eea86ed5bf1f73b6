"""Paused requests' KV on the real embedded model: every policy resumes to the output of an
uninterrupted run, swapped blocks come back bit for bit, and nothing leaks (pool, host
copies) after a mixed run under pressure or an abort."""

from __future__ import annotations

import pytest
import torch

from covey.llm_backend.sampling_params import SamplingParams

PROMPT = "The calculator says that twelve times twelve is"
TURN = SamplingParams(max_tokens=4, ignore_eos=True, pause_at_end=True)
NEXT = SamplingParams(max_tokens=5, ignore_eos=True)
TOOL_TEXT = " 144. So the answer is"
POOL = 512  # tokens: small pools build fast
_uninterrupted: dict[tuple[int, ...], list[int]] = {}


def _until_paused(engine, rid):
    """Step until `rid`'s turn pauses; its KV has not moved yet (that is next step's)."""
    while True:
        for out in engine.step():
            if out.request_id == rid and out.finish_reason == "paused":
                return out


def _context_kv(engine, seq, num_tokens):
    """The pool's KV of `seq`'s first `num_tokens` tokens, [L, 2, KVH, num_tokens, Dh]."""
    bs = engine.block_manager.block_size
    blocks = engine.pool.export_blocks(seq.block_table[: -(-num_tokens // bs)])
    layers, two, heads, n, _, dim = blocks.shape
    return blocks.reshape(layers, two, heads, n * bs, dim)[:, :, :, :num_tokens]


def _assert_baseline(engine):
    bm = engine.block_manager
    assert not engine.requests and not engine.scheduler.paused
    assert bm.num_free_blocks == bm.num_blocks
    assert engine.kv_swap.bytes_held == 0


@pytest.mark.parametrize("policy", ["preserve", "swap", "discard"])
def test_each_policy_resumes_to_the_uninterrupted_output(make_engine, policy):
    engine = make_engine(kv_cache_tokens=POOL, pause_policy=policy)
    rid = engine.add_request(PROMPT, TURN)
    (paused,) = engine.run_to_completion([rid])
    assert paused.finish_reason == "paused" and len(paused.token_ids) == 4
    engine.pause_request(rid, tool="calculator")
    seq = engine.requests[rid]
    engine.resume_request(rid, TOOL_TEXT, NEXT)
    (resumed,) = engine.run_to_completion([rid])
    stats = engine.stats()
    moved = {"preserve": (0, 0), "swap": (1, 0), "discard": (0, 1)}[policy]
    assert (stats.swap_in_bytes > 0, stats.pause_recompute_tokens > 0) == moved
    assert stats.swap_out_bytes == stats.swap_in_bytes
    context = tuple(seq.token_ids[: seq.num_prompt_tokens])
    if context not in _uninterrupted:  # one prefill of the whole context, same tool text
        fresh = make_engine(kv_cache_tokens=POOL, enable_prefix_caching=False)
        whole = fresh.run_to_completion([fresh.add_request(list(context), NEXT)])[0]
        _uninterrupted[context] = whole.token_ids
    assert resumed.token_ids == _uninterrupted[context] and len(resumed.token_ids) == 5
    assert set(stats.tool_seconds) == {"calculator", ""}
    _assert_baseline(engine)


def test_swap_moves_the_blocks_out_and_restores_them_exactly(make_engine):
    engine = make_engine(kv_cache_tokens=POOL, pause_policy="swap")
    rid = engine.add_request(PROMPT, TURN)
    _until_paused(engine, rid)
    seq = engine.requests[rid]
    computed = seq.num_computed_tokens
    before = _context_kv(engine, seq, computed).clone()
    engine.step()  # the swap-out
    assert seq.block_table == [] and seq.swapped_tokens == computed
    held = engine.stats().paused_bytes_swapped
    assert held == engine.kv_swap.bytes_held > 0 and engine.stats().paused_bytes_preserved == 0
    # Someone else overwrites the freed blocks meanwhile.
    other = engine.add_request("Bees make honey from the nectar of", NEXT)
    engine.run_to_completion([other])
    engine.resume_request(rid, TOOL_TEXT, NEXT)
    engine.step()  # the swap-in, then the new tokens' forward
    assert seq.num_computed_tokens > computed and engine.kv_swap.bytes_held == 0
    assert torch.equal(_context_kv(engine, seq, computed), before)
    engine.abort_request(rid)
    _assert_baseline(engine)


def test_abort_frees_a_preserved_and_a_swapped_request(make_engine):
    engine = make_engine(kv_cache_tokens=POOL, pause_policy="swap")
    kept, moved = (engine.add_request(PROMPT, TURN) for _ in range(2))
    _until_paused(engine, moved)
    engine.step()  # both swapped out
    assert engine.kv_swap.bytes_held > 0
    engine.abort_request(moved)
    engine.abort_request(kept)
    _assert_baseline(engine)
    preserve = make_engine(kv_cache_tokens=POOL, pause_policy="preserve")
    rid = preserve.add_request(PROMPT, TURN)
    preserve.run_to_completion([rid])
    assert preserve.stats().paused_bytes_preserved > 0
    preserve.abort_request(rid)
    _assert_baseline(preserve)


def test_a_mixed_run_under_pressure_returns_the_pool_to_baseline(make_engine):
    """Three requests pause on tools with different histories in an 8-block pool; a fourth
    needs more room than is free, so the adaptive policy must move paused KV. Every request
    then resumes and finishes, and nothing is left anywhere."""
    engine = make_engine(kv_cache_tokens=128, pause_policy="adaptive")
    engine.pause_policy.times.record("image", 30.0)
    engine.pause_policy.times.record("calculator", 0.001)
    story = "Once upon a time in a quiet village by the sea, there lived an old fisherman"
    rids = [engine.add_request(f"{story} number {i}.", TURN) for i in range(3)]
    engine.run_to_completion(rids)
    for rid, tool in zip(rids, ("image", "calculator", "image")):
        engine.pause_request(rid, tool=tool)
    assert engine.stats().paused_bytes_preserved > 0
    big = engine.add_request(story * 5, SamplingParams(max_tokens=3, ignore_eos=True))
    engine.run_to_completion([big])
    stats = engine.stats()
    assert stats.pause_decisions["swap"] + stats.pause_decisions["discard"] >= 1
    for rid in rids:
        engine.resume_request(rid, TOOL_TEXT, NEXT)
    outs = engine.run_to_completion(rids)
    assert all(o.finished and len(o.token_ids) == 5 for o in outs)
    stats = engine.stats()
    assert stats.swap_in_bytes == stats.swap_out_bytes
    assert stats.paused_bytes_swapped == stats.paused_bytes_preserved == 0
    _assert_baseline(engine)


def test_a_failed_swap_out_costs_only_a_recompute(make_engine, monkeypatch):
    engine = make_engine(kv_cache_tokens=POOL, pause_policy="swap")

    def host_memory_short(block_ids):
        raise MemoryError("host memory short")

    monkeypatch.setattr(engine.kv_swap, "copy_out", host_memory_short)
    rid = engine.add_request(PROMPT, TURN)
    engine.run_to_completion([rid])  # pauses, then the swap-out fails
    seq = engine.requests[rid]
    assert seq.block_table == [] and seq.swapped_tokens == 0 and seq.discarded_tokens > 0
    engine.resume_request(rid, TOOL_TEXT, NEXT)
    (resumed,) = engine.run_to_completion([rid])
    assert resumed.finished and len(resumed.token_ids) == 5
    assert engine.stats().pause_recompute_tokens > 0
    _assert_baseline(engine)


def test_a_blended_chunk_request_swaps_and_never_publishes_its_blended_blocks(make_engine):
    """A prompt with chunk segments whose chunks were blended swaps out and back like any
    other: it resumes to the preserved run's output, and no block from its first blended
    token on ever serves a prefix-cache hit."""
    from covey.llm_backend.segments import Segment

    def prompt(order, head):
        docs = {
            "mill": " The mill by the river grinds wheat for the whole valley in autumn.",
            "owl": " An owl nests in the bell tower; the sexton feeds it mice he catches.",
        }
        segments = [Segment(head, kind="static")]
        for name in order:
            segments.append(Segment(docs[name], kind="chunk", chunk_id=name))
        return [*segments, Segment("\nWho feeds the owl? Answer:", kind="dynamic")]

    outputs = {}
    for policy in ("preserve", "swap"):
        engine = make_engine(
            kv_cache_tokens=POOL, pause_policy=policy, chunk_cache="blend",
            blend_recompute_ratio=0.25,
        )
        engine.run_to_completion([engine.add_request(prompt(["mill", "owl"], "Notes.\n"), NEXT)])
        moved = prompt(["owl", "mill"], "Other notes:\n")
        blend_start = engine.tokenize(moved)[1][1].start  # the first chunk
        rid = engine.add_request(moved, TURN)
        seq = engine.requests[rid]
        _until_paused(engine, rid)
        assert seq.metrics.num_reused_tokens > 0  # its chunks were blended in
        engine.step()  # a fixed swap policy moves it out now
        assert (seq.swapped_tokens > 0) == (policy == "swap")
        engine.resume_request(rid, TOOL_TEXT, NEXT)
        (out,) = engine.run_to_completion([rid])
        assert engine.block_manager.cached_prefix_blocks(seq.token_ids) * 16 <= blend_start
        assert (engine.stats().swap_in_bytes > 0) == (policy == "swap")
        outputs[policy] = out.token_ids
        _assert_baseline(engine)
    assert outputs["swap"] == outputs["preserve"] and len(outputs["swap"]) == 5


def test_an_exact_chunk_request_keeps_publishing_after_a_swap_in(make_engine):
    """Only blended KV stops a swapped-in request from publishing: one whose chunks were
    exact imports (all its KV exact) publishes its later blocks (tool result, next turn)
    as any request does, so a follow-up sharing the conversation reuses them."""
    from covey.llm_backend.segments import Segment

    doc = " The mill by the river grinds wheat for the whole valley in autumn and spring."
    prompt = [
        Segment("Notes.\n", kind="static"),
        Segment(doc, kind="chunk", chunk_id="mill"),
        Segment("\nWhat does the mill grind? Answer:", kind="dynamic"),
    ]
    engine = make_engine(kv_cache_tokens=POOL, pause_policy="swap", chunk_cache="exact")
    engine.run_to_completion([engine.add_request(prompt, NEXT)])
    rid = engine.add_request(prompt, TURN)
    seq = engine.requests[rid]
    _until_paused(engine, rid)
    assert seq.metrics.num_reused_tokens > 0 and seq.inexact_from is None
    engine.step()  # the fixed swap policy moves it out now
    context = seq.swapped_tokens
    assert context > 0
    engine.resume_request(rid, TOOL_TEXT, SamplingParams(max_tokens=16, ignore_eos=True))
    engine.run_to_completion([rid])
    bs = engine.block_manager.block_size
    assert engine.stats().swap_in_bytes > 0
    assert context // bs < (len(seq.token_ids) - 1) // bs  # blocks completed after the swap
    published = engine.block_manager.cached_prefix_blocks(seq.token_ids)
    assert published == (len(seq.token_ids) - 1) // bs
    _assert_baseline(engine)


def test_a_failed_swap_in_fails_its_request_alone_and_loses_no_rejected_output(
    make_engine, monkeypatch
):
    """REVIEW-sched LOW 3: in one step a request the pool can never hold is rejected (the
    validator's pool check turned off, as by any fault that would let one through) and a
    resumed request's KV fails to come back from host memory. Each fails alone with its
    own error and a healthy request beside them finishes; nothing leaks. The swap-in's
    error used to escape the step after the rejected request had left the engine's
    table, so its final output was lost and its stream would hang."""
    engine = make_engine(kv_cache_tokens=POOL, pause_policy="swap")
    monkeypatch.setattr(engine.validator, "check_pool", lambda needed, what: None)
    rid = engine.add_request(PROMPT, TURN)
    _until_paused(engine, rid)
    engine.pause_request(rid, tool="calculator")
    engine.step()  # the swap-out
    assert engine.requests[rid].swapped_tokens > 0
    engine.resume_request(rid, TOOL_TEXT, NEXT)
    bad = engine.add_request([7] * (POOL + 16), NEXT, request_id="bad")
    ok = engine.add_request("Bees make honey from the nectar of", NEXT)

    def broken_swap_in(seq_id, block_ids):
        raise RuntimeError("host copy unreadable")

    monkeypatch.setattr(engine.kv_swap, "swap_in", broken_swap_in)
    failed = {out.request_id: out for out in engine.step() if out.finish_reason == "error"}
    assert set(failed) == {rid, bad}
    assert "RuntimeError: host copy unreadable" in failed[rid].error
    assert "InvalidRequestError" in failed[bad].error and "the pool has" in failed[bad].error
    (done,) = engine.run_to_completion([ok])
    assert done.finish_reason == "length" and len(done.token_ids) == 5
    _assert_baseline(engine)
