"""Chunk KV reuse through the whole engine (real SmolLM2, float32, greedy).

Exact reuse must be lossless; blending at ratio 1.0 must equal a full prefill; blended KV
must never serve a prefix-cache hit; a changed chunk is never reused; the pool returns to
its baseline whatever happened (exact, blend, abort, preemption).
"""

from __future__ import annotations

import asyncio

import pytest

from covey.cache.chunk_store import ROOT_HASH, chain_hash
from covey.errors import ConfigError, InvalidRequestError, NotSupportedError
from covey.llm_backend import model_runner
from covey.llm_backend.async_llm import AsyncLLM
from covey.llm_backend.config import EngineConfig
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.segments import Segment
from tests.llm_backend.conftest import numbered_chunk_prompt

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)
DOCS = {
    "mill": " The mill by the river grinds wheat for the whole valley in autumn.",
    "lamp": " Lamp oil was sold at the harbour store, two coins a bottle, on Fridays.",
    "owl": " An owl nests in the bell tower; the sexton feeds it mice he catches.",
}


def _prompt(order, head="Read the notes.\n", docs=DOCS):
    return numbered_chunk_prompt(order, head, docs)


def _engine(make_engine, **config):
    config.setdefault("kv_cache_tokens", 1024)  # small: a pool is allocated per engine
    return make_engine(**config)


def _run(engine, prompt, params=GREEDY):
    rid = engine.add_request(prompt, params)
    return engine.run_to_completion([rid])[0]


def _baseline(engine):
    """Every block free or idle-cached, and nothing referenced."""
    bm = engine.block_manager
    assert not engine.requests
    assert bm.num_free_blocks == bm.num_blocks
    assert not any(bm.ref_counts)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_exact_reuse_gives_the_full_prefill_output(make_engine, prefix_caching):
    """Chunks after the same tokens reuse their KV exactly; spans are not block-aligned."""
    off = _engine(make_engine, chunk_cache="off", enable_prefix_caching=False)
    exact = _engine(make_engine, chunk_cache="exact", enable_prefix_caching=prefix_caching)
    order = ["mill", "lamp", "owl"]
    ids, spans = exact.tokenize(_prompt(order))
    assert any(s.start % 16 for s in spans if s.kind == "chunk")  # not on block boundaries
    expected = _run(off, _prompt(order))
    first = _run(exact, _prompt(order))
    second = _run(exact, _prompt(order))
    assert first.token_ids == second.token_ids == expected.token_ids
    assert first.metrics.num_reused_tokens == 0
    reused = second.metrics.num_reused_tokens + second.metrics.num_cached_tokens
    assert second.metrics.num_reused_tokens > 0 or prefix_caching
    assert reused >= sum(s.end - s.start for s in spans if s.kind == "chunk") - 16
    assert second.metrics.num_recomputed_tokens == 0
    # After another head, or in another order, nothing is exact: no reuse (no blending).
    other = _run(exact, _prompt(order, head="Other notes, read them.\n"))
    assert other.metrics.num_reused_tokens == 0
    assert _run(exact, _prompt(order[::-1])).metrics.num_reused_tokens == 0
    stats = exact.stats().chunk_cache
    assert stats["host"]["entries"] > 0 and stats["host"]["bytes"] > 0
    _baseline(exact)


def test_blend_at_ratio_one_equals_the_full_prefill(make_engine):
    off = _engine(make_engine, chunk_cache="off", enable_prefix_caching=False)
    blend = _engine(make_engine, chunk_cache="blend", blend_recompute_ratio=1.0)
    _run(blend, _prompt(["mill", "lamp", "owl"]))
    moved = _prompt(["owl", "mill", "lamp"], head="Notes in another order:\n")
    out = _run(blend, moved)
    assert out.metrics.num_reused_tokens > 0
    assert out.metrics.num_recomputed_tokens == out.metrics.num_reused_tokens
    assert out.token_ids == _run(off, moved).token_ids
    _baseline(blend)


