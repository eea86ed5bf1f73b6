"""Decode attention over the paged pool against plain attention over each row's own keys.

Random tensors (a shape-level check): keys read in place, gathered by block, and gathered
for rows of different lengths must all give what attention over the row's keys gives,
including lengths that end inside a block (the gathered keys are left at whole blocks), with
and without padding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from covey.llm_backend.attention_metadata import AttentionMetadata, DecodeGroup
from covey.llm_backend.paged_attention import paged_attention

H, KVH, DH, BS, BLOCKS = 6, 2, 16, 4, 40


def _reference(q: torch.Tensor, kv: torch.Tensor, table: list[int], n: int) -> torch.Tensor:
    """One row: q [H, Dh] over the first n keys of its blocks -> [H, Dh], in float32."""
    slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(n)])
    k = kv[0][:, slots].float().unsqueeze(0)  # [1, KVH, n, Dh]
    v = kv[1][:, slots].float().unsqueeze(0)
    o = F.scaled_dot_product_attention(q.float().view(1, H, 1, DH), k, v, enable_gqa=True)
    return o.view(H, DH)


def _meta(group: DecodeGroup, rows: int) -> AttentionMetadata:
    return AttentionMetadata(
        slot_mapping=torch.zeros(rows, dtype=torch.long),
        num_decode=rows,
        block_size=BS,
        prefills=[],
        decode_groups=[group],
    )


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_reads_match_attention_over_each_rows_keys(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(2, KVH, BLOCKS * BS, DH, generator=gen).to(dtype)
    q = torch.randn(3, H, DH, generator=gen).to(dtype)
    empty = torch.empty(0, KVH, DH, dtype=dtype)

    # In place: one row whose blocks 5..9 lie in pool order, 18 keys (ends inside a block).
    group = DecodeGroup(0, 1, None, 18, None, contiguous_start=5 * BS)
    out = paged_attention(q[:1], empty, empty, kv, _meta(group, 1))
    torch.testing.assert_close(
        out[0].float(), _reference(q[0], kv, [5, 6, 7, 8, 9], 18), atol=tol, rtol=tol
    )

    # Gathered: three rows, blocks out of order, 13, 10 and 5 keys (padded to 13).
    tables = [[30, 2, 17, 11], [21, 8, 3], [14, 26]]
    lengths = [13, 10, 5]
    blocks = torch.tensor([t + [0] * (4 - len(t)) for t in tables])
    padding = torch.arange(13)[None, :] >= torch.tensor(lengths)[:, None]
    group = DecodeGroup(0, 3, blocks, 13, padding[None, :, None, :])
    out = paged_attention(q, empty, empty, kv, _meta(group, 3))
    for row, (table, n) in enumerate(zip(tables, lengths, strict=True)):
        torch.testing.assert_close(
            out[row].float(), _reference(q[row], kv, table, n), atol=tol, rtol=tol
        )

    # Gathered, no padding: two rows of 10 keys each, ending inside their third block (the
    # scores are cut to the length with nothing to mask).
    tables = [[33, 4, 19], [7, 25, 12]]
    blocks = torch.tensor(tables)
    group = DecodeGroup(0, 2, blocks, 10, None)
    out = paged_attention(q[:2], empty, empty, kv, _meta(group, 2))
    for row, table in enumerate(tables):
        torch.testing.assert_close(
            out[row].float(), _reference(q[row], kv, table, 10), atol=tol, rtol=tol
        )


def test_bf16_decode_softmax_equals_a_float32_softmax_cast_back():
    """Decode attention takes its softmax in bf16 (one op) on the claim that the kernel
    accumulates in float32 and rounds once: bit for bit what a float32 softmax cast back
    gives, padding included, on the shapes decode uses ([KVH, D, G, L])."""
    gen = torch.Generator().manual_seed(0)
    for length in (1, 7, 64, 333):
        scores = (torch.randn(3, 4, 3, length, generator=gen) * 4).to(torch.bfloat16)
        padding = torch.zeros(1, 4, 1, length, dtype=torch.bool)
        padding[:, 1:, :, length // 2 + 1 :] = True
        scores = scores.masked_fill(padding, float("-inf"))
        once = torch.softmax(scores, dim=-1)
        twice = torch.softmax(scores, dim=-1, dtype=torch.float32).to(torch.bfloat16)
        assert torch.equal(once, twice)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("kvh", "g", "dh", "bs"), [(KVH, H // KVH, DH, BS), (3, 3, 64, 16)])
def test_a_row_in_stretches_of_pool_order_reads_what_gathering_its_blocks_reads(
    kvh, g, dh, bs, dtype
):
    """One row whose blocks lie in a few stretches (a cached prefix, then its own blocks)
    reads them stretch by stretch: bit for bit what gathering its blocks gives in bf16 and
    fp16, at the test's small shape and at the embedded model's (3 KV heads of 64, 16-slot
    blocks); in float32 up to rounding (the gather's scores span whole blocks)."""
    gen = torch.Generator().manual_seed(1)
    kv = torch.randn(2, kvh, 120 * bs, dh, generator=gen).to(dtype)
    q = torch.randn(1, kvh * g, dh, generator=gen).to(dtype)
    empty = torch.empty(0, kvh, dh, dtype=dtype)
    cases = [  # (stretches of blocks, keys): ends inside a block, on a block's end, 3 and 4
        ([range(0, 4), range(10, 17)], 10 * bs + 3),
        ([range(0, 4), range(10, 17)], 11 * bs),
        ([range(30, 32), range(5, 6), range(60, 80)], 22 * bs + 1),
        ([range(90, 91), range(40, 42), range(2, 3), range(100, 110)], 13 * bs + 3),
    ]
    for stretches, n in cases:
        table = [b for r in stretches for b in r]
        starts = [r[0] * bs for r in stretches]
        ends = [r[-1] * bs + bs for r in stretches[:-1]] + [
            stretches[-1][0] * bs + n - sum(len(r) * bs for r in stretches[:-1])
        ]
        spans = tuple(zip(starts, ends, strict=True))
        by_spans = DecodeGroup(0, 1, None, n, None, spans=spans)
        gathered = DecodeGroup(0, 1, torch.tensor([table]), n, None)
        meta = AttentionMetadata(torch.zeros(1, dtype=torch.long), 1, bs, [], [by_spans])
        got = paged_attention(q, empty, empty, kv, meta)
        meta.decode_groups = [gathered]
        expected = paged_attention(q, empty, empty, kv, meta)
        if dtype == torch.float32:
            torch.testing.assert_close(got, expected)
        else:
            assert torch.equal(got, expected)
