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
from covey.llm_backend.paged_attention import paged_attention

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


def test_paged_attention_takes_this_path_for_long_bf16_runs_only():
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
    reference = _sdpa(q[1:], k[1:], v[1:], torch.float32)
    torch.testing.assert_close(out_alone.float(), reference, atol=3e-2, rtol=3e-2)