def test_blend_reuses_a_fraction_and_never_caches_blended_blocks(make_engine):
    engine = _engine(make_engine, chunk_cache="blend", blend_recompute_ratio=0.25)
    _run(engine, _prompt(["mill", "lamp", "owl"]))
    moved = _prompt(["lamp", "owl", "mill"], head="Notes:\n")
    rid = engine.add_request(moved, GREEDY)
    seq = engine.requests[rid]
    blend_start = engine.tokenize(moved)[1][2].start  # the first chunk, after head and label
    out = engine.run_to_completion([rid])[0]
    reused = out.metrics.num_reused_tokens
    assert reused > 0
    assert out.metrics.num_recomputed_tokens == -(-reused // 4)
    ids = seq.token_ids
    cached = engine.block_manager.cached_prefix_blocks(ids)
    assert cached * 16 <= blend_start  # nothing from the first blended token on
    stats = engine.stats().chunk_cache
    assert stats["host"]["reused_tokens"] >= reused
    assert stats["host"]["recomputed_tokens"] >= out.metrics.num_recomputed_tokens
    assert stats["host"]["hits"] >= 3
    _baseline(engine)


def test_a_chunk_computed_after_blended_kv_is_never_stored_as_exact(make_engine):
    """Its KV attended to approximate KV, so an exact lookup must never return it: it is
    kept for blending only."""
    engine = _engine(make_engine, chunk_cache="blend", enable_prefix_caching=False)
    _run(engine, _prompt(["mill"]))
    after_blend = _prompt(["mill", "owl"], head="Notes:\n")
    ids, spans = engine.tokenize(after_blend)
    out = _run(engine, after_blend)
    assert out.metrics.num_reused_tokens > 0  # "mill" was blended in
    owl = next(s for s in spans if s.chunk_id == "owl")
    store = engine.chunk_store
    owl_tokens = ids[owl.start : owl.end]
    assert store.contains_any(owl_tokens)  # kept, for blending
    assert not store.contains_exact(chain_hash(ROOT_HASH, ids[: owl.start]), owl_tokens)
    again = _run(engine, after_blend)
    assert again.metrics.num_reused_tokens > out.metrics.num_reused_tokens  # blended twice
    _baseline(engine)


def test_a_changed_chunk_is_not_reused(make_engine):
    engine = _engine(make_engine, chunk_cache="blend", enable_prefix_caching=False)
    _run(engine, _prompt(["mill", "owl"]))
    changed = {**DOCS, "owl": " An owl nests in the church; the priest feeds it bread crumbs."}
    out = _run(engine, _prompt(["owl"], head="Notes:\n", docs=changed))
    assert out.metrics.num_reused_tokens == 0
    assert engine.stats().chunk_cache["host"]["stale"] >= 1
    _baseline(engine)


def test_a_chunk_too_long_for_the_context_is_refused_by_name(make_engine):
    engine = _engine(make_engine, chunk_cache="exact", max_model_len=32)
    long_chunk = Segment(" word" * 40, kind="chunk", chunk_id="doc-7")
    with pytest.raises(InvalidRequestError, match="doc-7"):
        engine.add_request([Segment("Q:", kind="static"), long_chunk], GREEDY)
    with pytest.raises(InvalidRequestError, match="doc-7"):
        engine.warm_chunks([long_chunk], compute=True)


def test_pool_returns_to_baseline_after_a_mixed_run(make_engine):
    """Exact and blended reuse, an abort mid-prefill and preemptions (a pool too small for
    every request at once) all give back every block."""
    engine = make_engine(
        chunk_cache="blend", kv_cache_tokens=160, max_num_batched_tokens=48, max_num_seqs=4
    )
    _run(engine, _prompt(["mill", "lamp"]))
    orders = [["lamp", "mill"], ["mill", "lamp"], ["owl", "lamp"]]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(_prompt(o, head=f"Set {i}:\n"), params) for i, o in enumerate(orders)]
    ids.append(engine.add_request(_prompt(["mill", "lamp"]), params))  # exact
    aborted = engine.add_request(_prompt(["owl", "mill"]), params)
    engine.step()
    engine.abort_request(aborted)
    outs = engine.run_to_completion(ids)
    assert all(o.finish_reason == "length" for o in outs)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert all(o.metrics.num_reused_tokens > 0 for o in outs[:2])
    _baseline(engine)


