"""CacheBlend's selective recompute (`blend_forward`) on the real model, against a full prefill.

The pool first holds a full prefill of `prefix + A + X + B + q`; then A and B play reused
chunks (their KV left in place, or spoiled to see what is recomputed), X and q the
request's own tokens (wiped), and the region after the prefix is blended.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from covey.llm_backend.blend_forward import BlendRegion, blend_forward
from covey.llm_backend.chunk_planner import num_selected
from covey.llm_backend.sampling_params import SamplingParams


def _setup(engine):
    tok = engine.tokenizer
    prefix = tok.encode("Answer from the passages below.")
    a = tok.encode(" Passage one: the river floods every spring near the mill.")
    x = tok.encode(" Between them:")
    b = tok.encode(" Passage two: the miller keeps his grain on the hill.")
    q = tok.encode(" Where is the grain?")
    ids = prefix + a + x + b + q
    engine.add_request(ids, SamplingParams(max_tokens=1), request_id="full")
    seq = engine.requests["full"]
    plan = engine.scheduler.schedule()
    inputs = engine.runner.prepare(plan.scheduled)
    with torch.inference_mode():
        full = engine.model(inputs.input_ids, inputs.positions, engine.pool.kv, inputs.meta)
    seq.num_computed_tokens = len(ids)
    start = len(prefix)
    reused = torch.zeros(len(ids) - start, dtype=torch.bool)
    a_rows = range(0, len(a))
    b_rows = range(len(a) + len(x), len(a) + len(x) + len(b))
    reused[list(a_rows) + list(b_rows)] = True
    bs = engine.pool.block_size
    dev = engine.pool.kv.device
    pos = torch.arange(start, len(ids), device=dev)
    table = torch.tensor(seq.block_table, device=dev)
    region = BlendRegion(
        input_ids=torch.tensor(ids[start:], device=dev),
        positions=pos,
        slots=table[pos // bs] * bs + pos % bs,
        key_blocks=table,
        reused=reused.to(dev),
    )
    reference = engine.pool.kv[:, :, :, region.slots].clone()  # [L, 2, KVH, n, Dh]
    own = (~reused).nonzero().squeeze(1).tolist()
    x_rows = list(range(len(a), len(a) + len(x)))
    return region, full[-1:], reference, own, list(b_rows), x_rows


def _spoil(engine, region, rows, seed):
    """Random KV in `rows` of the region, on every layer."""
    slots = region.slots[rows]
    shape = engine.pool.kv[:, :, :, slots].shape
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    engine.pool.kv[:, :, :, slots] = noise.to(engine.pool.kv.device) * 3


def _blend(engine, region, ratio):
    return blend_forward(engine.model, engine.pool.kv, region, ratio, (1,), 16)


def test_ratio_one_equals_a_full_prefill(make_engine):
    engine = make_engine(enable_prefix_caching=False)
    region, full_last, reference, own, b_rows, _ = _setup(engine)
    _spoil(engine, region, own + b_rows, seed=1)
    result = _blend(engine, region, 1.0)
    torch.testing.assert_close(result.hidden, full_last, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(engine.pool.kv[:, :, :, region.slots], reference, atol=1e-4, rtol=0)
    assert result.num_recomputed == int(region.reused.sum())
    engine.abort_request("full")


def test_ratio_zero_is_plain_concatenation_by_true_positions(make_engine):
    """Only the own tokens are computed, on every layer, over the reused KV as it is: B's
    KV is never touched. X lies before B: attending by true positions, X never sees B, so
    X's fresh KV is the full prefill's whatever B holds. A mask aligned bottom-right over
    the computed rows (X and q) would let X see B's keys and fail here."""
    engine = make_engine(enable_prefix_caching=False)
    region, full_last, reference, own, b_rows, x_rows = _setup(engine)
    for seed in (1, 2):
        _spoil(engine, region, own + b_rows, seed=seed)
        spoiled_b = engine.pool.kv[:, :, :, region.slots[b_rows]].clone()
        result = _blend(engine, region, 0.0)
        assert result.num_recomputed == 0
        x_kv = engine.pool.kv[:, :, :, region.slots[x_rows]]
        torch.testing.assert_close(x_kv, reference[:, :, :, x_rows], atol=1e-4, rtol=0)
        assert torch.equal(engine.pool.kv[:, :, :, region.slots[b_rows]], spoiled_b)
        assert not torch.allclose(result.hidden, full_last, atol=1e-2)
    engine.abort_request("full")


