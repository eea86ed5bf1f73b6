"""Attention over the paged KV pool, in plain PyTorch.

Decodes are batched: every sequence's keys are gathered by slot into one padded tensor and
one SDPA call serves them all. Prefill runs go one sequence at a time (there are few per
step); a run with no cached prefix attends to its own fresh keys with a causal kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from covey.llm_backend.attention_metadata import AttentionMetadata


def store_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new keys/values [T, KVH, Dh] into the pool [S, KVH, Dh] at their slots."""
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """q [T, H, Dh], fresh k/v [T, KVH, Dh] (already stored) -> output [T, H, Dh]."""
    out = torch.empty_like(q)
    d = meta.num_decode
    if d:
        out[:d] = _decode(q[:d], k_cache, v_cache, meta)
    for run in meta.prefills:
        qs = q[run.start : run.end].transpose(0, 1).unsqueeze(0)  # [1, H, n, Dh]
        if run.key_slots is None:
            ks = k[run.start : run.end].transpose(0, 1).unsqueeze(0)  # [1, KVH, n, Dh]
            vs = v[run.start : run.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        else:
            ks = k_cache[run.key_slots].transpose(0, 1).unsqueeze(0)  # [1, KVH, L, Dh]
            vs = v_cache[run.key_slots].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=run.mask, enable_gqa=True)
        out[run.start : run.end] = o.squeeze(0).transpose(0, 1)  # [n, H, Dh]
    return out


def _decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    assert meta.decode_slots is not None and meta.decode_mask is not None
    ks = k_cache[meta.decode_slots].transpose(1, 2)  # [D, KVH, L, Dh]
    vs = v_cache[meta.decode_slots].transpose(1, 2)  # [D, KVH, L, Dh]
    qs = q.unsqueeze(2)  # [D, H, 1, Dh]
    o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=meta.decode_mask, enable_gqa=True)
    return o.squeeze(2)  # [D, H, Dh]
