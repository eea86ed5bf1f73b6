"""Fresh prefill runs by query tiles of batched matmuls (causal_prefill.py): causal attention
over the run's own keys, as precise as SDPA's bf16 kernel, inside a step with other rows.

Random tensors (a shape and precision check; the perplexity tests in test_quantization.py
hold the real model to its tolerances through this path). The reference is float32 SDPA
with is_causal on the same bf16 inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from covey.llm_backend.attention_metadata import AttentionMetadata, DecodeGroup, PrefillRun
from covey.llm_backend.causal_prefill import (
    MIN_ROWS,
    TILE_ROWS,
    causal_prefill,
    use_causal_prefill,
)
from covey.llm_backend.paged_attention import paged_attention, store_kv

H, KVH, DH = 9, 3, 64


def _qkv(n: int, gen: torch.Generator, dtype=torch.bfloat16):
    # scores of magnitude ~10-30, as a trained model's: where bf16 scores lose precision
    q = (torch.randn(n, H, DH, generator=gen) * 3).to(dtype)
    k = (torch.randn(n, KVH, DH, generator=gen) * 3).to(dtype)
    v = torch.randn(n, KVH, DH, generator=gen).to(dtype)
    return q, k, v


def _sdpa(q, k, v, dtype):
    qs, ks, vs = (x.to(dtype).transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
    return o.squeeze(0).transpose(0, 1).float()  # [n, H, Dh]


def _rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


@pytest.mark.parametrize("n", [MIN_ROWS, TILE_ROWS + 37, 3 * TILE_ROWS, 300])
def test_tiles_give_causal_attention_as_precise_as_sdpa_in_bf16(n):
    """Whole and partial tiles: against float32 attention, the error is within a small
    factor of the bf16 SDPA kernel's own (bf16 scores, the reverted design, were 5x)."""
    gen = torch.Generator().manual_seed(n)
    q, k, v = _qkv(n, gen)
    reference = _sdpa(q, k, v, torch.float32)
    ours = causal_prefill(q, k, v)
    assert ours.shape == (n, H, DH) and ours.dtype == torch.bfloat16
    kernel_error = _rms(_sdpa(q, k, v, torch.bfloat16) - reference)
    assert _rms(ours.float() - reference) <= 1.6 * kernel_error
    torch.testing.assert_close(ours.float(), reference, atol=3e-2, rtol=3e-2)


