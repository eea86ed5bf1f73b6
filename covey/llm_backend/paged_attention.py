"""Attention over the paged KV pool, in plain PyTorch.

A layer's pool is head-major, [2, KVH, S, Dh] (keys and values, then slots), so gathering a
sequence's keys by block yields tensors already laid out for batched matmuls.
Decodes of similar length are batched into one gather and two matmuls (a group pads only to
its own longest sequence; one sequence whose blocks lie in order is read without a gather:
its values in place, its keys with one packed copy, see `_decode`; one whose blocks lie in a
few stretches of order, by one copy of those stretches, see `attend_spans`); prefill
runs go one sequence at a time (few per step): a run with no cached prefix on its own fresh
keys (causal_prefill.py on CPU in bf16, else SDPA), a run over cached keys by query tiles
at their true positions (batched matmuls, tile_attention.py, on CPU in bf16 at one thread,
else SDPA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from covey.llm_backend.attention_metadata import AttentionMetadata, DecodeGroup, PrefillRun
from covey.llm_backend.causal_prefill import causal_prefill, use_causal_prefill
from covey.llm_backend.tile_attention import TileAttention, use_tile_attention

# Runs over cached keys take tile_attention's matmuls at up to this many torch threads. At
# one they beat the flash kernel (a blend run's layer 6.2 against 7.2 ms, see
# tile_attention.py). At two they do not: the flash kernel nearly halves its time (one
# parallel region over heads and query blocks) where the tiles' ops, batched over only 3 KV
# heads, gain ~1.3x; on a quiet machine a blend run 0.92-0.98x, 512 rows after 512 keys
# 0.99-1.05x, 30 rows after 1200 keys 0.7-1.0x; on a loaded one 0.7-0.9x.
CACHED_TILES_MAX_THREADS = 1


def store_kv(kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Write new keys/values [T, KVH, Dh] into a layer's pool [2, KVH, S, Dh] at `slots`."""
    kv[0].index_copy_(1, slots, k.transpose(0, 1))  # [KVH, T, Dh] into [KVH, S, Dh]
    kv[1].index_copy_(1, slots, v.transpose(0, 1))


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """q [T, H, Dh], fresh k/v [T, KVH, Dh] (already stored) -> output [T, H, Dh]."""
    groups, bs = meta.decode_groups, meta.block_size
    if len(groups) == 1 and meta.num_decode == q.shape[0]:
        return _decode(q, kv, groups[0], bs)  # a pure decode step: no scatter into `out`
    if not groups and len(meta.prefills) == 1:
        run = meta.prefills[0]
        if run.end - run.start == q.shape[0]:  # one run alone: no scatter either
            return _prefill(q, k, v, kv, run, bs).contiguous()  # (SDPA's is transposed)
    out = torch.empty_like(q)
    for g in groups:
        out[g.start : g.end] = _decode(q[g.start : g.end], kv, g, bs)
    for run in meta.prefills:
        rows = slice(run.start, run.end)
        out[rows] = _prefill(q[rows], k[rows], v[rows], kv, run, bs)
    return out


def _prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, run: PrefillRun, bs: int
) -> torch.Tensor:
    """One run's queries q [n, H, Dh] (fresh k/v [n, KVH, Dh]) -> [n, H, Dh]."""
    if run.key_blocks is not None:
        return _cached_prefill(q, kv, run, bs)
    if use_causal_prefill(q):
        return causal_prefill(q, k, v)
    qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, H|KVH, n, Dh]
    o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
    return o.squeeze(0).transpose(0, 1)  # [n, H, Dh]


