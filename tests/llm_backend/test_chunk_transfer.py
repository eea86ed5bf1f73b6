"""The fast paths of moving chunk KV into the pool and blending it, on the real model.

An import writes keys (re-rotated) and values straight into the pool instead of building a
re-rotated copy of the span first; re-rotation works in place on its float32 copy. Both
must give the bits the plain formulas give. A step whose batch is only a blend step's own
tokens before its region computes them inside the blend run (no batched forward): the
result must still be a full prefill's at ratio 1.0.
"""

from __future__ import annotations

import pytest
import torch

from covey.cache.chunk_kv import ChunkKV
from covey.llm_backend import model_runner
from covey.llm_backend.chunk_planner import KVImport
from covey.llm_backend.layers import apply_rotary
from covey.llm_backend.rope_rerotation import RopeRerotator
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.segments import Segment


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rerotate_gives_apply_rotarys_bits_and_leaves_its_input(make_engine, dtype):
    engine = make_engine(chunk_cache="off", kv_cache_tokens=256)
    rerotator = RopeRerotator(engine.model.args)
    keys = torch.randn(3, 2, 7, engine.model.args.dim_per_head).to(dtype)
    before = keys.clone()
    cos, sin = rerotator.rotation(-41, keys.device)
    want = apply_rotary(keys.float(), cos, sin).to(dtype)
    assert torch.equal(rerotator.rerotate(keys, -41), want)
    assert torch.equal(keys, before)  # float32 keys are copied, not rotated in place


@pytest.mark.parametrize("delta", [-98, 0])
def test_import_writes_the_rerotated_span_and_nothing_else(make_engine, delta):
    """Keys moved by the delta, values as stored, each into its own slot; every other slot
    of the pool (neighbours sharing the span's first and last blocks) untouched."""
    engine = make_engine(chunk_cache="blend", kv_cache_tokens=512)
    ids = list(range(100, 150))
    engine.add_request(ids, SamplingParams(max_tokens=1), request_id="r")
    engine.scheduler.schedule()  # allocates the sequence's blocks
    seq = engine.requests["r"]
    pool = engine.pool.kv
    pool.copy_(torch.randn(pool.shape, generator=torch.Generator().manual_seed(0)))
    before = pool.clone()
    layers, _, kvh, _, dh = pool.shape
    stored = torch.randn(layers, 2, kvh, 20, dh, generator=torch.Generator().manual_seed(1))
    entry = ChunkKV("c", tuple(range(20)), stored.to(pool.dtype), 2 - delta, "ctx")
    imp = KVImport(start=5, end=17, entry=entry, offset=3, delta=delta)

    transfer = engine.runner.chunks
    transfer.import_kv(seq, imp)

    slots = transfer.slots(seq, 5, 17)
    want = RopeRerotator(engine.model.args).rerotate_kv(entry.kv[:, :, :, 3:15], delta)
    assert torch.equal(pool[:, :, :, slots], want)
    others = torch.ones(pool.shape[3], dtype=torch.bool)
    others[slots] = False
    assert torch.equal(pool[:, :, :, others], before[:, :, :, others])
    engine.abort_request("r")


DOCS = {
    "mill": " The mill by the river grinds wheat for the whole valley in autumn.",
    "lamp": " Lamp oil was sold at the harbour store, two coins a bottle, on Fridays.",
    "owl": " An owl nests in the bell tower; the sexton feeds it mice he catches.",
}


def _prompt(order, head):
    segments = [Segment(head, kind="static")]
    for i, name in enumerate(order):
        segments.append(Segment(f"\n[{i + 1}]", kind="static"))
        segments.append(Segment(DOCS[name], kind="chunk", chunk_id=name))
    segments.append(Segment("\nQuestion: who feeds the owl?\nAnswer:", kind="dynamic"))
    return segments


def _first_logits(engine, prompt):
    """The logits the prompt's first token is sampled from, and the step's model calls."""
    seen, calls = [], {"forward": 0}
    compute_logits, forward = engine.model.compute_logits, engine.model.forward

    def logits(hidden):
        out = compute_logits(hidden)
        seen.append(out.clone())
        return out

    def counted(*args):
        calls["forward"] += 1
        return forward(*args)

    engine.model.compute_logits, engine.model.forward = logits, counted
    try:
        rid = engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0))
        engine.run_to_completion([rid])
    finally:
        del engine.model.compute_logits, engine.model.forward
    return seen[0], calls["forward"]


def test_a_blend_step_computes_its_own_tokens_before_the_region_inside_the_run(
    make_engine, monkeypatch
):
    """The new head (never cached) is computed by the blend run, which starts at the step's
    compute range: no batched forward runs, and at ratio 1.0 the first token's logits are a
    full prefill's."""
    regions = []
    real = model_runner.blend_forward

    def recording(model, kv, region, *args):
        regions.append(int(region.positions[0]))
        return real(model, kv, region, *args)

    monkeypatch.setattr(model_runner, "blend_forward", recording)
    off = make_engine(chunk_cache="off", enable_prefix_caching=False, kv_cache_tokens=1024)
    blend = make_engine(chunk_cache="blend", blend_recompute_ratio=1.0, kv_cache_tokens=1024)
    _first_logits(blend, _prompt(["mill", "lamp", "owl"], "Read the notes.\n"))
    assert regions == []
    moved = _prompt(["owl", "mill", "lamp"], "Notes in another order, with a longer head:\n")
    got, forwards = _first_logits(blend, moved)
    assert regions == [0]  # the head's tokens are rows of the blend run
    assert forwards == 0
    want, _ = _first_logits(off, moved)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
