"""Runs over cached keys on CPU in bf16: query tiles by float32-score batched matmuls
(tile_attention.py) at the queries' true positions, instead of SDPA's flash kernel.

Random tensors at the embedded model's shapes (9 query heads over 3 KV heads, head size 64),
with scores of magnitude ~10-30 as a trained model's. The reference is float32 SDPA over the
same bf16 inputs under the boolean mask "key position <= query position".
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from covey.llm_backend.attention_metadata import AttentionMetadata, PrefillRun
from covey.llm_backend.paged_attention import paged_attention
from covey.llm_backend.tile_attention import TileAttention

H, KVH, DH, BS, BLOCKS = 9, 3, 64, 16, 40


@pytest.fixture(autouse=True)
def one_thread():
    """The tiles serve runs over cached keys at one torch thread (CACHED_TILES_MAX_THREADS)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pool(gen: torch.Generator) -> torch.Tensor:
    kv = torch.randn(2, KVH, BLOCKS * BS, DH, generator=gen)
    kv[0] *= 3
    return kv.bfloat16()  # [2, KVH, S, Dh]


def _attend(q, kv, table, positions):
    run = PrefillRun(0, q.shape[0], table, positions=positions)
    meta = AttentionMetadata(torch.zeros(q.shape[0], dtype=torch.long), 0, BS, [run])
    empty = torch.empty(0, KVH, DH, dtype=q.dtype)
    return paged_attention(q, empty, empty, kv, meta), run


def _sdpa(q, kv, table, positions, dtype=torch.float32) -> torch.Tensor:
    """One masked SDPA call over the run's gathered keys, in `dtype` -> float32 [n, H, Dh]."""
    length = int(positions.max()) + 1
    slots = table[torch.arange(length) // BS] * BS + torch.arange(length) % BS
    k, v = (kv[i][:, slots].to(dtype).unsqueeze(0) for i in (0, 1))  # [1, KVH, L, Dh]
    mask = torch.arange(length)[None, :] <= positions[:, None]
    qs = q.to(dtype).transpose(0, 1).unsqueeze(0)  # [1, H, n, Dh]
    o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, enable_gqa=True)
    return o.squeeze(0).transpose(0, 1).float()  # [n, H, Dh]


def _rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


def _sparse_run(gen: torch.Generator) -> torch.Tensor:
    """A blend run: recomputed rows at scattered positions, then the prompt's own tokens."""
    scattered = torch.randperm(500, generator=gen)[:70].sort().values
    return torch.cat((scattered, torch.arange(500, 530)))


def test_tiles_match_float32_attention_at_true_positions():
    """A blend-like run (several tiles, each hiding keys past its rows' positions) and a
    continuation, blocks gathered and in pool order: within 3e-2 of float32 attention, and
    no further from it than 1.4x the flash kernel's bf16 error (measured 1.05-1.28x)."""
    gen = torch.Generator().manual_seed(0)
    kv = _pool(gen)
    for positions in (_sparse_run(gen), torch.arange(200, 330)):
        n, nb = positions.shape[0], -(-(int(positions.max()) + 1) // BS)
        q = (torch.randn(n, H, DH, generator=gen) * 3).bfloat16()
        for table in (torch.randperm(BLOCKS, generator=gen)[:nb], torch.arange(3, 3 + nb)):
            got, run = _attend(q, kv, table, positions)
            plan = run.plan(BS, torch.float32)
            assert plan is not None and len(plan.tiles) > 1
            assert any(bool(t.stripe.isinf().any()) for t in plan.tiles)  # masks hide keys
            want = _sdpa(q, kv, table, positions)
            torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
            flash = _sdpa(q, kv, table, positions, torch.bfloat16)
            assert _rms(got.float() - want) <= 1.4 * _rms(flash - want)
            # float32 runs keep SDPA (its float32 kernel is as fast)
            float32, _ = _attend(q.float(), kv.float(), table, positions)
            torch.testing.assert_close(float32, want, atol=1e-5, rtol=1e-5)


def test_a_query_sees_no_key_past_its_position():
    """Changing every key and value past a row's position leaves that row's output
    unchanged, bit for bit, inside a tile whose other rows see them."""
    gen = torch.Generator().manual_seed(1)
    kv = _pool(gen)
    positions = _sparse_run(gen)
    table = torch.randperm(BLOCKS, generator=gen)[:34]
    q = (torch.randn(positions.shape[0], H, DH, generator=gen) * 3).bfloat16()
    before, run = _attend(q, kv, table, positions)
    row = 40
    tile = next(t for t in run.plan(BS, torch.float32).tiles if t.start <= row < t.end)
    assert int(positions[tile.end - 1]) > int(positions[row])  # later rows see more keys
    later = torch.arange(int(positions[row]) + 1, 530)
    slots = table[later // BS] * BS + later % BS
    changed = kv.clone()
    changed[:, :, slots] = -changed[:, :, slots] + 1
    after, _ = _attend(q, changed, table, positions)
    assert torch.equal(before[: row + 1], after[: row + 1])
    assert not torch.equal(before[row + 1 :], after[row + 1 :])


def test_query_heads_read_their_own_kv_head():
    """GQA without repeated keys: query head i reads KV head i // (H / KVH). Zeroing one KV
    head's values zeroes exactly its group's outputs."""
    gen = torch.Generator().manual_seed(2)
    kv = _pool(gen)
    kv[1, 1] = 0
    positions = _sparse_run(gen)
    q = (torch.randn(positions.shape[0], H, DH, generator=gen) * 3).bfloat16()
    out, _ = _attend(q, kv, torch.arange(34), positions)
    g = H // KVH
    assert torch.equal(out[:, g : 2 * g], torch.zeros_like(out[:, g : 2 * g]))
    assert out[:, :g].abs().sum() > 0 and out[:, 2 * g :].abs().sum() > 0


def test_a_run_over_cached_keys_in_bf16_goes_through_the_tiles_at_one_thread():
    """The route, bit for bit: a short bf16 run (one tile) is the tile kernel's output at
    one thread, and one masked SDPA call at two."""
    gen = torch.Generator().manual_seed(3)
    kv = _pool(gen)
    positions = torch.arange(300, 330)
    q = (torch.randn(30, H, DH, generator=gen) * 3).bfloat16()
    got, run = _attend(q, kv, torch.arange(21), positions)
    (tile,) = run.plan(BS, torch.float32).tiles
    assert (tile.keys, tile.visible) == (330, 301)
    tiles = TileAttention(q, kv[0, :, :330], kv[1, :, :330], 30)
    tiles.attend(0, 30, 330, tile.stripe, tile.visible)
    assert torch.equal(got, tiles.output())
    torch.set_num_threads(2)
    two, _ = _attend(q, kv, torch.arange(21), positions)
    torch.set_num_threads(1)
    flash = _sdpa(q, kv, torch.arange(21), positions, torch.bfloat16)
    torch.testing.assert_close(two.float(), flash, atol=0, rtol=0)
