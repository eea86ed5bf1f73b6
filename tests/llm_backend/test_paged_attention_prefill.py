"""Prefill runs over cached keys: the tiled true-position read against one masked SDPA.

Random tensors (a shape-level check). The reference is what the engine did before query
tiles: gather the run's blocks and call SDPA once, in float32, with the boolean mask
"key position <= query position". The tiled read must give the same output for contiguous
continuations after a prefix, sparse recomputed subsets (a blend run), single queries, GQA,
blocks out of pool order (gathered) and in order (read in place), and whether the run names
its positions or hands a true-position mask; a mask of another form is applied as given.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from covey.llm_backend.attention_metadata import AttentionMetadata, PrefillRun
from covey.llm_backend.paged_attention import paged_attention
from covey.llm_backend.query_tiles import plan_run, positions_from_mask

H, KVH, DH, BS = 6, 2, 16, 8
TOLERANCES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]


def _pool(blocks: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(2, KVH, blocks * BS, DH, generator=gen).to(dtype)


def _reference(q: torch.Tensor, kv: torch.Tensor, table: list[int], mask: torch.Tensor):
    """q [n, H, Dh] over the run's gathered keys under a boolean [n, L] mask, in float32."""
    length = mask.shape[1]
    slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(length)])
    k = kv[0][:, slots].float().unsqueeze(0)  # [1, KVH, L, Dh]
    v = kv[1][:, slots].float().unsqueeze(0)
    qs = q.float().transpose(0, 1).unsqueeze(0)  # [1, H, n, Dh]
    o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, enable_gqa=True)
    return o.squeeze(0).transpose(0, 1)  # [n, H, Dh]


def _run(q: torch.Tensor, kv: torch.Tensor, run: PrefillRun) -> torch.Tensor:
    n = q.shape[0]
    meta = AttentionMetadata(torch.zeros(n, dtype=torch.long), 0, BS, [run])
    empty = torch.empty(0, KVH, DH, dtype=q.dtype)
    return paged_attention(q, empty, empty, kv, meta)


def _true_mask(positions: torch.Tensor) -> torch.Tensor:
    return torch.arange(int(positions.max()) + 1)[None, :] <= positions[:, None]


def _cases(gen: torch.Generator) -> list[tuple[str, torch.Tensor]]:
    sparse = torch.randperm(300, generator=gen)[:45].sort().values + 40
    return [
        ("one query after a prefix", torch.tensor([77])),
        ("short continuation", torch.arange(50, 60)),
        ("long continuation (several tiles)", torch.arange(130, 330)),
        ("continuation from a block boundary", torch.arange(2 * BS, 2 * BS + 70)),
        ("sparse subset and the question rows", torch.cat((sparse, torch.arange(340, 350)))),
        ("sparse subset starting at position 0", torch.tensor([0, 3, 4, 40, 41, 90, 200])),
    ]


@pytest.mark.parametrize(("dtype", "tol"), TOLERANCES)
def test_tiled_true_position_reads_match_one_masked_sdpa(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    kv = _pool(120, dtype, gen)
    for name, positions in _cases(gen):
        n, length = positions.shape[0], int(positions.max()) + 1
        nb = -(-length // BS)
        shuffled = (torch.randperm(120, generator=gen)[: nb + 2]).tolist()  # spare blocks
        in_order = list(range(60, 60 + nb + 2))
        q = torch.randn(n, H, DH, generator=gen).to(dtype)
        for table in (shuffled, in_order):
            want = _reference(q, kv, table, _true_mask(positions))
            blocks = torch.tensor(table)
            by_positions = PrefillRun(0, n, blocks, positions=positions)
            by_mask = PrefillRun(0, n, blocks, _true_mask(positions))
            for run in (by_positions, by_mask):
                plan = run.plan(BS, dtype)
                assert plan is not None and (plan.contiguous_start is None) == (table is shuffled)
                got = _run(q, kv, run).float()
                torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=name)


def test_tiles_cover_every_query_once_and_stop_at_their_last_position():
    positions = torch.arange(100, 400)
    plan = plan_run(positions, torch.arange(60), BS, torch.float32)
    assert len(plan.tiles) > 1
    assert [t.start for t in plan.tiles] == [0] + [t.end for t in plan.tiles[:-1]]
    assert plan.tiles[-1].end == 300 and plan.length == 400
    for t in plan.tiles:
        assert t.keys == int(positions[t.end - 1]) + 1  # no key past the tile's last query
        assert t.mask.shape == (t.end - t.start, t.keys)
    # The pairs computed: those seen plus each tile's own stripe, not the whole [n, L].
    computed = sum(t.keys * (t.end - t.start) for t in plan.tiles)
    seen = int((positions + 1).sum())
    rows = max(t.end - t.start for t in plan.tiles)
    assert seen <= computed <= seen + 300 * rows // 2 + 300
    assert computed < 0.7 * 300 * 400


def test_a_few_queries_after_a_long_prefix_stay_one_call():
    plan = plan_run(torch.arange(1000, 1064), torch.arange(140), BS, torch.float32)
    assert [(t.start, t.end, t.keys) for t in plan.tiles] == [(0, 64, 1064)]


@pytest.mark.parametrize(("dtype", "tol"), TOLERANCES)
def test_a_mask_of_another_form_is_applied_as_given(dtype, tol):
    gen = torch.Generator().manual_seed(1)
    kv = _pool(20, dtype, gen)
    mask = torch.rand(12, 70, generator=gen) < 0.5
    mask[:, 5] = True  # every row sees some key
    assert positions_from_mask(mask) is None
    table = torch.randperm(20, generator=gen)[:9].tolist()
    q = torch.randn(12, H, DH, generator=gen).to(dtype)
    run = PrefillRun(0, 12, torch.tensor(table), mask)
    assert run.plan(BS, dtype) is None
    got = _run(q, kv, run).float()
    torch.testing.assert_close(got, _reference(q, kv, table, mask), atol=tol, rtol=tol)


def test_positions_are_read_back_from_a_true_position_mask():
    positions = torch.tensor([4, 9, 10, 31])
    assert torch.equal(positions_from_mask(_true_mask(positions)), positions)
    holes = _true_mask(positions)
    holes[2, 3] = False
    assert positions_from_mask(holes) is None
    # only a boolean mask says which keys a row sees: an int or float one is applied as given
    for dtype in (torch.int64, torch.float32):
        assert positions_from_mask(_true_mask(positions).to(dtype)) is None


def test_a_run_over_cached_keys_without_positions_or_mask_is_refused():
    with pytest.raises(ValueError, match="positions or a mask"):
        PrefillRun(0, 4, torch.arange(3)).plan(BS, torch.float32)
    with pytest.raises(ValueError, match="blocks hold only"):
        plan_run(torch.arange(20, 40), torch.arange(3), BS, torch.float32)