def test_warm_chunks_computes_each_chunk_once_then_reuses_it(make_engine):
    engine = _engine(make_engine, chunk_cache="blend", enable_prefix_caching=False)
    chunks = [Segment(DOCS[n], kind="chunk", chunk_id=n) for n in ("mill", "owl")]
    assert engine.warm_chunks(chunks + chunks[:1]) == 0  # loads only: nothing stored yet
    assert engine.warm_chunks(chunks + chunks[:1], compute=True) == 2
    assert engine.warm_chunks(chunks, compute=True) == 0
    out = _run(engine, _prompt(["owl", "mill"]))
    assert out.metrics.num_reused_tokens > 0
    _baseline(engine)


def test_the_disk_tier_keeps_chunks_across_a_restart(make_engine, tmp_path):
    first = _engine(make_engine, chunk_cache="exact", chunk_store_dir=str(tmp_path))
    expected = _run(first, _prompt(["mill", "owl"]))
    first.close()
    again = _engine(
        make_engine,
        chunk_cache="exact",
        chunk_store_dir=str(tmp_path),
        enable_prefix_caching=False,
    )
    out = _run(again, _prompt(["mill", "owl"]))
    assert out.metrics.num_reused_tokens > 0
    assert out.token_ids == expected.token_ids
    assert again.stats().chunk_cache["disk"]["hits"] > 0
    again.close()


def test_async_llm_offers_chunks_and_warms_them(make_engine):
    async def main():
        on = AsyncLLM(engine=_engine(make_engine, chunk_cache="blend"))
        exact = AsyncLLM(engine=_engine(make_engine, chunk_cache="exact"))
        off = AsyncLLM(engine=_engine(make_engine, chunk_cache="off"))
        assert on.capabilities.chunks and exact.capabilities.chunks
        assert not off.capabilities.chunks
        chunk = Segment(DOCS["lamp"], kind="chunk", chunk_id="lamp")
        assert await on.warm_chunks([chunk], compute=True) == 1
        assert await on.warm_chunks([chunk], compute=True) == 0
        # Without `compute` it only loads: nothing is stored yet, so nothing is computed.
        assert await exact.warm_chunks([chunk]) == 0
        assert (await exact.stats()).chunk_cache["host"]["entries"] == 0
        await exact.close()
        with pytest.raises(NotSupportedError):
            await off.warm_chunks([chunk])
        stats = await on.stats()
        assert set(stats.chunk_cache) == {"pool", "host", "disk"}
        assert (await off.stats()).chunk_cache == {}
        await on.close()
        await off.close()

    asyncio.run(main())


def test_blend_recomputes_each_reused_chunks_head_beyond_the_ratio(make_engine, monkeypatch):
    """The planner charges the sink rows, and the runner really forces them: every blend run's
    forced mask and recompute count are recorded where `blend_forward` receives them."""
    seen: list[tuple[int, int]] = []
    real = model_runner.blend_forward

    def recording(model, kv, region, *args):
        result = real(model, kv, region, *args)
        seen.append((int(region.forced.sum()), result.num_recomputed))
        return result

    monkeypatch.setattr(model_runner, "blend_forward", recording)
    engine = _engine(
        make_engine, chunk_cache="blend", blend_recompute_ratio=0.25, blend_sink_tokens=3
    )
    _run(engine, _prompt(["mill", "lamp", "owl"]))
    assert seen == []  # nothing reused yet: no blend
    out = _run(engine, _prompt(["lamp", "owl", "mill"], head="Notes:\n"))
    reused = out.metrics.num_reused_tokens
    assert reused > 9
    assert out.metrics.num_recomputed_tokens == 9 + -(-(reused - 9) // 4)  # 3 chunks x 3
    assert sum(forced for forced, _ in seen) == 9
    assert sum(n for _, n in seen) == out.metrics.num_recomputed_tokens
    _baseline(engine)
    with pytest.raises(ConfigError, match="blend_sink_tokens"):
        EngineConfig(blend_sink_tokens=-1)