def _cached_prefill(q: torch.Tensor, kv: torch.Tensor, run: PrefillRun, bs: int) -> torch.Tensor:
    """Queries q [n, H, Dh] over their sequence's keys in the pool -> [n, H, Dh].

    Planned runs (true positions) go tile by tile (query_tiles.py) over keys read in place
    when their blocks lie in pool order, else gathered once: by float32-score matmuls
    (tile_attention.py) on CPU in bf16 at one thread, else by SDPA. A mask of any other
    form is applied as given, in one SDPA call."""
    assert run.key_blocks is not None
    by_tiles = use_tile_attention(q) and torch.get_num_threads() <= CACHED_TILES_MAX_THREADS
    plan = run.plan(bs, torch.float32 if by_tiles else q.dtype)  # the masks' dtype
    qs = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, Dh]
    if plan is None:
        assert run.mask is not None
        keys = _gather_blocks(kv, run.key_blocks, bs)  # [2, KVH, nb * bs, Dh]
        length = run.mask.shape[1]
        ks = keys[0, :, :length].unsqueeze(0)  # [1, KVH, L, Dh]
        vs = keys[1, :, :length].unsqueeze(0)  # [1, KVH, L, Dh]
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=run.mask, enable_gqa=True)
        return o.squeeze(0).transpose(0, 1)
    if plan.contiguous_start is not None:
        s = plan.contiguous_start
        keys = kv[:, :, s : s + plan.length]  # [2, KVH, L, Dh], a view of the pool
    else:
        nb = -(-plan.length // bs)
        keys = _gather_blocks(kv, run.key_blocks[:nb], bs)  # [2, KVH, nb * bs, Dh]
    if by_tiles:
        rows = max(t.end - t.start for t in plan.tiles)
        tiles = TileAttention(q, keys[0, :, : plan.length], keys[1, :, : plan.length], rows)
        for t in plan.tiles:
            tiles.attend(t.start, t.end, t.keys, t.stripe, t.visible)
        return tiles.output()
    if len(plan.tiles) == 1:
        t = plan.tiles[0]
        ks = keys[0, :, : t.keys].unsqueeze(0)  # [1, KVH, keys, Dh]
        vs = keys[1, :, : t.keys].unsqueeze(0)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=t.mask, enable_gqa=True)
        return o.squeeze(0).transpose(0, 1)
    o = torch.empty_like(qs)
    for t in plan.tiles:
        ks = keys[0, :, : t.keys].unsqueeze(0)  # [1, KVH, keys, Dh]
        vs = keys[1, :, : t.keys].unsqueeze(0)
        o[:, :, t.start : t.end] = F.scaled_dot_product_attention(
            qs[:, :, t.start : t.end], ks, vs, attn_mask=t.mask, enable_gqa=True
        )
    return o.squeeze(0).transpose(0, 1)


def _decode(q: torch.Tensor, kv: torch.Tensor, group: DecodeGroup, bs: int) -> torch.Tensor:
    """One query per sequence: two batched matmuls beat SDPA's kernels here (7-20x in bf16
    on CPU, where flash attention tiles for long queries), and GQA repeats no keys.

    The keys operand is transposed, and a transposed bf16 batch whose matrices are not
    packed back to back falls off oneDNN onto a loop ~4x slower than copying it first
    (measured: 34 us packed against 140 us for 3 heads x 512 keys). So the keys are read
    packed: copied out of the pool in the contiguous case, and left at their whole blocks
    (not cut to the longest row) in the gathered case, where the scores are cut instead.
    Values are the untransposed operand, which oneDNN takes at any batch stride."""
    d, h, dh = q.shape
    kvh = kv.shape[1]
    g = h // kvh
    n = group.length
    # 3-d batches (KVH * D) go to bmm directly: matmul's 4-d broadcasting adds ~6 dispatches.
    if group.blocks is None:  # one sequence: its keys are one slice, or a few
        if group.spans is not None:
            return attend_spans(q, kv, group.spans)
        s = group.contiguous_start
        assert s is not None
        return attend_slice(q, kv[0], kv[1], s, s + n)
    else:
        gathered = _gather_blocks(kv, group.blocks.view(-1), bs)  # [2, KVH, D*MB*bs, Dh]
        gathered = gathered.view(2, kvh * d, -1, dh)  # [2, KVH*D, MB*bs, Dh]
        keys, values = gathered[0], gathered[1][:, :n]  # keys uncut: packed
    qg = (q * dh**-0.5).view(d, kvh, g, dh).transpose(0, 1).reshape(kvh * d, g, dh)
    scores = torch.bmm(qg, keys.transpose(1, 2))[..., :n].view(kvh, d, g, n)  # [KVH, D, G, L]
    if group.padding is not None:
        scores = scores.masked_fill(group.padding, float("-inf"))
    # bf16 in and out, one op instead of two: the kernel accumulates in float32 and rounds
    # once, as a float32 softmax cast back does (a test holds this build to it bit for bit)
    probs = torch.softmax(scores, dim=-1)  # [KVH, D, G, L]
    out = torch.bmm(probs.view(kvh * d, g, n), values)  # [KVH*D, G, Dh]
    return out.view(kvh, d, g, dh).transpose(0, 1).reshape(d, h, dh)  # [D, H, Dh]