def test_a_query_sees_no_later_key():
    """Changing the keys and values after position p leaves rows 0..p unchanged, bit for
    bit, and changes the later rows."""
    gen = torch.Generator().manual_seed(7)
    n, p = 2 * TILE_ROWS + 10, TILE_ROWS + 5  # p inside the second tile's diagonal block
    q, k, v = _qkv(n, gen)
    before = causal_prefill(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[p + 1 :] = -k2[p + 1 :]
    v2[p + 1 :] += 1
    after = causal_prefill(q, k2, v2)
    assert torch.equal(before[: p + 1], after[: p + 1])
    assert not torch.equal(before[p + 1 :], after[p + 1 :])


def test_query_heads_read_their_own_kv_head():
    """GQA: query head i reads KV head i // (H / KVH). Zeroing one KV head's values zeroes
    exactly its group's outputs."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = _qkv(TILE_ROWS * 2, gen)
    v[:, 1] = 0
    out = causal_prefill(q, k, v)
    group = H // KVH
    assert torch.equal(out[:, group : 2 * group], torch.zeros_like(out[:, group : 2 * group]))
    assert out[:, :group].abs().sum() > 0 and out[:, 2 * group :].abs().sum() > 0


def test_the_tiles_are_for_long_bf16_runs_on_cpu_only():
    assert use_causal_prefill(torch.empty(MIN_ROWS, H, DH, dtype=torch.bfloat16))
    assert not use_causal_prefill(torch.empty(MIN_ROWS - 1, H, DH, dtype=torch.bfloat16))
    assert not use_causal_prefill(torch.empty(4 * MIN_ROWS, H, DH, dtype=torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_step_mixing_a_decode_row_and_runs_of_both_paths(dtype):
    """One decode row, a short run (SDPA) and a long one (tiles in bf16, SDPA in float32)
    in one step: each run attends to its own keys only."""
    gen = torch.Generator().manual_seed(9)
    sizes = (MIN_ROWS - 5, 2 * TILE_ROWS + 3)
    t = 1 + sum(sizes)
    q, k, v = _qkv(t, gen, dtype)
    kv = torch.randn(2, KVH, 16, DH, generator=gen).to(dtype)
    runs, start = [], 1
    for n in sizes:
        runs.append(PrefillRun(start, start + n, None, None))
        start += n
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(t, dtype=torch.long),
        num_decode=1,
        block_size=16,
        prefills=runs,
        decode_groups=[DecodeGroup(0, 1, None, 3, None, contiguous_start=0)],
    )
    out = paged_attention(q, k, v, kv, meta)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    for run in runs:
        rows = slice(run.start, run.end)
        reference = _sdpa(q[rows], k[rows], v[rows], torch.float32)
        torch.testing.assert_close(out[rows].float(), reference, atol=tol, rtol=tol)
        # the route, bit for bit: only the long bf16 run goes through the tiles
        if dtype == torch.bfloat16 and run.end - run.start >= MIN_ROWS:
            assert torch.equal(out[rows], causal_prefill(q[rows], k[rows], v[rows]))
        else:
            assert torch.equal(out[rows].float(), _sdpa(q[rows], k[rows], v[rows], dtype))


def test_a_prompt_alone_in_its_step_gets_the_same_bits_as_inside_a_mixed_step():
    """A step that is one fresh run returns the tiles' output directly (no scatter into a
    step-wide buffer); the same run next to a decode row computes the same bits."""
    gen = torch.Generator().manual_seed(10)
    n = 2 * TILE_ROWS + 7
    q, k, v = _qkv(n + 1, gen)
    kv = torch.randn(2, KVH, 16, DH, generator=gen).bfloat16()
    alone = AttentionMetadata(torch.zeros(n, dtype=torch.long), 0, 16, [PrefillRun(0, n, None)])
    mixed = AttentionMetadata(
        slot_mapping=torch.zeros(n + 1, dtype=torch.long),
        num_decode=1,
        block_size=16,
        prefills=[PrefillRun(1, n + 1, None, None)],
        decode_groups=[DecodeGroup(0, 1, None, 3, None, contiguous_start=0)],
    )
    out_alone = paged_attention(q[1:], k[1:], v[1:], kv, alone)
    out_mixed = paged_attention(q, k, v, kv, mixed)
    assert torch.equal(out_alone, out_mixed[1:])
    assert torch.equal(out_alone, causal_prefill(q[1:], k[1:], v[1:]))
    reference = _sdpa(q[1:], k[1:], v[1:], torch.float32)
    torch.testing.assert_close(out_alone.float(), reference, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("alone", [True, False])
def test_a_run_over_cached_keys_never_takes_the_fresh_path(alone):
    """A later chunk of a chunked prefill, or a prefix-cache hit, with 64+ new tokens in
    bf16: its queries attend to the cached prefix too, so it must go through the pool (as
    SDPA over all keys would), not through the tiles over its own new keys only. Both alone
    in its step (the direct return) and next to a decode row."""
    gen = torch.Generator().manual_seed(11)
    bs, prefix, n = 16, 80, 2 * MIN_ROWS  # new tokens at positions 80..207
    length = prefix + n
    table = torch.randperm(16, generator=gen)[: -(-length // bs)]  # blocks out of pool order
    q_all, k_all, v_all = _qkv(length, gen)
    kv = torch.zeros(2, KVH, 16 * bs, DH, dtype=torch.bfloat16)
    slots = table[torch.arange(length) // bs] * bs + torch.arange(length) % bs
    store_kv(kv, k_all, v_all, slots)  # the prefix (cached) and the new tokens (just stored)
    q, k, v = q_all[prefix:], k_all[prefix:], v_all[prefix:]
    positions = torch.arange(prefix, length)
    decode_rows = 0 if alone else 1
    if not alone:  # a decode row ahead of the run
        q, k, v = (torch.cat((x[:1], x)) for x in (q, k, v))
    run = PrefillRun(decode_rows, decode_rows + n, table, positions=positions)
    groups = [] if alone else [DecodeGroup(0, 1, None, 3, None, contiguous_start=0)]
    meta = AttentionMetadata(torch.zeros(n + decode_rows, dtype=torch.long), decode_rows, bs,
                             [run], decode_groups=groups)
    out = paged_attention(q, k, v, kv, meta)[decode_rows:].float()
    reference = _sdpa(q_all, k_all, v_all, torch.float32)[prefix:]  # all keys, causal
    torch.testing.assert_close(out, reference, atol=3e-2, rtol=3e-2)
    fresh = causal_prefill(q_all[prefix:], k_all[prefix:], v_all[prefix:]).float()
    assert _rms(fresh - reference) > 10 * _rms(out - reference)  # the fresh path is far off
