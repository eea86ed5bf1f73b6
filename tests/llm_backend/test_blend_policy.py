"""How a blend chooses the reused tokens it recomputes (`BlendPolicy`), on the real model.

The region is test_blend_forward's (`prefix + A + X + B + q`, A and B reused). Which rows a
blend recomputed is read off the pool: the reused rows' KV is spoiled on the layers after
the check layer, and after the blend exactly the recomputed rows no longer hold that noise.
"""

from __future__ import annotations

import pytest
import torch

from covey.errors import ConfigError
from covey.llm_backend.blend_forward import BlendPolicy, blend_forward, quota_topk
from covey.llm_backend.config import EngineConfig
from covey.llm_backend.layers import apply_rotary
from tests.llm_backend.test_blend_forward import _setup

CHECK = 1


def _spoil_after_check(engine, region, rows, seed) -> torch.Tensor:
    """Random KV in `rows` of the region on the layers after the check layer; returns it."""
    slots = region.slots[rows]
    kv = engine.pool.kv[CHECK + 1 :, :, :, slots]
    noise = torch.randn(kv.shape, generator=torch.Generator().manual_seed(seed))
    engine.pool.kv[CHECK + 1 :, :, :, slots] = noise.to(kv.device) * 3
    return engine.pool.kv[:, :, :, slots].clone()


def _recomputed(engine, region, spoiled, rows) -> list[int]:
    """Of `rows` (spoiled as `spoiled`), those whose last-layer KV was written again."""
    got = engine.pool.kv[-1][:, :, region.slots[rows]]
    changed = (got - spoiled[-1]).abs().amax(dim=(0, 1, 3)) > 0
    return [r for r, c in zip(rows, changed.tolist(), strict=True) if c]


def test_quota_topk_gives_each_group_its_share_of_k():
    scores = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0, 0.1, 0.3, 0.2, 4.0, 3.0])
    groups = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
    picked = sorted(quota_topk(scores, groups, 5).tolist())
    # shares of 5 by size 5:3:2 -> 2.5, 1.5, 1.0 -> floors 2, 1, 1, the remainder to group 0
    assert picked == [0, 1, 2, 6, 8]
    assert sorted(scores.topk(5).indices.tolist()) == [0, 1, 2, 3, 4]  # global: group 0 only
    assert quota_topk(scores, groups, 0).numel() == 0
    assert sorted(quota_topk(scores, groups, 10).tolist()) == list(range(10))


def test_per_chunk_quota_leaves_a_chunk_its_share(make_engine):
    """Three of B's tokens deviate most on the check layer. Globally the blend recomputes
    those three; with a quota per chunk A takes its share of the three picks, and only B's
    share of them is recomputed."""
    engine = make_engine(enable_prefix_caching=False)
    region, _, _, _, b_rows, _ = _setup(engine)
    rows = region.reused.nonzero().squeeze(1).tolist()
    wrong = [b_rows[1], b_rows[4], b_rows[-2]]
    ratio = 3 / len(rows)
    groups = torch.tensor([0 if r < b_rows[0] else 1 for r in rows])
    share_b = int((groups[quota_topk(torch.zeros(len(rows)), groups, 3)] == 1).sum())
    assert 0 < share_b < 3
    for policy, expect_wrong in ((BlendPolicy(), 3), (BlendPolicy(quota="per_chunk"), share_b)):
        spoiled = _spoil_after_check(engine, region, rows, seed=5)
        engine.pool.kv[CHECK, :, :, region.slots[wrong]] += 3.0  # the check layer sees them
        result = blend_forward(engine.model, engine.pool.kv, region, ratio, (CHECK,), 16, policy)
        assert result.num_recomputed == 3
        recomputed = _recomputed(engine, region, spoiled, rows)
        assert len(recomputed) == 3, policy
        assert len(set(recomputed) & set(wrong)) == expect_wrong, policy
    engine.abort_request("full")


def test_attention_score_recomputes_what_the_question_reads(make_engine):
    """With score="attention", the tokens recomputed are the reused ones the question (the
    own tokens after B) attends to most on the check layer, computed here independently by
    dense attention over the full prefill."""
    engine = make_engine(enable_prefix_caching=False)
    captured = []
    hook = engine.model.layers[CHECK].register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].clone())
    )
    try:
        region, _, _, own, _, _ = _setup(engine)
    finally:
        hook.remove()
    x_in = captured[0]  # [T, hidden]: the check layer's input in the full prefill
    start = int(region.positions[0])
    reused_rows = region.reused.nonzero().squeeze(1)
    question = [r for r in own if r > int(reused_rows.max())]
    q_pos = torch.tensor([start + r for r in question])

    layer, model = engine.model.layers[CHECK], engine.model
    attn = layer.self_attn
    h = layer.input_layernorm(x_in[q_pos])
    q = attn.qkv_proj(h)[:, : attn.q_size].view(len(question), attn.num_heads, -1)
    cos, sin = model.rotary(q_pos, q.dtype)
    q = apply_rotary(q, cos, sin)
    length = start + region.positions.shape[0]
    pos = torch.arange(length)
    table = region.key_blocks.cpu()
    slots = table[pos // 16] * 16 + pos % 16
    keys = engine.pool.kv[CHECK][0][:, slots.to(engine.pool.kv.device)].cpu()  # [KVH, L, Dh]
    keys = keys.repeat_interleave(attn.num_heads // keys.shape[0], dim=0)  # [H, L, Dh]
    logits = torch.einsum("thd,hld->thl", q.cpu(), keys) / attn.head_dim**0.5
    logits = logits.masked_fill(pos[None, None, :] > q_pos[:, None, None], float("-inf"))
    probs = logits.softmax(-1).sum(dim=(0, 1))  # [L]
    reused_pos = start + reused_rows
    k = 5
    expected = sorted((start + reused_rows[probs[reused_pos].topk(k).indices]).tolist())

    rows = reused_rows.tolist()
    spoiled = _spoil_after_check(engine, region, rows, seed=6)
    policy = BlendPolicy(score="attention")
    ratio = k / len(rows)
    result = blend_forward(engine.model, engine.pool.kv, region, ratio, (CHECK,), 16, policy)
    assert result.num_recomputed == k
    assert [start + r for r in _recomputed(engine, region, spoiled, rows)] == expected
    engine.abort_request("full")


@pytest.mark.parametrize(
    ("field", "value"), [("blend_score", "deviation"), ("blend_quota", "per_doc")]
)
def test_an_unknown_policy_is_a_config_error(field, value):
    with pytest.raises(ConfigError, match=f"EngineConfig.{field} must be one of"):
        EngineConfig(chunk_cache="blend", **{field: value})


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"score": "K"}, "score"), ({"quota": "perchunk"}, "quota")]
)
def test_a_policy_built_directly_checks_its_names(kwargs, field):
    with pytest.raises(ConfigError, match=f"BlendPolicy.{field} must be one of"):
        BlendPolicy(**kwargs)