def attend_slice(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, end: int
) -> torch.Tensor:
    """One sequence's query row q [1, H, Dh] against the keys/values [KVH, S, Dh] of a
    layer's pool at slots [start, end) (its blocks in pool order) -> [1, H, Dh]. The
    single-sequence case of `_decode`, which the compiled step's attention op calls too,
    so both compute the same bits. Keys are copied packed (see `_decode`)."""
    return _attend_row(q, keys[:, start:end].contiguous(), values[:, start:end])


def attend_spans(
    q: torch.Tensor, kv: torch.Tensor, spans: tuple[tuple[int, int], ...]
) -> torch.Tensor:
    """One sequence's query row q [1, H, Dh] against a layer's pool kv [2, KVH, S, Dh] at
    the slot ranges `spans` (its keys in a few stretches of pool order, e.g. a prefix-cache
    hit's blocks and then its own) -> [1, H, Dh].

    Why not gather by block: the stretches are copied as a whole, keys and values in one
    `cat` (~3 us a stretch), where `index_select` copies block by block at about twice the
    time (60 against 33 us for 1300 keys at one thread), and the scores are not computed
    for the last block's unused slots. Attention of 30 layers over 1296 keys in 2
    stretches, one thread: 5.9 ms against the gather's 7.1 (one slice: 5.7). The operands
    are the gathered case's (keys packed, values packed: in bf16 and fp16 oneDNN's results
    do not depend on the batch stride or the cut), so there this is the gathered path's
    result bit for bit (a test holds it). In float32 the last bit may differ: the gathered
    path computes scores over whole blocks and then cuts them."""
    packed = torch.cat([kv[:, :, a:b] for a, b in spans], dim=2)  # [2, KVH, L, Dh]
    return _attend_row(q, packed[0], packed[1])


def _attend_row(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One query row q [1, H, Dh] against one sequence's keys [KVH, L, Dh], packed, and
    values [KVH, L, Dh] (any batch stride) -> [1, H, Dh]: the math `attend_slice` and
    `attend_spans` share, so both compute the same bits from the same operands."""
    kvh, _, dh = keys.shape
    qg = (q * dh**-0.5).view(kvh, -1, dh)  # [KVH, G, Dh]: one row, so no transpose
    scores = torch.bmm(qg, keys.transpose(1, 2))  # [KVH, G, L]
    out = torch.bmm(torch.softmax(scores, dim=-1), values)  # [KVH, G, Dh]
    return out.view(q.shape)


def _gather_blocks(kv: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Copy whole blocks [2, KVH, S, Dh] -> [2, KVH, len(blocks) * bs, Dh], in block order."""
    two, kvh, slots, dh = kv.shape
    by_block = kv.view(two, kvh, slots // block_size, block_size, dh)  # [2, KVH, B, bs, Dh]
    return by_block.index_select(2, blocks).view(two, kvh, -1, dh)
