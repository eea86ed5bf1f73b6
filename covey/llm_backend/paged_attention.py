"""Attention over the paged KV pool, in plain PyTorch.

A layer's pool is head-major, [2, KVH, S, Dh] (keys and values, then slots), so gathering a
sequence's keys by block yields tensors already laid out for batched matmuls.
Decodes of similar length are batched into one gather and two matmuls (a group pads only to
its own longest sequence; one sequence whose blocks lie in order is read without a gather:
its values in place, its keys with one packed copy, see `_decode`); prefill
runs go one sequence at a time (few per step): a run with no cached prefix on its own fresh
keys (causal_prefill.py on CPU in bf16, else SDPA), a run over cached keys by query tiles
at their true positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from covey.llm_backend.attention_metadata import AttentionMetadata, DecodeGroup, PrefillRun
from covey.llm_backend.causal_prefill import causal_prefill, use_causal_prefill


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
        if run.key_blocks is None and run.end - run.start == q.shape[0] and use_causal_prefill(q):
            return causal_prefill(q, k, v)  # one fresh prompt alone: no scatter either
    out = torch.empty_like(q)
    for g in groups:
        out[g.start : g.end] = _decode(q[g.start : g.end], kv, g, bs)
    for run in meta.prefills:
        rows = slice(run.start, run.end)
        if run.key_blocks is None and use_causal_prefill(q[rows]):
            out[rows] = causal_prefill(q[rows], k[rows], v[rows])
            continue
        qs = q[run.start : run.end].transpose(0, 1).unsqueeze(0)  # [1, H, n, Dh]
        if run.key_blocks is None:
            ks = k[run.start : run.end].transpose(0, 1).unsqueeze(0)  # [1, KVH, n, Dh]
            vs = v[run.start : run.end].transpose(0, 1).unsqueeze(0)  # [1, KVH, n, Dh]
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        else:
            o = _cached_prefill(qs, kv, run, bs)
        out[run.start : run.end] = o.squeeze(0).transpose(0, 1)  # [n, H, Dh]
    return out


def _cached_prefill(qs: torch.Tensor, kv: torch.Tensor, run: PrefillRun, bs: int) -> torch.Tensor:
    """Queries [1, H, n, Dh] over their sequence's keys in the pool -> [1, H, n, Dh].

    Planned runs (true positions) go tile by tile (query_tiles.py) over keys read in place
    when their blocks lie in pool order, else gathered once; a mask of any other form is
    applied as given, in one call."""
    plan = run.plan(bs, qs.dtype)
    assert run.key_blocks is not None
    if plan is None:
        assert run.mask is not None
        keys = _gather_blocks(kv, run.key_blocks, bs)  # [2, KVH, nb * bs, Dh]
        length = run.mask.shape[1]
        ks = keys[0, :, :length].unsqueeze(0)  # [1, KVH, L, Dh]
        vs = keys[1, :, :length].unsqueeze(0)  # [1, KVH, L, Dh]
        return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=run.mask, enable_gqa=True)
    if plan.contiguous_start is not None:
        s = plan.contiguous_start
        keys = kv[:, :, s : s + plan.length]  # [2, KVH, L, Dh], a view of the pool
    else:
        nb = -(-plan.length // bs)
        keys = _gather_blocks(kv, run.key_blocks[:nb], bs)  # [2, KVH, nb * bs, Dh]
    if len(plan.tiles) == 1:
        t = plan.tiles[0]
        ks = keys[0, :, : t.keys].unsqueeze(0)
        vs = keys[1, :, : t.keys].unsqueeze(0)
        return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=t.mask, enable_gqa=True)
    o = torch.empty_like(qs)
    for t in plan.tiles:
        ks = keys[0, :, : t.keys].unsqueeze(0)  # [1, KVH, keys, Dh]
        vs = keys[1, :, : t.keys].unsqueeze(0)
        o[:, :, t.start : t.end] = F.scaled_dot_product_attention(
            qs[:, :, t.start : t.end], ks, vs, attn_mask=t.mask, enable_gqa=True
        )
    return o


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
    if group.blocks is None:  # one sequence, blocks in pool order: its keys are one slice
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
    kvh, _, dh = keys.shape
    qg = (q * dh**-0.5).view(kvh, -1, dh)  # [KVH, G, Dh]: one row, so no transpose
    scores = torch.bmm(qg, keys[:, start:end].contiguous().transpose(1, 2))  # [KVH, G, L]
    out = torch.bmm(torch.softmax(scores, dim=-1), values[:, start:end])  # [KVH, G, Dh]
    return out.view(q.shape)


def _gather_blocks(kv: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Copy whole blocks [2, KVH, S, Dh] -> [2, KVH, len(blocks) * bs, Dh], in block order."""
    two, kvh, slots, dh = kv.shape
    by_block = kv.view(two, kvh, slots // block_size, block_size, dh)  # [2, KVH, B, bs, Dh]
    return by_block.index_select(2, blocks).view(two, kvh, -1, dh)