def test_the_most_deviating_tokens_are_recomputed(make_engine):
    """Three of B's tokens hold wrong KV, the rest of A and B the right one: with a ratio
    that recomputes three tokens, the check layer finds exactly those, and the result is
    the full prefill's. At ratio 0 the same region is not."""
    engine = make_engine(enable_prefix_caching=False)
    region, full_last, reference, own, b_rows, _ = _setup(engine)
    wrong = [b_rows[1], b_rows[4], b_rows[-2]]
    num_reused = int(region.reused.sum())
    ratio = 3 / num_reused
    assert num_selected(ratio, num_reused) == 3

    _spoil(engine, region, own + wrong, seed=3)
    result = _blend(engine, region, ratio)
    assert result.num_recomputed == 3
    torch.testing.assert_close(result.hidden, full_last, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(engine.pool.kv[:, :, :, region.slots], reference, atol=1e-4, rtol=0)

    _spoil(engine, region, own + wrong, seed=3)
    plain = _blend(engine, region, 0.0)
    assert not torch.allclose(plain.hidden, full_last, atol=1e-2)
    engine.abort_request("full")


def test_forced_chunk_heads_are_recomputed_beyond_the_ratio(make_engine):
    """The first two tokens of A and B hold wrong KV, the rest the right one. Forced (as
    `blend_sink_tokens` forces a chunk's head), they are recomputed even at ratio 0, and the
    result is the full prefill's; not forced, ratio 0 leaves them wrong."""
    engine = make_engine(enable_prefix_caching=False)
    region, full_last, reference, own, b_rows, _ = _setup(engine)
    reused_rows = region.reused.nonzero().squeeze(1).tolist()
    heads = reused_rows[:2] + b_rows[:2]
    forced = torch.zeros_like(region.reused)
    forced[heads] = True

    _spoil(engine, region, own + heads, seed=4)
    result = _blend(engine, replace(region, forced=forced), 0.0)
    assert result.num_recomputed == 4
    torch.testing.assert_close(result.hidden, full_last, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(engine.pool.kv[:, :, :, region.slots], reference, atol=1e-4, rtol=0)

    _spoil(engine, region, own + heads, seed=4)
    plain = _blend(engine, region, 0.0)
    assert plain.num_recomputed == 0
    assert not torch.allclose(plain.hidden, full_last, atol=1e-2)

    ratio = 0.5  # the ratio applies to the reused tokens that are not forced
    _spoil(engine, region, own + heads, seed=4)
    result = _blend(engine, replace(region, forced=forced), ratio)
    assert result.num_recomputed == 4 + num_selected(ratio, len(reused_rows) - 4)
    torch.testing.assert_close(result.hidden, full_last, atol=1e-4, rtol=1e-4)
    engine.abort_request("full")


def test_stored_scores_choose_the_rows_without_a_check_layer(make_engine):
    """Three of B's tokens hold wrong KV. Stored scores that rank exactly those first pick
    them with no check layer (`checked` False, no scores measured), and the result is the
    full prefill's; stored scores all unknown (NaN) fall back to the check layer, which finds
    the same rows and returns its scores, each chunk's normalised to mean 1 (A's, all 0,
    unknown). (Some rows unknown is a partial check: test_blend_partial_check.)"""
    engine = make_engine(enable_prefix_caching=False)
    region, full_last, reference, own, b_rows, _ = _setup(engine)
    wrong = [b_rows[1], b_rows[4], b_rows[-2]]
    ratio = 3 / int(region.reused.sum())
    stored = torch.where(region.reused, 1.0, float("nan")).to(torch.float32)
    stored[wrong] = 5.0
    scored = replace(region, stored_scores=stored.to(region.reused.device))

    _spoil(engine, region, own + wrong, seed=3)
    result = _blend(engine, scored, ratio)
    assert not result.checked and result.scores is None
    torch.testing.assert_close(result.hidden, full_last, atol=1e-4, rtol=1e-4)

    gap = torch.full_like(stored, float("nan"))
    _spoil(engine, region, own + wrong, seed=3)
    result = _blend(engine, replace(region, stored_scores=gap.to(stored.device)), ratio)
    assert result.checked
    torch.testing.assert_close(result.hidden, full_last, atol=1e-4, rtol=1e-4)
    scores = result.scores
    assert scores[own].isnan().all() and not scores[b_rows].isnan().any()
    a_rows = [r for r in region.reused.nonzero().squeeze(1).tolist() if r not in b_rows]
    assert abs(float(scores[b_rows].mean()) - 1.0) < 1e-4
    # A's KV is exact: it deviates nowhere, which ranks nothing: unknown (NaN), not zeros
    # that would keep A from ever being recomputed by a later blend's stored scores.
    assert scores[a_rows].isnan().all()
    assert set(scores[b_rows].topk(3).indices.tolist()) == {1, 4, len(b_rows) - 2}
    engine.abort_request("full")
