"""Blending chunk KV that another request computed, on the real model, against a full prefill.

test_blend_forward spoils the reused KV with noise, which any check layer finds at once. In
use the reused KV is a chunk's KV from an earlier request's prefill: computed at other
positions after other text, so it deviates a little everywhere, most on deep layers. These
tests hold the recompute path to what that case needs (issue 9's probe): the imported keys
are re-rotated exactly once (layer 0's KV carries no context, so it must equal the full
prefill's), and the deviation from the full prefill falls as the ratio rises, down to none
at 1.0, both in the last token's hidden state and in the KV that decoding will read.
"""

from __future__ import annotations

import torch

from covey.llm_backend.blend_forward import BlendRegion, blend_forward
from covey.llm_backend.chunk_planner import num_selected
from covey.llm_backend.rope_rerotation import RopeRerotator
from covey.llm_backend.sampling_params import SamplingParams

CHECK = (1,)


def _prefill(engine, ids, request_id):
    """Prefill `ids` as one sequence; returns it and its last token's hidden state."""
    engine.add_request(ids, SamplingParams(max_tokens=1), request_id=request_id)
    seq = engine.requests[request_id]
    plan = engine.scheduler.schedule()
    inputs = engine.runner.prepare(plan.scheduled)
    with torch.inference_mode():
        hidden = engine.model(inputs.input_ids, inputs.positions, engine.pool.kv, inputs.meta)
    seq.num_computed_tokens = len(ids)
    return seq, hidden[-1:]


def _slots(engine, seq, start, end):
    """Pool slots of `seq`'s positions [start, end), as the engine's chunk transfer finds them."""
    return engine.runner.chunks.slots(seq, start, end)


def _setup(engine):
    """`prefix + A + X + B + q`, its full prefill as the reference, and A's and B's KV as an
    earlier request `prefix + C + B + A` computed them (other positions, other context)."""
    tok = engine.tokenizer
    prefix = tok.encode("Answer from the passages below.")
    a = tok.encode(" Passage one: the river floods every spring near the old mill by the ford.")
    b = tok.encode(" Passage two: the miller keeps his grain in a barn high on the hill.")
    c = tok.encode(" Passage zero: the baker sells bread at dawn and closes at noon.")
    x = tok.encode(" Between them:")
    q = tok.encode(" Where does the miller keep his grain?")

    other, _ = _prefill(engine, prefix + c + b + a, "other")
    o_b = len(prefix) + len(c)
    o_a = o_b + len(b)
    earlier = {
        "a": (engine.pool.kv[:, :, :, _slots(engine, other, o_a, o_a + len(a))].clone(), o_a),
        "b": (engine.pool.kv[:, :, :, _slots(engine, other, o_b, o_b + len(b))].clone(), o_b),
    }
    engine.abort_request("other")

    ids = prefix + a + x + b + q
    seq, full_last = _prefill(engine, ids, "full")
    start = len(prefix)
    n_a = len(a)
    n_b = len(b)
    b_start = n_a + len(x)
    reused = torch.zeros(len(ids) - start, dtype=torch.bool)
    reused[:n_a] = True
    reused[b_start : b_start + n_b] = True
    dev = engine.pool.kv.device
    region = BlendRegion(
        input_ids=torch.tensor(ids[start:], device=dev),
        positions=torch.arange(start, len(ids), device=dev),
        slots=_slots(engine, seq, start, len(ids)),
        key_blocks=torch.tensor(seq.block_table, device=dev),
        reused=reused.to(dev),
    )
    reference = engine.pool.kv[:, :, :, region.slots].clone()
    rerotator = RopeRerotator(engine.model.args)
    imported = engine.pool.kv[:, :, :, region.slots].clone()
    for (kv, old), row in ((earlier["a"], 0), (earlier["b"], b_start)):
        moved = rerotator.rerotate_kv(kv, start + row - old)
        imported[:, :, :, row : row + kv.shape[3]] = moved
    return region, full_last, reference, imported


def _deviation(got, want):
    """Relative L2 distance."""
    return float((got - want).norm() / want.norm())


def _blend(engine, region, imported, ratio):
    """Blend with `imported` in place; returns the result and the region's KV afterwards
    (what decoding reads)."""
    engine.pool.kv[:, :, :, region.slots] = imported
    result = blend_forward(engine.model, engine.pool.kv, region, ratio, CHECK, 16)
    kv = engine.pool.kv[:, :, :, region.slots]
    return result, kv


def test_imported_chunk_kv_is_rerotated_once(make_engine):
    """Layer 0's K and V depend on the token and its position only: the imported KV, moved
    from the earlier request's positions, must equal the full prefill's there. A missing or
    doubled re-rotation fails on K; a row scattered to the wrong slot fails on both."""
    engine = make_engine(enable_prefix_caching=False)
    region, _, reference, imported = _setup(engine)
    rows = region.reused
    torch.testing.assert_close(
        imported[0][:, :, rows], reference[0][:, :, rows], atol=2e-5, rtol=1e-4
    )
    # and deeper layers do carry the other context: the case blending is for
    assert _deviation(imported[-1][:, :, rows], reference[-1][:, :, rows]) > 0.02
    engine.abort_request("full")


def test_deviation_falls_with_the_ratio_down_to_none(make_engine):
    """Ratio 0, 0.5, all but one reused token, and 1.0 (the same machinery, no shortcut):
    the last hidden state and the reused rows' KV after the check layer come closer to the
    full prefill at each step, and 1.0 equals it."""
    engine = make_engine(enable_prefix_caching=False)
    region, full_last, reference, imported = _setup(engine)
    num_reused = int(region.reused.sum())
    all_but_one = (num_reused - 1) / num_reused
    assert num_selected(all_but_one, num_reused) == num_reused - 1
    deep = slice(max(CHECK) + 1, None)
    rows = region.reused
    hidden_dev, kv_dev = [], []
    for ratio in (0.0, 0.5, all_but_one, 1.0):
        result, kv = _blend(engine, region, imported, ratio)
        hidden_dev.append(_deviation(result.hidden, full_last))
        kv_dev.append(_deviation(kv[deep][:, :, :, rows], reference[deep][:, :, :, rows]))
    assert hidden_dev[0] > 0.02 and kv_dev[0] > 0.02, (hidden_dev, kv_dev)
    for lower, higher in zip(hidden_dev[1:], hidden_dev, strict=False):
        assert lower < 0.8 * higher, hidden_dev
    for lower, higher in zip(kv_dev[1:], kv_dev, strict=False):
        assert lower < 0.8 * higher, kv_dev
    assert hidden_dev[-1] < 1e-4 and kv_dev[-1] < 1e-4, (hidden_dev, kv_dev)
    engine.abort_request("full")
